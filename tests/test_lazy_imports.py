"""Importing the package (and using the torch backend) never imports triton nor initializes CUDA."""
import subprocess
import sys


def test_import_and_torch_backend_do_not_touch_triton_or_cuda(tmp_path):
    code = (
        "import sys, numpy as np, torch\n"
        "import m2ae_infer, m2ae_infer.executor, m2ae_infer.triton_executor, m2ae_infer.kernels\n"
        "from m2ae_infer import Deblurrer\n"
        "Deblurrer(backend='torch', device='cpu').run(np.zeros((6, 8, 3), np.uint8))\n"
        "print(sorted(m for m in sys.modules if m == 'triton' or m.startswith('triton.')), "
        "torch.cuda.is_initialized())\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[] False"


def test_console_script_modules_import_without_torch():
    """Every console script imports its module (and the package) before ``main`` and its Ctrl-C handler run: that
    stays light, so a Ctrl-C in the first second is one line, not a traceback from inside ``import torch``."""
    code = ("import sys\n"
            "import m2ae_infer, m2ae_infer.cli, m2ae_infer.export.cli, m2ae_infer.evaluate, m2ae_infer.cliutil\n"
            "print(sorted(m for m in ('torch', 'PIL', 'onnx', 'onnxruntime') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
