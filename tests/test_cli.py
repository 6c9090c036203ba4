"""m2ae-deblur as users run it: a real subprocess, files and folders, one-line errors, exit codes."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from m2ae_infer import save_checkpoint
from helpers import random_net, shipped_tiling

OVERLAP, LEAST = shipped_tiling()   # the shipped network's tile overlap and the smallest --tile


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
@pytest.mark.slow
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


# ------------------------------------------------------------------------------- in-process cases
def deblur(capsys, *args):
    """main() in this process (no torch start-up per call): (exit code, stdout, stderr)."""
    from m2ae_infer.cli import main
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("source", ["gray16.png", "float.tif"])
@pytest.mark.parametrize("ext", [".webp", ".jpg", ".bmp", ".tga"])
def test_deep_input_to_8bit_format_fails_instead_of_clipping(workdir, tmp_path, capsys, source, ext):
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(256, 65536, (10, 12), dtype=np.uint16)).save(tmp_path / "gray16.png")
    Image.fromarray(rng.random((10, 12)).astype(np.float32)).save(tmp_path / "float.tif")
    code, _, err = deblur(capsys, tmp_path / source, "-o", tmp_path / f"out{ext}", "--checkpoint",
                          workdir / "tiny.pth")
    assert code == 1 and "Traceback" not in err
    assert "cannot store this" in err and "save as" in err and ".tif" in err.split("save as")[1]
    assert not (tmp_path / f"out{ext}").exists()


def test_a_failing_mask_leaves_the_users_files_alone(workdir, tmp_path, capsys):
    out = tmp_path / "sm"
    (out / "a_mask.png").mkdir(parents=True)
    (out / "a.png").write_bytes(b"USER")
    code, _, err = deblur(capsys, workdir / "photos" / "a.png", "-o", f"{out}/", "--save-mask", "--force",
                          "--checkpoint", workdir / "tiny.pth")
    assert code == 1 and "a_mask.png" in err and "Traceback" not in err
    assert (out / "a.png").read_bytes() == b"USER" and (out / "a_mask.png").is_dir()
    assert sorted(os.listdir(out)) == ["a.png", "a_mask.png"]


@pytest.mark.parametrize("name", ["x.gif", "x.ico", "x.ppm"])
def test_outputs_in_formats_we_do_not_write_are_refused_up_front(workdir, tmp_path, capsys, name):
    code, _, err = deblur(capsys, workdir / "photos" / "a.png", "-o", tmp_path / name, "--checkpoint",
                          workdir / "tiny.pth")
    assert code == 2 and ".png" in one_error_line(err)
    assert os.listdir(tmp_path) == []   # neither a file nor a folder of that name


def test_read_formats_and_output_names(workdir, tmp_path, capsys):
    """Folders yield every readable suffix; a format we do not write comes out as PNG with the
    unmasked pixels of Pillow's own decoding; TGA is written; a trailing slash makes a folder."""
    rng = np.random.default_rng(8)
    src = tmp_path / "src"
    src.mkdir()
    frames = [Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)) for _ in range(2)]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:])
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(src / "icon.ico", sizes=[(16, 16)])
    Image.fromarray(rng.integers(0, 256, (9, 7, 4), dtype=np.uint8)).save(src / "pic.tga")
    code, _, err = deblur(capsys, src, "-o", f"{tmp_path / 'out.png'}/", "--save-mask", "--checkpoint",
                          workdir / "tiny.pth")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "out.png")) == sorted(
        ["anim.png", "anim_mask.png", "icon.png", "icon_mask.png", "pic.tga", "pic_mask.png"])
    for name, out in [("anim.gif", "anim.png"), ("icon.ico", "icon.png"), ("pic.tga", "pic.tga")]:
        restored = Image.open(tmp_path / "out.png" / out)
        with Image.open(src / name) as ref:   # Pillow's own decoding (first frame) in the output's mode
            expected = np.array(ref.convert(restored.mode))
        got = np.array(restored)
        keep = np.array(Image.open(tmp_path / "out.png" / (Path(out).stem + "_mask.png"))) == 0
        assert got.shape == expected.shape and np.array_equal(got[keep], expected[keep]), name
    code, _, err = deblur(capsys, src / "pic.tga", "-o", tmp_path / "one.tga", "--checkpoint", workdir / "tiny.pth")
    assert code == 0 and (tmp_path / "one.tga").is_file(), err


@pytest.mark.slow
def test_closed_stdout_does_not_fail_written_files(workdir, tmp_path):
    # `m2ae-deblur ... | head -0`: the reader is gone before the first report line.
    proc = subprocess.Popen([sys.executable, "-m", "m2ae_infer.cli", workdir / "photos", "-o", tmp_path / "o",
                             "--checkpoint", workdir / "tiny.pth"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "failed" not in err and "Broken pipe" not in err and "Exception" not in err
    assert sorted(os.listdir(tmp_path / "o")) == ["a.png", "b.png", "gray.png"]


def test_example_with_other_inputs_keeps_their_names(workdir, tmp_path, capsys):
    code, _, err = deblur(capsys, "--example", workdir / "photos" / "b.png", "-o", tmp_path / "ex",
                          "--checkpoint", workdir / "tiny.pth")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "ex")) == ["b.png", "example_deblurred.png"]
    from m2ae_infer.cli import build_parser
    assert "m2ae_out" in build_parser().format_help()


@pytest.mark.parametrize("args,needles,banned", [
    (["--tile", "1"], ["--tile 1", str(LEAST)], []),
    (["--tile-overlap", "10"], ["--tile-overlap", str(OVERLAP)], ["tile_overlap"]),
    (["--tile-overlap", "-4"], ["--tile-overlap"], ["tile_overlap"]),
    (["--device", "meta"], ["--device", "cuda:N"], []),
    (["--device", "mps"], ["--device", "cuda:N"], []),
    (["--device", "cuda"], ["--device cpu"], ["device="]),
])
def test_setup_errors_name_the_flags(tmp_path, capsys, args, needles, banned):
    import torch
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    Image.fromarray(np.zeros((131, 257, 3), np.uint8)).save(tmp_path / "in.png")
    code, _, err = deblur(capsys, tmp_path / "in.png", "-o", tmp_path / "o", *args)
    line = one_error_line(err)
    assert code == 2 and all(n in line for n in needles) and not any(b in line for b in banned), line
    assert not (tmp_path / "o").exists()


def test_report_counts_savings_against_the_untiled_dense_run(tmp_path, capsys):
    """A tiled --full run costs more than the untiled dense run: the report must not call that a saving."""
    size = (max(131, LEAST + 8), max(257, LEAST + 40))
    Image.fromarray(np.random.default_rng(9).integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    code, out, err = deblur(capsys, tmp_path / "in.png", "-o", tmp_path / "o", "--tile", str(LEAST), "--full")
    assert code == 0, err
    assert "tiles" in out and "saved" not in out and "more, tile overlaps" in out
