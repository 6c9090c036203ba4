"""Sparse vs dense, one network, one machine, one run: FLOPs and latency ratios over mask densities.

``python -m m2ae_infer.benchmarks.density [--size 480x720] [--densities 0.05,0.2,0.5,1] [--repeats 5]``
prints a table; every ratio is taken within this run (same process, same threads).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from ..config import M2AEConfig
from ..executor import TorchExecutor
from ..model import M2AENet
from ..reparam import reparameterize_model
from .latency import machine, time_call
from .masks import MASK_KINDS, working_density_mask


def density_table(executor: TorchExecutor, height: int, width: int, densities, kind: str = "blobs",
                  repeats: int = 5, seed: int = 0) -> list[dict]:
    """One row per density: FLOPs (FlopCounterMode on the executed code) and median latencies."""
    image = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed))
    rows = []
    dense_flops = executor.count_flops(1, height, width, 0, "dense", predict_mask=False)
    for density in densities:
        mask = working_density_mask(kind, height, width, density, seed)
        active = executor.run(image, mask, execution="sparse").active_pixels
        dense = time_call(lambda: executor.run(image, mask, execution="dense"), repeats=repeats)
        sparse = time_call(lambda: executor.run(image, mask, execution="sparse"), repeats=repeats)
        auto = executor.choose("auto", active, ((height + 1) // 2) * ((width + 1) // 2))
        flops = executor.count_flops(1, height, width, active, "sparse", predict_mask=False)
        rows.append({"density": density, "mask": kind, "active_pixels": active, "flops_dense": dense_flops,
                     "flops_sparse": flops, "flop_ratio": flops / dense_flops,
                     "dense": dense.as_dict(), "sparse": sparse.as_dict(),
                     "latency_ratio": sparse.median / dense.median, "auto_picks": auto})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m m2ae_infer.benchmarks.density", description=__doc__.split("\n")[0])
    p.add_argument("--size", default="480x720", help="H x W of the input image (default 480x720)")
    p.add_argument("--densities", default="0.05,0.2,0.5,1.0", help="working-grid active fractions")
    p.add_argument("--mask", default="blobs", choices=MASK_KINDS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--config", default="default", help="M2AEConfig variant name")
    p.add_argument("--json", metavar="FILE", help="also write the rows and the machine as JSON")
    args = p.parse_args(argv)
    try:
        height, width = (int(v) for v in args.size.lower().split("x"))
        densities = [float(d) for d in args.densities.split(",")]
        config = M2AEConfig.from_name(args.config)
    except ValueError as exc:
        p.error(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)
    # Random weights: FLOPs and latency do not depend on the weight values, only on the mask.
    executor = TorchExecutor(reparameterize_model(M2AENet(config)))
    rows = density_table(executor, height, width, densities, args.mask, args.repeats)
    info = machine()
    print(f"{height}x{width}, config {args.config}, {args.mask} masks, {info['torch_threads']} threads, "
          f"median of {args.repeats} (spread = (max-min)/median)")
    print(f"{'density':>8} {'FLOP ratio':>10} {'dense ms':>9} {'sparse ms':>10} {'latency ratio':>13} {'auto':>6}")
    for r in rows:
        print(f"{r['density']:8.2f} {r['flop_ratio']:10.3f} {r['dense']['median'] * 1e3:9.1f} "
              f"{r['sparse']['median'] * 1e3:10.1f} {r['latency_ratio']:13.3f} {r['auto_picks']:>6}"
              f"   (spread dense {r['dense']['spread']:.0%}, sparse {r['sparse']['spread']:.0%})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
