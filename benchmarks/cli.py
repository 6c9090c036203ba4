"""``m2ae-bench``: FLOPs and latency of sparse vs dense execution, per backend, over densities and resolutions.

Writes a terminal table, ``results.md``, ``results.json``, ``results.csv``, ``dense.csv``, ``baselines.csv`` and two
plots into ``--out``. Each sparse cell's headline ratio is against the fastest dense row of its precision in the
same run (``--dense-baselines``).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import fields, replace
from pathlib import Path

from ..cliutil import OneLineArgumentParser, check_device, device_arg, path_arg, say, writable_folder
from ..messages import one_line
from .baselines import BASELINES, DENSE_ENGINES
from .grid import BACKENDS, MASK_SOURCES, QUICK, RESOLUTIONS, TORCH_VARIANTS, BenchSettings, run_grid


def _list(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _densities(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v[:-1]) / 100 if v.endswith("%") else float(v) for v in (s.strip() for s in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"densities must be numbers in 0..1 or percentages, got {text!r}") from None
    return values


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="m2ae-bench", description=__doc__.split("\n")[0],
        epilog="Ratios are taken within one run (same process, same threads); absolute CPU times drift between "
               "runs on shared machines. Defaults: 480p,720p,1080p x 8 densities x blobs,scattered,real x every "
               "backend that runs here.")
    p.add_argument("--quick", action="store_true",
                   help=f"small grid ({','.join(QUICK.resolutions)}, densities "
                        f"{','.join(map(str, QUICK.densities))}, masks {','.join(QUICK.masks)}): under 2 minutes "
                        "on 2 CPU cores; options given explicitly still apply")
    p.add_argument("--out", type=lambda text: Path(path_arg(text)), default=Path("m2ae_bench"),
                   help="output folder (default: ./m2ae_bench)")
    p.add_argument("--force", action="store_true", help="replace result files already in --out")
    g = p.add_argument_group("grid")
    g.add_argument("--resolutions", type=_list, help=f"names ({', '.join(RESOLUTIONS)}) or HxW, comma-separated")
    g.add_argument("--densities", type=_densities, help="working-grid active fractions, e.g. 0.05,0.2 or 5%%,20%%")
    g.add_argument("--masks", type=_list, help=f"mask sources, comma-separated: {', '.join(MASK_SOURCES)} "
                                               "(real: the mask predictor on real photos)")
    g.add_argument("--backends", type=_list, help=f"comma-separated from {', '.join(BACKENDS)} "
                                                  "(name:bf16: that engine's bf16 opt-in; default: every one "
                                                  f"that runs here), or {', '.join(TORCH_VARIANTS)}: the torch "
                                                  "executor with one sparse kernel only, or with its compiled "
                                                  "dense path (its dense row is compile's)")
    g.add_argument("--dense-baselines", type=_list,
                   help=f"our network run dense by these engines too, each a row the sparse cells are compared "
                        f"with: {', '.join(DENSE_ENGINES)}, or 'none' (default: every one installed here but "
                        "compile, which costs 20-70 s of compilation per image size)")
    g.add_argument("--baselines", type=_list, help=f"dense baseline networks: {', '.join(BASELINES)}, or 'none'")
    m = p.add_argument_group("measurement")
    m.add_argument("--repeats", type=int, help="timed calls per measurement (default 5)")
    m.add_argument("--warmup", type=int, help="untimed calls first (default 1)")
    m.add_argument("--threads", type=int, help="torch / ONNX Runtime / OpenVINO threads (default: torch's choice, "
                                                "for all of them)")
    m.add_argument("--device", type=device_arg, help="cpu (default), cuda or cuda:N")
    m.add_argument("--checkpoint", help="checkpoint to benchmark (default: the shipped one)")
    m.add_argument("--no-memory", action="store_true", help="skip the peak-memory calls")
    m.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    return p


def settings_from(args: argparse.Namespace) -> BenchSettings:
    base = QUICK if args.quick else BenchSettings()
    given = {f.name: getattr(args, f.name) for f in fields(BenchSettings) if getattr(args, f.name, None) is not None}
    for name in ("baselines", "dense_baselines"):
        if given.get(name) == ("none",):
            given[name] = ()
    if args.no_memory:
        given["memory"] = False
    for name in given.get("baselines", ()):
        if name not in BASELINES:
            raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)} or 'none'")
    return replace(base, **given)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from(args)
    except ValueError as exc:
        parser.error(one_line(exc))
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")

    from . import report
    existing = report.existing_outputs(args.out)
    if existing and not args.force:
        say(f"m2ae-bench: error: {existing[0]} already exists; pass --force to replace it or choose another --out",
            sys.stderr)
        return 2
    if args.out.exists() and not args.out.is_dir():
        say(f"m2ae-bench: error: --out {args.out} is a file, not a folder", sys.stderr)
        return 2
    try:
        check_device(settings.device)
    except ValueError as exc:
        say(f"m2ae-bench: error: {one_line(exc)}", sys.stderr)
        return 2
    created = not args.out.exists()
    try:
        writable_folder(args.out, "--out ")
    except ValueError as exc:
        say(f"m2ae-bench: error: {exc}", sys.stderr)
        return 2

    def drop_empty_out() -> None:   # a failed run leaves no empty folder of ours behind
        if created:
            with contextlib.suppress(OSError):
                args.out.rmdir()

    import torch

    from ..api import Deblurrer
    from .latency import machine
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        net = Deblurrer(args.checkpoint, device=settings.device).network
        result = run_grid(net, settings, machine(), threads=args.threads, progress=True)
    except KeyboardInterrupt:
        drop_empty_out()
        say("m2ae-bench: interrupted; nothing written", sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as exc:
        drop_empty_out()
        say(f"m2ae-bench: error: {one_line(exc)}", sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    say(report.table(result))
    try:
        written = report.write(result, args.out, plots=not args.no_plots, overwrite=args.force)
    except OSError as exc:
        say(f"m2ae-bench: error: cannot write results to {args.out}: {one_line(exc)}", sys.stderr)
        return 1
    say("\nwrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
