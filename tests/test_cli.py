"""m2ae-deblur as users run it: a real subprocess, files and folders, one-line errors, exit codes."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from m2ae_infer import save_checkpoint
from helpers import random_net


def run_cli(*args, cwd):
    # The console script's module, run from a temp dir so nothing resolves against the repo root.
    proc = subprocess.run([sys.executable, "-m", "m2ae_infer.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_checkpoint(random_net("tiny", seed=31), root / "tiny.pth")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name, shape in [("a.png", (20, 30, 3)), ("b.png", (17, 9, 3)), ("gray.png", (12, 12))]:
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(photos / name)
    return root


def test_folder_in_folder_out_with_masks(workdir, tmp_path):
    code, out, err = run_cli(workdir / "photos", "-o", tmp_path / "out", "--checkpoint", workdir / "tiny.pth",
                             "--save-mask", cwd=tmp_path)
    assert code == 0, err
    for name, size in [("a", (30, 20)), ("b", (9, 17)), ("gray", (12, 12))]:
        restored, mask = Image.open(tmp_path / "out" / f"{name}.png"), Image.open(tmp_path / "out" / f"{name}_mask.png")
        assert restored.size == size and mask.size == size and mask.mode == "L"
        # Outside the saved mask the output equals the input byte for byte.
        keep = np.asarray(mask) == 0
        assert np.array_equal(np.asarray(restored)[keep], np.asarray(Image.open(workdir / "photos" / f"{name}.png"))[keep])
    assert "of pixels" in out and "GFLOP" in out and "saved" in out


def test_single_file_to_file_and_no_overwrite(workdir, tmp_path):
    target = tmp_path / "x.png"
    args = (workdir / "photos" / "a.png", "-o", target, "--checkpoint", workdir / "tiny.pth")
    assert run_cli(*args, cwd=tmp_path)[0] == 0 and target.exists()
    before = target.read_bytes()
    code, _, err = run_cli(*args, cwd=tmp_path)
    assert code == 1 and "exists" in err and "--force" in err and "Traceback" not in err
    assert target.read_bytes() == before
    assert run_cli(*args, "--force", cwd=tmp_path)[0] == 0


def test_output_equal_to_input_is_refused_even_with_force(workdir, tmp_path):
    src = tmp_path / "in.png"
    src.write_bytes((workdir / "photos" / "a.png").read_bytes())
    code, _, err = run_cli(src, "-o", src, "--force", "--checkpoint", workdir / "tiny.pth", cwd=tmp_path)
    assert code == 1 and "input itself" in err
    assert src.read_bytes() == (workdir / "photos" / "a.png").read_bytes()


def test_bad_files_in_a_batch_are_skipped_and_reported(workdir, tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "good.png").write_bytes((workdir / "photos" / "b.png").read_bytes())
    (mixed / "text.png").write_text("not an image")
    (mixed / "empty.jpg").write_bytes(b"")
    code, _, err = run_cli(mixed, tmp_path / "missing.png", "-o", tmp_path / "o", "--checkpoint",
                           workdir / "tiny.pth", cwd=tmp_path)
    assert code == 1 and "Traceback" not in err
    assert (tmp_path / "o" / "good.png").exists()
    assert not (tmp_path / "o" / "text.png").exists() and not (tmp_path / "o" / "empty.jpg").exists()
    assert "1 written, 3 failed" in err
    assert not [p for p in os.listdir(tmp_path / "o") if p.startswith(".tmp")]


@pytest.mark.parametrize("args,needle", [
    (["--checkpoint", "{tmp}/nope.pth"], "nope.pth"),
    (["--checkpoint", "{tmp}/garbage.pth"], "garbage.pth"),
    (["--threshold", "2"], "threshold"),
    (["--device", "cuda"], "CUDA"),
])
def test_setup_errors_are_one_line_exit_2(workdir, tmp_path, args, needle):
    (tmp_path / "garbage.pth").write_bytes(b"\x00" * 100)
    args = [a.format(tmp=tmp_path) for a in args]
    if "--checkpoint" not in args:
        args += ["--checkpoint", str(workdir / "tiny.pth")]
    code, _, err = run_cli(workdir / "photos" / "a.png", "-o", tmp_path / "o", *args, cwd=tmp_path)
    assert code == 2 and needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_usage_errors_exit_2(tmp_path):
    assert run_cli(cwd=tmp_path)[0] == 2
    assert run_cli("x.png", cwd=tmp_path)[0] == 2
