"""m2ae-deblur --ray and distributed.deblur_files on a local Ray cluster: the same bytes as the single-process
m2ae-deblur, bad files failing alone, worker deaths losing nothing, re-runs resuming, refusal rules kept.

One cluster for the module (2 CPUs, on 127.0.0.1); one test starts its own through ``--ray local``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="needs the ray extra: pip install -e '.[ray]'")
pytest.importorskip("skimage", reason="the test photos are crops of scikit-image's photos")

from PIL import Image  # noqa: E402

from m2ae_infer.benchmarks.ray_throughput import make_images  # noqa: E402
from m2ae_infer.distributed import deblur_files  # noqa: E402

pytestmark = pytest.mark.slow
GOOD = 10   # good inputs in the photos folder (6 crops + 4 other kinds)


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    # A cluster on 127.0.0.1 only (read when ray starts its processes; see distributed.LOOPBACK_ENV).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def run_cli(*args, cwd):
    proc = subprocess.run([sys.executable, "-m", "m2ae_infer.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of small photos of several kinds, one bad file, and the single-process m2ae-deblur outputs."""
    root = tmp_path_factory.mktemp("ray")
    folder = root / "in"
    make_images(folder, 6, seed=3, smallest=(48, 64), largest=(96, 128))
    rgb = np.asarray(Image.open(folder / "photo000.png").convert("RGB"))
    Image.fromarray(rgb).convert("L").save(folder / "gray.png")
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])
    Image.fromarray(rgba).save(folder / "alpha.png")
    Image.fromarray((rgb[..., 1].astype(np.uint16) * 257)).save(folder / "deep.png")   # 16-bit gray
    exif = Image.Exif()
    exif[0x0112] = 6   # orientation: rotated; the output is written upright
    Image.fromarray(rgb).save(folder / "turned.jpg", exif=exif.tobytes(), quality=92)
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    code, _, err = run_cli(folder, "-o", root / "ref", "-q", cwd=root)
    assert code == 1 and "bad.png" in err, err
    assert len(list((root / "ref").iterdir())) == GOOD
    return root


def assert_same_as_reference(out: Path, ref: Path, extra_ok=()):
    names = {p.name for p in ref.iterdir()}
    got = {p.name for p in out.iterdir()} - set(extra_ok)
    assert got == names, sorted(got ^ names)
    differ = [n for n in sorted(names) if (out / n).read_bytes() != (ref / n).read_bytes()]
    assert not differ, differ


def test_cli_ray_local_writes_the_bytes_of_the_single_process_cli(photos):
    code, out, err = run_cli("in", "-o", "cli", "--ray", "local", "--workers", "1", cwd=photos)
    assert code == 1, err
    assert_same_as_reference(photos / "cli", photos / "ref")
    lines = err.strip().splitlines()   # the progress bar shares stderr
    assert "m2ae-deblur: failed in/bad.png: in/bad.png: not an image" in err
    assert lines[-1] == f"m2ae-deblur: {GOOD} written, 0 skipped (complete), 1 failed: in/bad.png", lines
    assert "Traceback" not in err
    assert out.count(" -> ") == GOOD


def test_api_bad_file_fails_alone_and_a_rerun_skips_complete_outputs(photos, cluster):
    out = photos / "api"
    seen = []
    s = deblur_files([photos / "in"], out, workers=1, on_result=seen.append)
    assert sorted(s.written) == sorted(str(p) for p in (photos / "in").iterdir() if p.name != "bad.png")
    assert len(s.written) == GOOD and s.exit_code == 1 and not s.not_run
    assert [(Path(n).name, "not an image" in r) for n, r in s.failed] == [("bad.png", True)]
    assert {r.status for r in seen} == {"written", "failed"} and len(seen) == GOOD + 1
    info = s.info[str(photos / "in" / "photo001.png")]
    assert 0 <= info["active_fraction"] <= 1 and info["flops_executed"] <= info["flops_dense"]
    assert_same_as_reference(out, photos / "ref")

    good = sorted(p for p in (photos / "in").iterdir() if p.name != "bad.png")
    again = deblur_files(good, out, workers=1)
    assert again.written == [] and len(again.skipped) == GOOD and again.failed == [] and again.exit_code == 0
    assert again.workers == 0   # nothing left to run: no actor was started
    assert_same_as_reference(out, photos / "ref")


def test_refusal_rules_are_the_clis(photos, cluster, tmp_path):
    """An output that is its input is refused, never skipped, even with force; a folder, an empty file or a symlink
    in the way is refused, and half of an image+mask pair; complete outputs are skipped. (Nothing here reaches the
    workers: these are decided when the job is planned.)"""
    src = tmp_path / "in.png"
    src.write_bytes((photos / "in" / "photo002.png").read_bytes())
    s = deblur_files([src], src, force=True)
    assert [r for _, r in s.failed] == [f"output {src} is the input itself; choose another output"]
    assert s.exit_code == 1 and src.read_bytes() == (photos / "in" / "photo002.png").read_bytes()

    out = tmp_path / "out"
    out.mkdir()
    (out / "photo001.png").mkdir()                                     # a folder where an output goes
    (out / "photo002.png").write_bytes(b"")                            # an empty file: not a complete output
    (out / "photo003.png").symlink_to(tmp_path / "nowhere.png")        # a dangling symlink
    (out / "photo000.png").write_bytes(b"complete, as far as we know")  # skipped
    (out / "photo005.png").write_bytes((photos / "ref" / "photo005.png").read_bytes())   # image, no mask
    s = deblur_files([photos / "in" / f"photo00{i}.png" for i in (0, 1, 2, 3, 5)], out)
    reasons = {Path(n).name: r for n, r in s.failed}
    assert "is a folder" in reasons["photo001.png"] and "not a complete output" in reasons["photo002.png"]
    assert "not a complete output" in reasons["photo003.png"]
    assert [Path(p).name for p in s.skipped] == ["photo000.png", "photo005.png"] and s.written == []
    assert s.workers == 0 and len(s.failed) == 3
    s = deblur_files([photos / "in" / "photo005.png"], out, save_mask=True)
    assert [r for _, r in s.failed] == [f"{out / 'photo005.png'} exists; pass --force to overwrite it"]
    assert not (out / "photo005_mask.png").exists()


def test_worker_deaths_lose_nothing_and_write_each_output_once(photos, cluster, tmp_path):
    """With force over stale files: one worker dies with an output's bytes complete in its temporary file, another
    right after publishing one. The job completes, every output is there once, byte-identical, no temporary file is
    left, and the output published before the death is not written again."""
    good = sorted(p for p in (photos / "in").iterdir() if p.name != "bad.png")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("photo001.png", "alpha.png", "gray.png"):
        (out / name).write_bytes(b"stale")
    faults = [{"name": "photo001.png", "when": "publish", "marker": str(tmp_path / "died-1")},
              {"name": "alpha.png", "when": "return", "marker": str(tmp_path / "died-2")}]
    seen = {}
    s = deblur_files(good, out, workers=2, force=True, _faults=faults,
                     on_result=lambda r: seen.setdefault(Path(r.source).name, r))
    assert (tmp_path / "died-1").exists() and (tmp_path / "died-2").exists()   # both deaths happened
    assert s.worker_deaths == 2 and s.retried == 2 and s.exit_code == 0
    assert sorted(s.written) == sorted(map(str, good))   # each once
    assert seen["alpha.png"].message == "written before its worker died"   # published once, not rewritten
    assert_same_as_reference(out, photos / "ref")   # no stale bytes and no .tmp- leftovers either


def test_an_input_that_kills_its_worker_fails_alone_and_the_rerun_completes(photos, cluster, tmp_path):
    good = sorted(p for p in (photos / "in").iterdir() if p.name != "bad.png")
    faults = [{"name": "gray.png", "when": "publish", "marker": str(tmp_path / "died")}]
    s = deblur_files(good, tmp_path / "out", workers=1, retries=0, _faults=faults)
    assert s.exit_code == 1 and len(s.written) == GOOD - 1
    assert [(Path(n).name, r) for n, r in s.failed] == [
        ("gray.png", "its worker process died while deblurring it (1 time); run it alone to see why")]
    assert not (tmp_path / "out" / "gray.png").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp-")]
    again = deblur_files(good, tmp_path / "out", workers=1)
    assert [Path(p).name for p in again.written] == ["gray.png"] and len(again.skipped) == GOOD - 1
    assert again.exit_code == 0
    assert_same_as_reference(tmp_path / "out", photos / "ref")


def test_a_pool_larger_than_the_cluster_is_refused_before_running(photos, cluster, tmp_path):
    with pytest.raises(ValueError, match=r"4 workers x 1 threads need 4 CPUs; the cluster has 2 CPUs"):
        deblur_files([photos / "in" / "photo001.png", photos / "in" / "photo002.png"], tmp_path / "o", workers=4)
    assert not list((tmp_path / "o").iterdir())


@pytest.mark.parametrize("args, needle", [
    (["--ray", "in", "in/photo001.png", "-o", "x"], "--ray in: not a Ray address"),
    (["in", "-o", "x", "--workers", "2"], "--workers, --threads-per-worker and --gpus-per-worker need --ray"),
    (["in", "-o", "x", "--ray", "local", "--device", "cuda"], "needs GPUs given to them"),
    (["in", "-o", "x", "--ray", "local", "--workers", "0"], "workers (--workers) must be an integer >= 1"),
])
def test_cli_setup_errors_are_one_line_exit_2(photos, args, needle):
    code, out, err = run_cli(*args, cwd=photos)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_importing_the_modules_does_not_import_ray():
    code = "import sys, m2ae_infer.cli, m2ae_infer.distributed; print('ray' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr[-2000:]
