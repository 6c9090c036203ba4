"""``m2ae-export CKPT -o OUT``: export a checkpoint to ONNX (dense or sparse graph), verify it, optionally
build a TensorRT engine.

Steps: load the checkpoint (safe loading) -> re-parameterize -> export (dynamic H/W, batch 1) ->
``onnx.checker`` -> run in ONNX Runtime on the bundled example photo and an odd-sized crop of it, compared
with the torch deploy network in the same mode (max |diff| printed; fp32 <= 1e-4, fp16 <= 1e-2) -> write
atomically. ``--trt`` then builds ``OUT.engine`` from that ONNX (dense graph unless ``--sparse``) and prints
the equivalent ``trtexec`` command; without TensorRT the ONNX is still written and the exit code is 1.

Exit codes: 0 written (and verified); 1 export, verification or engine build failed, or TensorRT missing;
2 usage error or unloadable checkpoint; 130 interrupted (Ctrl-C: one line, no partial file, outputs being atomic).
Errors are one line, never a traceback.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..cliutil import (OneLineArgumentParser, cli_main, cli_message, dilation_arg, path_arg, say, stop_if_interrupted,
                       threshold_arg, writable_folder)
from ..messages import one_line, shown

PROG = "m2ae-export"


def _shape(text: str) -> tuple[int, int]:
    from .trt import MAX_SIDE   # tensorrt itself loads only when an engine is built
    found = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not found:
        raise argparse.ArgumentTypeError(f"{text!r} is not HxW (e.g. 720x1280)")
    shape = int(found.group(1)), int(found.group(2))
    if max(shape) > MAX_SIDE:
        raise argparse.ArgumentTypeError(f"{text} has a side above {MAX_SIDE} pixels, the most an engine of this "
                                         "network can take (larger ones exceed TensorRT's 2**31 elements a "
                                         "tensor); larger images run in tiles")
    return shape


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog=PROG, description=(
        "Export an M2AENet checkpoint to ONNX (and a TensorRT engine), verified against torch."))
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint (.pth/.safetensors), training or deploy form")
    p.add_argument("-o", "--output", metavar="OUT", type=path_arg,
                   help="OUT.onnx (with --trt the engine goes to OUT.engine), or OUT.engine/.plan with --trt; "
                        "default: beside CKPT with its name (ckpt.pth -> ckpt.onnx, ckpt.engine)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    fmt = p.add_argument_group("formats")
    fmt.add_argument("--onnx", action="store_true", help="write the ONNX graph (the default)")
    fmt.add_argument("--trt", action="store_true", help="also build a TensorRT engine (needs TensorRT and a GPU)")
    graph = p.add_argument_group("graph")
    kind = graph.add_mutually_exclusive_group()
    kind.add_argument("--sparse", dest="kind", action="store_const", const="sparse",
                      help="active pixels only: NonZero/Gather/MatMul/ScatterND (default without --trt)")
    kind.add_argument("--dense", dest="kind", action="store_const", const="dense",
                      help="convolutions everywhere, gated by the mask (default with --trt)")
    graph.add_argument("--mask-input", action="store_true",
                       help="the graph takes mask [1,1,H,W] bool instead of predicting it")
    graph.add_argument("--threshold", type=threshold_arg, help="blur probability threshold (default 0.5; not with "
                                                            "--mask-input)")
    graph.add_argument("--dilation", type=dilation_arg, help="grow the predicted mask by N working pixels (default 0; not "
                                                    "with --mask-input)")
    graph.add_argument("--fp16", action="store_true", help="compute in float16 (inputs/outputs stay float32)")
    graph.add_argument("--opset", type=int, default=18, help="ONNX opset, 18..24 (default 18)")
    trt = p.add_argument_group("TensorRT optimization profile (image H x W)")
    trt.add_argument("--min-shape", type=_shape, metavar="HxW", help="smallest image (default 32x32)")
    trt.add_argument("--opt-shape", type=_shape, metavar="HxW", help="tuned-for image (default 720x1280)")
    trt.add_argument("--max-shape", type=_shape, metavar="HxW", help="largest image (default 2160x3840)")
    return p


def plan_paths(output: str, trt: bool) -> tuple[Path, Path | None]:
    """(ONNX path, engine path or None) from ``-o``; ValueError for a suffix that fits neither."""
    out = Path(output)
    suffix = out.suffix.lower()
    if suffix == ".onnx":
        return out, out.with_suffix(".engine") if trt else None
    if trt and suffix in (".engine", ".plan"):
        return out.with_suffix(".onnx"), out
    wanted = ".onnx, .engine or .plan" if trt else ".onnx"
    raise ValueError(f"{output}: the output must end in {wanted}")


@cli_main(PROG)
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    shapes = {k: getattr(args, f"{k}_shape") for k in ("min", "opt", "max")}
    if not args.trt and any(shapes.values()):
        parser.error("--min-shape/--opt-shape/--max-shape describe the TensorRT engine: add --trt")
    if args.mask_input and (args.threshold is not None or args.dilation is not None):
        parser.error("--threshold/--dilation shape the predicted mask; a --mask-input graph takes your mask as it "
                     "is: drop them")
    args.threshold = 0.5 if args.threshold is None else args.threshold
    args.dilation = 0 if args.dilation is None else args.dilation
    from .onnx import MAX_OPSET, MIN_OPSET   # torch loads here (a second or two)
    if not MIN_OPSET <= args.opset <= MAX_OPSET:
        parser.error(f"--opset must lie in {MIN_OPSET}..{MAX_OPSET}, got {args.opset}")
    kind = args.kind or ("dense" if args.trt else "sparse")
    output = args.output or str(Path(args.checkpoint).with_suffix(".onnx"))
    try:
        onnx_path, engine_path = plan_paths(output, args.trt)
        for path in (onnx_path, engine_path):
            if path is not None and path.exists() and not args.force:
                raise ValueError(f"{shown(path)} exists; pass --force to overwrite it")
            if path is not None and not path.parent.is_dir():
                blocker = next((p for p in path.parents if p.exists()), None)
                if blocker is not None and not blocker.is_dir():
                    raise ValueError(f"{shown(path)}: {shown(blocker)} is a file, not a folder; choose another -o")
                raise ValueError(f"{shown(path)}: folder {shown(path.parent)} does not exist; create it first")
            if path is not None:   # before the export and its checks, not after them
                writable_folder(path.parent, fix="choose a writable folder with -o")
        profile = None
        if args.trt:
            from .trt import Profile
            profile = Profile(**{k: v for k, v in shapes.items() if v})
        _require_onnx()
        from ..checkpoint import CheckpointError, load_checkpoint
        from ..reparam import reparameterize_model
        from .onnx import GraphSpec
        spec = GraphSpec(kind, args.mask_input, args.threshold, args.dilation, args.fp16, args.opset)
        try:
            net = reparameterize_model(load_checkpoint(args.checkpoint))
        except CheckpointError as exc:
            raise ValueError(str(exc)) from None
    except ValueError as exc:
        say(f"{PROG}: error: {one_line(exc)}", sys.stderr)
        return 2
    return _export(net, spec, onnx_path, engine_path, profile, args.force)


def _require_onnx() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"export needs {', '.join(missing)}: pip install 'm2ae-infer[onnx]'")


def _export(net, spec, onnx_path: Path, engine_path: Path | None, profile, force: bool) -> int:
    from .onnx import ExportError, example_inputs, export_onnx, op_counts, raise_if_interrupted, save_onnx, verify_onnx

    say(f"exporting the {spec.kind} graph ({spec.precision}, opset {spec.opset}, "
        f"{'mask input' if spec.mask_input else f'predicted mask, threshold {spec.threshold}'}) ...")
    try:
        model = export_onnx(net, spec)
    except ExportError as exc:
        say(f"{PROG}: error: {exc}", sys.stderr)
        return 1
    say("onnx.checker: ok; ops: " + ", ".join(f"{op} {n}" for op, n in sorted(op_counts(model).items())))
    try:
        results = verify_onnx(model, net, example_inputs(), spec)
    except Exception as exc:   # an ONNX Runtime failure is a failed verification, reported in one line
        raise_if_interrupted(exc)
        say(f"{PROG}: error: ONNX Runtime could not run the graph: {one_line(exc, 400)}",
            sys.stderr)
        return 1
    code = _write_if_verified(results, "onnxruntime", onnx_path, lambda: save_onnx(model, onnx_path, force))
    if code or engine_path is None:
        return code
    return _engine(net, spec, model, engine_path, profile, force, onnx_path)


def _write_if_verified(results, backend: str, path: Path, write) -> int:
    """Print the verification lines; call ``write`` (atomic) only if every check passed. Returns the exit code."""
    stop_if_interrupted()   # a Ctrl-C during the export that torch swallowed still stops it here, unwritten
    for result in results:
        say(result.line(backend))
    if not all(r.passed for r in results):
        say(f"{PROG}: error: {backend} disagrees with torch beyond tolerance; {shown(path)} not written", sys.stderr)
        return 1
    try:
        write()
    except OSError as exc:   # an OutputExistsError (the file appeared meanwhile) is worded with --force
        say(f"{PROG}: error: cannot write {shown(path)}: {cli_message(exc)}", sys.stderr)
        return 1
    say(f"wrote {shown(path)} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def _engine(net, spec, model, engine_path: Path, profile, force: bool, onnx_path: Path) -> int:
    from .onnx import example_inputs, raise_if_interrupted, verify_runner, write_atomic
    from .trt import EngineRunner, TensorRTUnavailable, build_engine, trtexec_command, unavailable_reason

    say("equivalent trtexec command:\n  " + trtexec_command(str(onnx_path), str(engine_path), profile, spec))
    if spec.kind == "sparse":
        say("note: the sparse graph has data-dependent shapes (NonZero) in TensorRT: a host sync per NonZero "
            "and no CUDA-graph capture; the dense graph is the default for TensorRT")
    reason = unavailable_reason()
    if reason:
        say(f"{PROG}: error: no engine built: {reason}; run the trtexec command above on a GPU machine",
            sys.stderr)
        return 1
    import torch

    try:
        engine = build_engine(model.SerializeToString(), profile, spec)
        runner = EngineRunner(engine, torch.device("cuda"))
    except TensorRTUnavailable as exc:
        say(f"{PROG}: error: {exc}", sys.stderr)
        return 1

    def run(image, mask):
        feeds = {"image": image} if mask is None else {"image": image, "mask": mask}
        outputs = runner(feeds)
        return [outputs[name] for name in spec.output_names]

    images = [item if profile.covers(*item[1].shape[-2:]) else _tile(item, profile.opt) for item in example_inputs()]
    # The reference stays the torch network on the CPU: exact fp32 (torch on CUDA would use TF32 convolutions).
    try:
        results = verify_runner(run, net, images, spec)
    except Exception as exc:   # a runtime failure of the engine is a failed verification, one line
        raise_if_interrupted(exc)
        say(f"{PROG}: error: the TensorRT engine failed to run: {one_line(exc, 400)}",
            sys.stderr)
        return 1
    return _write_if_verified(results, "tensorrt", engine_path, lambda: write_atomic(engine_path, engine, force))


def _tile(item, size: tuple[int, int]):
    """An example outside the engine's profile, tiled and cropped to ``size`` (the profile's opt shape)."""
    label, image, mask = item
    reps = (1, 1, -(-size[0] // image.shape[-2]), -(-size[1] // image.shape[-1]))
    crop = (..., slice(0, size[0]), slice(0, size[1]))
    return f"{label}[tiled]", image.repeat(*reps)[crop].contiguous(), mask.repeat(*reps)[crop].contiguous()


if __name__ == "__main__":
    sys.exit(main())
