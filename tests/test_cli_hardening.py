"""Issue 18, the command-line side: Ctrl-C is exit 130 and one line in every decorated CLI (m2ae-export above all,
which printed a KeyboardInterrupt traceback at every point tried), nothing partial is left, library errors are
worded for the CLI (``--force``, not ``overwrite=True``), and absurd TensorRT shapes are refused up front."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import types

import pytest
from helpers import random_net

from m2ae_infer import save_checkpoint
from m2ae_infer.atomic import OutputExistsError
from m2ae_infer.cliutil import cli_main, cli_message
from m2ae_infer.imgio import ImageError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    save_checkpoint(random_net("tiny", seed=7), path)
    return path


def test_cli_main_turns_ctrl_c_into_exit_130_and_one_line(capsys):
    @cli_main("m2ae-test")
    def main(argv=None) -> int:
        raise KeyboardInterrupt

    assert main([]) == 130
    captured = capsys.readouterr()
    assert captured.err == "m2ae-test: interrupted\n" and captured.out == ""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the handler is restored"


def test_cli_message_words_an_existing_output_with_force(tmp_path):
    """The API says overwrite=True; the CLI says --force, whether the error is the library's OutputExistsError or an
    ImageError caused by one (a file that appeared while the image ran)."""
    target = tmp_path / "x.png"
    direct = OutputExistsError(target)
    assert "overwrite=True" in str(direct)
    try:
        raise ImageError(str(direct)) from direct
    except ImageError as wrapped:
        for exc in (direct, wrapped):
            assert cli_message(exc) == f"{target} exists; pass --force to overwrite it"


def _export_cli(monkeypatch):
    from m2ae_infer.export import cli, onnx
    monkeypatch.setattr(onnx, "save_onnx", lambda *a, **k: pytest.fail("an interrupted export was written"))
    return cli, onnx


def test_export_interrupted_during_the_export(checkpoint, tmp_path, capsys, monkeypatch):
    cli, onnx = _export_cli(monkeypatch)

    def interrupted(net, spec):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx, "export_onnx", interrupted)
    assert cli.main([str(checkpoint), "-o", str(tmp_path / "x.onnx")]) == 130
    assert capsys.readouterr().err == "m2ae-export: interrupted\n" and os.listdir(tmp_path) == []


def test_export_interrupt_wrapped_by_torch_export_is_still_an_interrupt(checkpoint, tmp_path, capsys, monkeypatch):
    """torch.export turns a Ctrl-C inside its tracing into its own error (TorchExportError <- AttributeError <-
    KeyboardInterrupt): measured at 4.9 s into an export, which then ended as 'export failed', exit 1."""
    import torch
    cli, _ = _export_cli(monkeypatch)

    def wrapping(*args, **kwargs):
        try:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as interrupt:
                raise AttributeError("__torch_function__") from interrupt
        except AttributeError as inner:
            raise RuntimeError("Failed to export the model with torch.export") from inner

    monkeypatch.setattr(torch.onnx, "export", wrapping)
    assert cli.main([str(checkpoint), "-o", str(tmp_path / "x.onnx")]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "m2ae-export: interrupted" and "failed" not in err


def test_export_interrupt_swallowed_by_a_library_stops_before_writing(checkpoint, tmp_path, capsys, monkeypatch):
    """A Ctrl-C that torch handled and went on from (measured: 5 s into an export, which then wrote its file, exit 0)
    still stops the CLI before anything is written."""
    cli, onnx = _export_cli(monkeypatch)

    def swallowing(net, spec):
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass
        return object()

    passed = types.SimpleNamespace(passed=True, line=lambda backend: f"max |{backend} - torch| 0 (ok)")
    monkeypatch.setattr(onnx, "export_onnx", swallowing)
    monkeypatch.setattr(onnx, "op_counts", lambda model: {})
    monkeypatch.setattr(onnx, "verify_onnx", lambda *a, **k: [passed])
    assert cli.main([str(checkpoint), "-o", str(tmp_path / "x.onnx")]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "m2ae-export: interrupted"
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_export_ctrl_c_as_a_real_process(checkpoint, tmp_path):
    """SIGINT into a running ``m2ae-export`` once it prints that the export began: exit 130, one stderr line, no
    traceback, no file (it printed a traceback and died of SIGINT, exit -2)."""
    out = tmp_path / "x.onnx"
    proc = subprocess.Popen([sys.executable, "-m", "m2ae_infer.export.cli", str(checkpoint), "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        first = proc.stdout.readline()
        assert first.startswith("exporting the sparse graph"), first
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert stderr == "m2ae-export: interrupted\n" and "Traceback" not in stdout
    assert sorted(os.listdir(tmp_path)) == []


def test_eval_ctrl_c_is_exit_130_and_one_line(tmp_path, capsys, monkeypatch):
    pytest.importorskip("skimage")
    from m2ae_infer import evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "_make_samples", interrupted)
    assert evaluate.main(["--samples", "1", "--out", str(tmp_path / "ev"), "-q"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "m2ae-eval: interrupted"
    assert not (tmp_path / "ev" / "eval.json").exists()


@pytest.mark.parametrize("flag", ["--max-shape", "--opt-shape", "--min-shape"])
def test_absurd_tensorrt_shapes_are_refused_before_any_work(checkpoint, tmp_path, capsys, monkeypatch, flag):
    """Issue 18: ``--trt --max-shape 100000x100000`` was accepted (and the export ran before TensorRT failed)."""
    from m2ae_infer.export import cli
    monkeypatch.setattr(cli, "_export", lambda *a, **k: pytest.fail("exported"))
    with pytest.raises(SystemExit) as exit_:   # a usage error: argparse exits with 2, as for every bad option
        cli.main([str(checkpoint), "-o", str(tmp_path / "x.onnx"), "--trt", flag, "100000x100000"])
    code = exit_.value.code
    err = capsys.readouterr().err
    assert code == 2 and f"argument {flag}: 100000x100000 has a side above 8192 pixels" in err
    assert len(err.strip().splitlines()) == 1 and os.listdir(tmp_path) == []


def test_tensorrt_profile_refuses_sides_above_the_limit():
    from m2ae_infer.export.trt import MAX_SIDE, Profile
    Profile(max=(MAX_SIDE, MAX_SIDE))                      # the limit itself is fine
    with pytest.raises(ValueError, match="largest image side is 8192"):
        Profile(max=(MAX_SIDE + 1, 2000))


@pytest.mark.parametrize("launcher, prog", [("train", "m2ae-train"), ("bench", "m2ae-bench")])
def test_a_ctrl_c_while_the_cli_module_imports_is_exit_130_and_one_line(monkeypatch, capsys, launcher, prog):
    """m2ae-train and m2ae-bench import torch at the top of their modules (~1.5 s): their launchers catch a
    Ctrl-C that lands there."""
    import importlib
    from m2ae_infer import entry

    def interrupted(name):
        raise KeyboardInterrupt
    monkeypatch.setattr(importlib, "import_module", interrupted)
    assert getattr(entry, launcher)() == 130
    err = capsys.readouterr().err
    assert err == f"{prog}: interrupted\n"
