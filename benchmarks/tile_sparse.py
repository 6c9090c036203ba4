"""The torch executor's two sparse kernels against its dense body, and the cost model that picks between them.

    python -m m2ae_infer.benchmarks.tile_sparse [--resolution 720p] [--densities 0.05,0.2,0.5,0.8]
                                                [--kinds blobs,scattered] [--repeats 7] [--threads 0]
                                                [--precision fp32|bf16] [--checkpoint CKPT] [--out rows.json]

For each mask (given by the caller, so no mask prediction runs) five executor calls are timed alternately in one
process: dense, sparse with the per-pixel kernel, sparse with the tile kernel, sparse with the kernel the cost
model picks (``sparse_kernel="auto"``), and ``execution="auto"``; plus an empty mask (the floor every sparse call
pays: stem, buffer, output copy). It prints each call's median and spread, its ratio to dense, the tile area, and
the two cost constants this run implies: body time per active pixel (per-pixel kernel) and per pixel of tile
area (tile kernel), in units of the dense body's time per working pixel -- what ``m2ae_infer.executor``'s
``KERNEL_COSTS`` of that precision are set from (``--precision bf16``: the executor's bf16 opt-in, dense and sparse).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from ..atomic import write_json
from ..errors import M2AEError
from ..executor import TorchExecutor
from ..kernels.tiles import TILE, plan_tiles
from ..model.mask import working_mask
from .grid import parse_resolution
from .latency import time_interleaved
from .masks import working_density_mask

KERNELS = ("pixels", "tiles", "auto")


def measure(net, height: int, width: int, densities, kinds, repeats: int, precision: str = "fp32") -> list[dict]:
    executors = {k: TorchExecutor(net, sparse_kernel=k, precision=precision) for k in KERNELS}
    costs = executors["auto"].costs
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, height, width, generator=gen)
    empty = torch.zeros(1, 1, height, width, dtype=torch.bool)
    rows = []
    for kind in kinds:
        for density in densities:
            mask = working_density_mask(kind, height, width, density, seed=0)
            m = working_mask(mask)
            total, active = m.numel(), int(m.sum())
            area = plan_tiles(m, 0.0).tiles * TILE * TILE
            mixed = plan_tiles(m, costs.min_fill("auto"))
            calls = {"dense": lambda: executors["pixels"].run(image, mask, execution="dense"),
                     "floor": lambda: executors["pixels"].run(image, empty, execution="sparse"),
                     **{f"sparse_{k}": (lambda k=k: executors[k].run(image, mask, execution="sparse"))
                        for k in KERNELS},
                     "auto": lambda: executors["auto"].run(image, mask, execution="auto")}
            t = time_interleaved(calls, warmup=1, repeats=repeats)
            dense, floor = t["dense"].median, t["floor"].median
            body = max(dense - floor, 1e-9)
            chosen = executors["auto"].run(image, mask, execution="auto")
            rows.append({
                "kind": kind, "density": density, "active_fraction": active / total, "tile_area": area / total,
                **{f"{k}_ms": v.median * 1e3 for k, v in t.items()},
                **{f"{k}_spread": v.spread for k, v in t.items()},
                **{f"{k}_over_dense": t[k].median / dense for k in t if k != "dense"},
                "auto_runs": chosen.execution if chosen.execution == "dense" else
                             f"{chosen.tile_pixels / max(active, 1):.0%} tiled",
                "pixel_cost": (t["sparse_pixels"].median - floor) / body / max(active / total, 1e-9),
                "tile_cost": (t["sparse_tiles"].median - floor) / body / max(area / total, 1e-9),
                "model_auto_kernel": costs.body(mixed, total),
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    from ..checkpoint import load_checkpoint
    from ..reparam import reparameterize_model
    from ..shipped import DEFAULT_CHECKPOINT

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", default="720p", help="HxW or 480p/720p/1080p (default 720p)")
    parser.add_argument("--densities", default="0.05,0.2,0.5,0.8")
    parser.add_argument("--kinds", default="blobs,scattered")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    parser.add_argument("--write-costs", metavar="FILE", default=None,
                        help="write this run's median constants for --precision into FILE (JSON; other precisions "
                             "already there are kept); with M2AE_KERNEL_COSTS=FILE every torch executor uses them")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    height, width = parse_resolution(args.resolution)
    try:
        net = reparameterize_model(load_checkpoint(args.checkpoint or DEFAULT_CHECKPOINT))
        rows = measure(net, height, width, [float(d) for d in args.densities.split(",")], args.kinds.split(","),
                       args.repeats, args.precision)
    except M2AEError as exc:         # a bad checkpoint, or a bad M2AE_KERNEL_COSTS file: one line
        print(f"tile_sparse: error: {exc}", file=sys.stderr)
        return 2
    print(f"{height}x{width}, {args.precision}, {torch.get_num_threads()} threads, median of {args.repeats}, "
          "interleaved; ratios to the dense call")
    print("mask       active  tiles   dense_ms  floor  pixels  tiles   mixed   auto (runs)          "
          "pixel_cost tile_cost")
    for r in rows:
        print(f"{r['kind']:9s} {r['active_fraction']:6.3f} {r['tile_area']:6.3f} {r['dense_ms']:8.1f}  "
              f"{r['floor_over_dense']:.3f}  {r['sparse_pixels_over_dense']:.3f}   {r['sparse_tiles_over_dense']:.3f}  "
              f"{r['sparse_auto_over_dense']:.3f}   {r['auto_over_dense']:.3f} ({r['auto_runs']:13s})  "
              f"{r['pixel_cost']:6.2f}    {r['tile_cost']:6.2f}")
    usable = [r for r in rows if r["active_fraction"] >= 0.05]
    if usable:
        pixel = statistics.median(r["pixel_cost"] for r in usable)
        tile = statistics.median(r["tile_cost"] for r in usable)
        print(f"median pixel_cost {pixel:.2f}, median tile_cost {tile:.2f} (executor.KERNEL_COSTS[{args.precision!r}])")
        if args.write_costs:
            try:
                write_costs(args.write_costs, args.precision, pixel, tile)
            except ValueError as exc:
                print(f"tile_sparse: error: {exc}", file=sys.stderr)
                return 2
            print(f"wrote {args.write_costs}; M2AE_KERNEL_COSTS={args.write_costs} makes the torch executors use it")
    elif args.write_costs:
        print("tile_sparse: error: no mask of at least 5 % active, so no constants to write; add --densities",
              file=sys.stderr)
        return 2
    if args.out:
        write_json(args.out, rows)
    return 0


def write_costs(path: str, precision: str, pixel: float, tile: float) -> None:
    """Merge ``{precision: {pixel, tile}}`` into the JSON file ``path`` (``executor.kernel_costs`` reads it). A file
    there that is not such a table is left alone: ``ValueError``."""
    table = {}
    if Path(path).exists():
        try:
            table = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"--write-costs {path}: exists and is not a cost table ({exc}); give another file") from None
        if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
            raise ValueError(f"--write-costs {path}: exists and is not a cost table; give another file")
    table[precision] = {**table.get(precision, {}), "pixel": round(pixel, 3), "tile": round(tile, 3)}
    write_json(path, table)


if __name__ == "__main__":
    sys.exit(main())
