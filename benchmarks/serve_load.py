"""Load on ``m2ae-serve`` over localhost: sequential and concurrent requests, bad requests in between, latency
percentiles, and the service still answering afterwards.

    python -m m2ae_infer.benchmarks.serve_load [--sequential 200] [--concurrent 50] [--threads 8] [--json FILE]
    python -m m2ae_infer.benchmarks.serve_load --url http://127.0.0.1:8000   # a service already running

Without ``--url`` it starts ``m2ae-serve --ray local`` on a free port of 127.0.0.1 (start-up timed), and stops it
with Ctrl-C at the end (exit code checked). Requests carry a 64x96 PNG crop of the shipped example photo (the
bytes answered are checked against the first answer). Every loop is bounded in count and time and talks to
127.0.0.1 only. Needs the ``ray`` extra.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

BAD = [("/deblur", b"", "POST", 400), ("/deblur", b"no image here", "POST", 400), ("/deblur", None, "GET", 405),
       ("/elsewhere", None, "GET", 404)]
DEADLINE_S = 900   # the whole run stops by itself after this


def request(url: str, data: bytes | None = None, method: str | None = None, timeout: float = 120):
    req = urllib.request.Request(url, data=data, method=method)
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body, status = r.read(), r.status
    except urllib.error.HTTPError as e:
        body, status = e.read(), e.code
    return status, body, time.perf_counter() - start


def percentiles(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1e3
    return {"n": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "max_ms": float(ms.max()), "mean_ms": float(ms.mean())}


def test_image(size=(64, 96)) -> bytes:
    from PIL import Image

    import m2ae_infer
    photo = np.asarray(Image.open(Path(m2ae_infer.__file__).parent / "assets" / "example_blurry.png").convert("RGB"))
    buffer = io.BytesIO()
    Image.fromarray(photo[150:150 + size[0], 150:150 + size[1]]).save(buffer, format="PNG")
    return buffer.getvalue()


def start_service(max_bytes: int, replicas: int):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logs = Path(tempfile.mkdtemp(prefix="m2ae-serve-load-"))
    out, err = open(logs / "out", "w"), open(logs / "err", "w")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "m2ae_infer.serve", "--ray", "local", "--port", str(port),
                             "--max-bytes", str(max_bytes), "--replicas", str(replicas)], stdout=out, stderr=err)
    url = f"http://127.0.0.1:{port}"
    while time.perf_counter() - start < 300 and proc.poll() is None:
        try:
            if request(url + "/healthz", timeout=5)[0] == 200:
                return url, proc, logs, time.perf_counter() - start
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"m2ae-serve did not come up: {(logs / 'err').read_text()[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="serve_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running service (default: start m2ae-serve --ray local here)")
    p.add_argument("--sequential", type=int, default=200)
    p.add_argument("--concurrent", type=int, default=50)
    p.add_argument("--threads", type=int, default=8, help="client threads for the concurrent requests")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    begun = time.perf_counter()
    body = test_image()
    result: dict = {"cpus": os.cpu_count(), "load_average_start": os.getloadavg(), "image": "64x96 PNG",
                    "replicas": args.replicas}
    proc = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        url, proc, logs, started = start_service(max_bytes=1_000_000, replicas=args.replicas)
        result["startup_s"] = started
        print(f"m2ae-serve --ray local: /healthz answered {started:.1f} s after the start")
    try:
        status, expected, _ = request(url + "/deblur", body)   # warm-up, and the answer all others must equal
        assert status == 200, status
        seq, errors = [], 0
        for i in range(args.sequential):
            if time.perf_counter() - begun > DEADLINE_S:
                break
            status, answer, seconds = request(url + "/deblur", body)
            errors += status != 200 or answer != expected
            seq.append(seconds)
            if i % 20 == 10:   # a bad request now and then: answered 4xx, the service goes on
                path, data, method, code = BAD[(i // 20) % len(BAD)]
                bad = request(url + path, data, method)[0]
                errors += bad != code
        result["sequential"] = {**percentiles(seq), "errors": errors}
        print(f"{len(seq)} sequential requests (+{len(seq) // 20} bad ones, 4xx): {errors} errors, "
              f"p50 {result['sequential']['p50_ms']:.0f} ms, p95 {result['sequential']['p95_ms']:.0f} ms")

        start = time.perf_counter()
        with ThreadPoolExecutor(args.threads) as pool:
            answers = list(pool.map(lambda i: request(url + "/deblur", body), range(args.concurrent)))
        wall = time.perf_counter() - start
        bad_answers = sum(a[0] != 200 or a[1] != expected for a in answers)
        result["concurrent"] = {**percentiles([a[2] for a in answers]), "errors": bad_answers,
                                "threads": args.threads, "wall_s": wall, "requests_per_s": len(answers) / wall}
        print(f"{len(answers)} concurrent requests ({args.threads} client threads): {bad_answers} errors, "
              f"p50 {result['concurrent']['p50_ms']:.0f} ms, p95 {result['concurrent']['p95_ms']:.0f} ms, "
              f"{len(answers) / wall:.1f} requests/s")
        bad_codes = [request(url + path, data, method)[0] for path, data, method, _ in BAD]
        result["bad_requests"] = dict(zip([f"{m} {p}" for p, _, m, _ in BAD], bad_codes))
        result["healthy_after"] = request(url + "/healthz")[0] == 200
        print(f"bad requests answered {bad_codes}; /healthz afterwards: {result['healthy_after']}")
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                result["exit_code"] = proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                result["exit_code"] = None
            print(f"Ctrl-C: m2ae-serve exited {result['exit_code']}; its last line: "
                  f"{(logs / 'err').read_text().strip().splitlines()[-1:]}")
    result["load_average_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    ok = result["sequential"]["errors"] == 0 and result["concurrent"]["errors"] == 0 and result["healthy_after"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
