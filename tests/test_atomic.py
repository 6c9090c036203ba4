"""Every file the project writes goes through m2ae_infer.atomic: a failure mid-write (or an interrupt) leaves
the target as it was (absent, or the old complete file) and no temporary file behind."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from helpers import random_net

from m2ae_infer import atomic
from m2ae_infer.atomic import TEMP_PREFIX, atomic_path, atomic_write


def _image(path: Path) -> None:
    from m2ae_infer.imgsave import save_image
    save_image(np.zeros((4, 5, 3), np.uint8), path, overwrite=True)


def _checkpoint(path: Path) -> None:
    from m2ae_infer.checkpoint import save_checkpoint
    save_checkpoint(random_net("tiny"), path, overwrite=True)


def _train_state(path: Path) -> None:
    from m2ae_infer import train
    net = random_net("tiny")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    train._save_state(path.parent, net, opt, sched, {"steps": 1}, 1, {"stopped": "test"})


def _eval_json(path: Path) -> None:
    from m2ae_infer import evaluate
    evaluate._write_json({"psnr": 30.0, "bad": float("nan")}, path, overwrite=True)


def _eval_grid(path: Path) -> None:
    from m2ae_infer import evaluate
    evaluate._write_grid([[np.zeros((8, 8, 3), np.float32)] * 5], path, overwrite=True)


def _onnx(path: Path) -> None:
    pytest.importorskip("onnx")
    from m2ae_infer.export.onnx import write_atomic
    write_atomic(path, b"\x08\x07" * 100, force=True)


def _mask(path: Path) -> None:
    from m2ae_infer.imgsave import mask_to_image, save_image
    save_image(mask_to_image(torch.ones(3, 3, dtype=torch.bool)), path, overwrite=True)


# writer -> the file name it writes (the train state also writes last.pth after last_state.pt)
WRITERS: dict[str, tuple[Callable[[Path], None], str]] = {
    "image-png": (_image, "out.png"),
    "image-jpg": (_image, "out.jpg"),
    "mask-png": (_mask, "out_mask.png"),
    "checkpoint-pth": (_checkpoint, "net.pth"),
    "checkpoint-safetensors": (_checkpoint, "net.safetensors"),
    "train-state": (_train_state, "last_state.pt"),
    "eval-json": (_eval_json, "eval.json"),
    "eval-grid": (_eval_grid, "eval_grid.png"),
    "export-onnx": (_onnx, "net.onnx"),
}


def _temp_files(folder: Path) -> list[str]:
    return [p for p in os.listdir(folder) if p.startswith(TEMP_PREFIX)]


@pytest.mark.parametrize("writer", WRITERS)
def test_writer_succeeds_without_leftovers(tmp_path, writer):
    write, name = WRITERS[writer]
    write(tmp_path / name)
    assert (tmp_path / name).stat().st_size > 0
    assert _temp_files(tmp_path) == []


@pytest.mark.parametrize("failure", ["fsync", "replace", "interrupt"])
@pytest.mark.parametrize("writer", WRITERS)
def test_failure_mid_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch, writer, failure):
    write, name = WRITERS[writer]
    target = tmp_path / name
    target.write_bytes(b"old complete file")
    before = sorted(os.listdir(tmp_path))
    error = KeyboardInterrupt if failure == "interrupt" else OSError

    def broken(*args, **kwargs):
        raise error(28, "No space left on device") if error is OSError else error()

    # fsync runs after every byte is in the temp file, replace is the publishing step: a failure at
    # either point, or an interrupt, must leave the old target and no temp file.
    monkeypatch.setattr(atomic.os, "fsync" if failure != "replace" else "replace", broken)
    with pytest.raises((error, ValueError)):  # library writers wrap OSError in their one-line errors
        write(target)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == before
    assert target.read_bytes() == b"old complete file"


def test_atomic_write_exception_inside_block(tmp_path):
    target = tmp_path / "x.json"
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as f:
            f.write('{"half": ')
            raise RuntimeError("writer crashed")
    assert os.listdir(tmp_path) == []


def test_atomic_write_text_and_no_clobber(tmp_path):
    target = tmp_path / "r.json"
    with atomic_write(target, "w") as f:
        json.dump({"a": 1}, f)
    assert json.loads(target.read_text()) == {"a": 1}
    with pytest.raises(FileExistsError):
        with atomic_write(target, "w") as f:
            f.write("{}")
    assert json.loads(target.read_text()) == {"a": 1} and _temp_files(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_no_clobber_when_the_target_appears_while_writing(tmp_path):
    target = tmp_path / "x.bin"
    with pytest.raises(FileExistsError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"new")
            target.write_bytes(b"someone else's")   # appears between the check and the publish
    assert target.read_bytes() == b"someone else's" and _temp_files(tmp_path) == []


def test_missing_folder_is_an_os_error(tmp_path):
    with pytest.raises(OSError):
        with atomic_write(tmp_path / "no" / "x.bin") as f:
            f.write(b"x")
