"""What gets installed: one import namespace, `m2ae_infer`, with kernels/export/benchmarks inside it."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = out.glob("m2ae_infer-*.whl")
    return path


def test_wheel_has_one_top_level_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"m2ae_infer"}
    for module in ("kernels/reference.py", "export/__init__.py", "benchmarks/latency.py", "assets/example_blurry.png"):
        assert f"m2ae_infer/{module}" in names


def test_wheel_declares_console_script(wheel):
    zf = zipfile.ZipFile(wheel)
    (entry,) = [n for n in zf.namelist() if n.endswith("entry_points.txt")]
    assert "m2ae-deblur = m2ae_infer.cli:main" in zf.read(entry).decode()


@pytest.mark.slow
def test_non_editable_install_imports_from_its_own_copy(wheel, tmp_path):
    """`pip install .` (a wheel) works on its own, away from the repo checkout."""
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    code = ("import m2ae_infer, m2ae_infer.kernels.reference as r; "
            "from m2ae_infer import Deblurrer, M2AEConfig, M2AENet, reparameterize_model, load_checkpoint, "
            "save_checkpoint; print(r.__file__)")
    proc = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().startswith(str(target))


def test_generic_names_are_not_importable():
    """`kernels`/`export`/`benchmarks` must not leak as top-level packages (from a neutral cwd)."""
    proc = subprocess.run([sys.executable, "-c", "import importlib.util as u; "
                           "print([n for n in ('kernels', 'export', 'benchmarks') if u.find_spec(n)])"],
                          cwd="/", capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr
