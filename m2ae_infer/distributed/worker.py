"""What runs on the cluster's workers: the decode task (:func:`_decode`) and the deblurring actor
(:class:`_DeblurWorker`), which writes outputs as m2ae-deblur does."""
from __future__ import annotations

import contextlib
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..jobs import describe
from ..cliutil import cli_message
from ..messages import one_line, shown
from .records import InputResult, _Item


@dataclass(frozen=True)
class _Decoded:
    """What a decode task hands an actor: the decoded image (PIL, EXIF orientation applied) or the error."""

    image: Any
    error: str | None
    warnings: tuple[str, ...]


def _deblurrer(options: dict, device: str):
    from ..api import Deblurrer
    return Deblurrer(options["checkpoint"], device=device, execution=options["execution"],
                     threshold=options["threshold"], dilation=options["dilation"], tile=options["tile"],
                     tile_overlap=options["tile_overlap"], detector_side=options["detector_side"])


def _identity(path) -> tuple[int, ...] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _decode(source: str) -> _Decoded:
    """Ray task: read and decode one input as m2ae-deblur does (:func:`m2ae_infer.imgio.load_image`)."""
    from ..imgio import ImageWarning, load_image
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ImageWarning)
        try:
            image, error = load_image(source), None
        except (ValueError, OSError, MemoryError) as exc:   # ImageError is a ValueError
            image, error = None, one_line(exc)
    return _Decoded(image, error, tuple(one_line(w.message) for w in caught if issubclass(w.category, ImageWarning)))


class _DeblurWorker:
    """Ray actor: one Deblurrer (the checkpoint loaded once, in ``__init__``), writing outputs as m2ae-deblur.

    ``faults`` is a test hook: ``{"name": file name, "when": "publish" | "return", "marker": path}`` makes this
    process exit (``os._exit(1)``) on that input, once per marker file: with the output's bytes complete in their
    temporary file but not yet published ("publish"), or after publishing, before reporting ("return").
    """

    def __init__(self, options: dict, threads: int, faults: list[dict]):
        import torch
        torch.set_num_threads(threads)
        self.options, self.faults = options, faults
        self.deblurrer = _deblurrer(options, options["device"])

    def ready(self) -> str:
        return f"{socket.gethostname()} pid {os.getpid()} {self.deblurrer.device}"

    def process(self, item: _Item, decoded: _Decoded) -> InputResult:
        # Write each output that is still as it was when the job was planned. One that changed since was
        # published by an earlier attempt of this input whose worker then died (an atomic publish makes a new
        # file): it is complete, and writing it again would write it twice.
        todo = [i for i, (t, b) in enumerate(zip(item.targets, item.before)) if _identity(t) == b]
        if not todo:
            return InputResult(item.source, "written", "written before its worker died", None, decoded.warnings)
        if decoded.error is not None:
            return InputResult(item.source, "failed", decoded.error, None, decoded.warnings)
        from ..imgio import ImageWarning
        from ..imgsave import mask_to_image, save_images
        caught: list = []
        try:
            with warnings.catch_warnings(record=True) as caught, self._fault(item.source, "publish"):
                warnings.simplefilter("always", ImageWarning)
                restored, info = self.deblurrer.run(decoded.image, mask="full" if self.options["full"] else None,
                                                    return_info=True)
                images = [restored]
                if self.options["save_mask"]:
                    import torch
                    images.append(mask_to_image(torch.from_numpy(info.mask)))
                save_images([(images[i], item.targets[i]) for i in todo], overwrite=self.options["force"])
        except (ValueError, OSError, RuntimeError, MemoryError) as exc:   # as m2ae-deblur: this input fails alone
            return InputResult(item.source, "failed", _named(cli_message(exc), item.source), None,
                            decoded.warnings + _warned(caught, item.source))
        self._die_if(item.source, "return")
        numbers = {k: getattr(info, k) for k in ("active_fraction", "flops_dense", "flops_executed", "flops_untiled",
                                                  "seconds", "execution", "backend", "tiles")}
        noted = decoded.warnings + _warned(caught, item.source)
        return InputResult(item.source, "written", describe(info), numbers, noted)

    @contextlib.contextmanager
    def _fault(self, source: str, when: str):
        if not any(f["when"] == when and f["name"] == Path(source).name for f in self.faults):
            yield
            return
        from .. import atomic
        publish = atomic._publish

        def dying(*args, **kwargs):
            self._die_if(source, when)
            return publish(*args, **kwargs)

        atomic._publish = dying
        try:
            yield
        finally:
            atomic._publish = publish

    def _die_if(self, source: str, when: str) -> None:
        for fault in self.faults:
            if fault["when"] == when and fault["name"] == Path(source).name:
                try:
                    os.close(os.open(fault["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    continue
                os._exit(1)


def _named(message: str, source: str) -> str:
    """The decoded image reaches the Deblurrer as a PIL image, so imgio names it "PIL image"; name the file."""
    return shown(source) + message[len("PIL image"):] if message.startswith("PIL image") else message


def _warned(caught, source: str) -> tuple[str, ...]:
    from ..imgio import ImageWarning
    return tuple(_named(one_line(w.message), source) for w in caught or () if issubclass(w.category, ImageWarning))
