"""Deblurring as an HTTP service on Ray Serve: ``m2ae-serve``, or ``serve run m2ae_infer.serve:app``.

API (see docs/ray.md):

- ``POST /deblur`` with an image file's bytes as the body (PNG, JPEG, TIFF, BMP, WebP, GIF, ...): ``200``, the
  restored image as ``image/png`` (the bytes ``m2ae-deblur IN -o OUT.png`` writes), and the run's numbers as JSON in
  the ``X-M2AE-Info`` header: ``active_fraction``, ``flops_dense``, ``flops_executed``, ``flops_untiled``,
  ``seconds``, ``execution``, ``backend``, ``tiles``, ``width``, ``height``, ``warnings``.
- ``GET /healthz``: ``200`` ``ok`` once a replica has loaded the checkpoint.
- Errors are one line of ``text/plain``: ``400`` an empty body or one that is not a readable image, ``413`` a body
  over ``max_bytes``, ``404`` another path, ``405`` another method (with ``Allow``). A bad request never takes the
  service down.

Requests are batched (``@serve.batch``): a replica takes up to ``MAX_BATCH`` waiting images at once and runs them
one after another in one worker thread, so torch's threads never compete within a replica and the event loop
stays free to read requests and answer ``/healthz`` meanwhile. Images of different sizes are not stacked into one
tensor: each keeps the exact result and RunInfo of a single run.

This module imports Ray at the top; ``m2ae-serve`` starts through :mod:`m2ae_infer.entry` so that a Ctrl-C
while it loads is one line.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import tempfile
import time
import warnings

from ray import serve
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from .cliutil import OneLineArgumentParser, cli_main, cli_message, say
from .messages import one_line

PROG = "m2ae-serve"
MAX_BYTES = 32 * 1024 * 1024   # request bodies above this get 413
MAX_BATCH = 8                  # requests one replica takes at once
BATCH_WAIT_S = 0.005           # how long a replica waits for a batch to fill
BODY = "the request body"      # how errors name the image
ROUTES = {"/deblur": ("POST",), "/healthz": ("GET", "HEAD")}

__all__ = ["DeblurService", "app", "build_app", "main"]


class _Reply:
    """A response's parts, made in the worker thread (starlette objects are built on the event loop)."""

    def __init__(self, status: int, body: bytes | str, headers: dict | None = None, media: str = "image/png"):
        self.status, self.body, self.headers, self.media = status, body, headers or {}, media

    def response(self) -> Response:
        if isinstance(self.body, str):
            return PlainTextResponse(self.body + "\n", status_code=self.status, headers=self.headers)
        return Response(self.body, status_code=self.status, headers=self.headers, media_type=self.media)


def _error(status: int, message: str, headers: dict | None = None) -> Response:
    return _Reply(status, one_line(message), headers).response()


@serve.deployment(max_ongoing_requests=4 * MAX_BATCH, health_check_period_s=10)
class DeblurService:
    """One replica: a :class:`~m2ae_infer.Deblurrer` (the checkpoint loaded once) behind ``/deblur``.

    Args: checkpoint (path or None: the shipped one), max_bytes (request size limit), threads (torch threads),
    device, execution, threshold, dilation: as :class:`~m2ae_infer.Deblurrer`.
    """

    def __init__(self, checkpoint: str | None = None, max_bytes: int = MAX_BYTES, threads: int = 1,
                 device: str = "auto", execution: str = "auto", threshold: float | None = None, dilation: int = 0):
        import torch

        from .api import Deblurrer
        torch.set_num_threads(threads)
        self.max_bytes = max_bytes
        self.deblurrer = Deblurrer(checkpoint, device=device, execution=execution, threshold=threshold,
                                   dilation=dilation)

    async def __call__(self, request: Request) -> Response:
        path, method = request.url.path.rstrip("/") or "/", request.method
        allowed = ROUTES.get(path)
        if allowed is None:
            return _error(404, f"no route {path}; POST an image to /deblur, or GET /healthz")
        if method not in allowed:
            return _error(405, f"{method} {path}: method not allowed; use {' or '.join(allowed)}",
                          {"Allow": ", ".join(allowed)})
        if path == "/healthz":
            return PlainTextResponse("ok\n")
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        decoded = await asyncio.to_thread(_decode, body)
        if isinstance(decoded, _Reply):
            return decoded.response()
        reply = await self._deblur_batch(decoded)
        return reply.response()

    async def _body(self, request: Request) -> bytes | Response:
        """The body, or the 413/400 response: the declared length is checked before reading, the bytes read
        while reading (a chunked body has no length)."""
        too_big = (f"{BODY} is over the {self.max_bytes}-byte limit of this service; send a smaller image "
                   "(the limit is m2ae-serve --max-bytes, or max_bytes)")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return _error(413, too_big)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_bytes:
                return _error(413, too_big)
            chunks.append(chunk)
        if not size:
            return _error(400, f"{BODY} is empty; POST the image file's bytes (e.g. curl --data-binary @photo.png)")
        return b"".join(chunks)

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _deblur_batch(self, images: list) -> list[_Reply]:
        return await asyncio.to_thread(lambda: [self._deblur(img) for img in images])

    def _deblur(self, decoded) -> _Reply:
        """One image (``(PIL image, warnings)``) -> the 200 reply, or a one-line 400/500 that leaves the rest of the
        batch alone."""
        from .imgio import ImageWarning
        image, noted = decoded
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ImageWarning)
                restored, info = self.deblurrer.run(image, return_info=True)
                png = _png(restored)
        except ValueError as exc:   # ImageError: an image this network or PNG cannot take
            return _Reply(400, _body_named(one_line(exc)))
        except (RuntimeError, MemoryError, OSError) as exc:
            return _Reply(500, f"deblurring failed: {one_line(exc)}")
        noted = noted + [_body_named(one_line(w.message)) for w in caught if issubclass(w.category, ImageWarning)]
        numbers = {k: getattr(info, k) for k in ("active_fraction", "flops_dense", "flops_executed", "flops_untiled",
                                                  "seconds", "execution", "backend", "tiles")}
        numbers.update(width=restored.width, height=restored.height, warnings=noted)
        return _Reply(200, png, {"X-M2AE-Info": json.dumps(numbers, separators=(",", ":"))})


def _decode(body: bytes):
    """The body as ``(PIL image, warnings)``, decoded as m2ae-deblur reads a file (:func:`imgio.load_image`: the
    same checks for truncated, corrupt, empty, oversized images), or the 400 reply."""
    from .imgio import ImageWarning, load_image
    with tempfile.NamedTemporaryFile(prefix="m2ae-serve-", suffix=".img") as f:
        f.write(body)
        f.flush()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ImageWarning)
                image = load_image(f.name, name=BODY)
        except (ValueError, OSError, MemoryError) as exc:   # ImageError is a ValueError
            return _Reply(400, one_line(exc))
    return image, [one_line(w.message) for w in caught if issubclass(w.category, ImageWarning)]


def _body_named(message: str) -> str:
    """The Deblurrer names a PIL image "PIL image"; here it is the request body."""
    return BODY + message[len("PIL image"):] if message.startswith("PIL image") else message


def _png(image) -> bytes:
    """The PNG bytes m2ae-deblur writes for ``image`` (same encoder options, EXIF, 16-bit handling)."""
    from .imgsave import encode_image
    return encode_image(image, ".png", BODY)


# --------------------------------------------------------------------------------------- applications
def build_app(args: dict | None = None):
    """The application ``serve run m2ae_infer.serve:build_app key=value ...`` deploys. Keys (strings from the
    command line, or values): checkpoint, max_bytes, replicas, threads, gpus, device, execution, threshold,
    dilation."""
    args = dict(args or {})
    unknown = set(args) - {"checkpoint", "max_bytes", "replicas", "threads", "gpus", "device", "execution",
                           "threshold", "dilation"}
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))}; use checkpoint, max_bytes, replicas, "
                         "threads, gpus, device, execution, threshold, dilation")
    threads, gpus = int(args.pop("threads", 1)), float(args.pop("gpus", 0))
    replicas = int(args.pop("replicas", 1))
    options = {"ray_actor_options": {"num_cpus": threads, "num_gpus": gpus}, "num_replicas": replicas}
    init = {"checkpoint": args.get("checkpoint"), "max_bytes": int(args.get("max_bytes", MAX_BYTES)),
            "threads": threads, "device": args.get("device", "cuda" if gpus else "auto"),
            "execution": args.get("execution", "auto"),
            "threshold": None if args.get("threshold") in (None, "") else float(args["threshold"]),
            "dilation": int(args.get("dilation", 0))}
    return DeblurService.options(**options).bind(**init)


app = build_app()   # serve run m2ae_infer.serve:app (the shipped checkpoint, one replica)


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog=PROG, description="Serve deblurring over HTTP on Ray Serve: POST an image's "
                                                     "bytes to /deblur, get the restored PNG back.")
    p.add_argument("--checkpoint", metavar="CKPT", help="checkpoint (.pth/.safetensors); default: the shipped one")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-bytes", type=int, default=MAX_BYTES, metavar="N",
                   help=f"largest request body accepted, else 413 (default {MAX_BYTES})")
    p.add_argument("--replicas", type=int, default=1, metavar="N", help="replicas, one model each (default 1)")
    p.add_argument("--threads-per-replica", type=int, default=1, metavar="N",
                   help="torch threads (Ray CPUs) per replica (default 1)")
    p.add_argument("--gpus-per-replica", type=float, default=0.0, metavar="F",
                   help="GPUs per replica (fractions share one); replicas then run on CUDA")
    p.add_argument("--ray", default="default", metavar="ADDRESS",
                   help="Ray cluster: HOST:PORT, ray://HOST:PORT, auto (the running one) or local (a new one on "
                        "this machine); default: RAY_ADDRESS, else a running one, else a new one")
    return p


@cli_main(PROG)
def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        for flag, value, least in (("--max-bytes", args.max_bytes, 1), ("--replicas", args.replicas, 1),
                                   ("--threads-per-replica", args.threads_per_replica, 1),
                                   ("--port", args.port, 1), ("--gpus-per-replica", args.gpus_per_replica, 0)):
            if value < least:
                build_parser().error(f"{flag} must be >= {least}, got {value}")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    from .distributed import connect
    try:
        from .api import Deblurrer   # the checkpoint is checked here, in one line, before any replica starts
        Deblurrer(args.checkpoint, device="cpu")
        owned = connect(None if args.ray == "default" else args.ray)
    except (ValueError, OSError, RuntimeError) as exc:
        say(f"{PROG}: error: {cli_message(exc)}", sys.stderr)
        return 2
    import ray
    try:
        # A service manager's stop (SIGTERM) shuts down as Ctrl-C does; set before Serve starts (Ray's own handler
        # ends the process with a native stack dump).
        signal.signal(signal.SIGTERM, _terminate)
        logging.getLogger("ray.serve").setLevel(logging.ERROR)
        serve.start(http_options={"host": args.host, "port": args.port}, logging_config={"log_level": "WARNING"})
        application = build_app({"checkpoint": args.checkpoint and os.path.abspath(args.checkpoint),
                                 "max_bytes": args.max_bytes, "replicas": args.replicas,
                                 "threads": args.threads_per_replica, "gpus": args.gpus_per_replica})
        serve.run(application, name="m2ae", route_prefix="/", logging_config={"log_level": "WARNING"})
        say(f"{PROG}: serving on http://{args.host}:{args.port} (POST /deblur, GET /healthz), {args.replicas} "
            f"replica(s); Ctrl-C to stop")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        raise   # cli_main: one line, exit 130; the cluster goes down below
    except _Terminated:
        say(f"{PROG}: terminated", sys.stderr)
        return TERMINATED
    except Exception as exc:  # noqa: BLE001 - Serve's errors (port in use, a replica that cannot start): one line
        say(f"{PROG}: error: {one_line(exc, 300)}", sys.stderr)
        return 2
    finally:
        with _quiet_shutdown():
            serve.shutdown()
            if owned:
                ray.shutdown()


TERMINATED = 143   # 128 + SIGTERM


class _Terminated(Exception):
    """Raised by the SIGTERM handler, so that the cluster is shut down as after a Ctrl-C."""


def _terminate(signum, frame):
    raise _Terminated


class _quiet_shutdown:
    """Shutting down after Ctrl-C: a second Ctrl-C or a shutdown error must not print a traceback."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is not None and issubclass(kind, Exception)


if __name__ == "__main__":
    sys.exit(main())
