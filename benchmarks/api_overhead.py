"""What the API adds on top of its executor: ``Deblurrer.run`` with and without ``return_info`` (docs/performance.md).

    python -m m2ae_infer.benchmarks.api_overhead [--resolution 480x720] [--densities 0.05,0.2]
                                                 [--repeats 9] [--threads 2] [--checkpoint CKPT]

For each density (a blob mask given by the caller, sparse execution) three calls are timed alternately in one
process: the executor alone (``executor.run`` on the prepared tensor), ``run(img, mask=m)`` and
``run(img, mask=m, return_info=True)``; the medians, spreads and the ratios info/no-info and API/executor are
printed, plus what a ``FlopCounterMode`` wrapped around each API call counts (it must be the same: the cost
model's counting never shows there).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from ..atomic import write_json
from .grid import parse_resolution
from .latency import time_interleaved
from .masks import working_density_mask


def measure(deblurrer, height: int, width: int, densities, repeats: int) -> list[dict]:
    from torch.utils.flop_counter import FlopCounterMode

    rng = np.random.default_rng(0)
    image = rng.random((height, width, 3), dtype=np.float32)
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
    rows = []
    for density in densities:
        mask_t = working_density_mask("blobs", height, width, density, seed=0)     # [1, 1, H, W] bool
        mask = mask_t[0, 0].numpy()
        calls = {
            "executor": lambda: deblurrer.executor.run(tensor, mask_t, execution="sparse"),
            "api": lambda: deblurrer.run(image, mask=mask),
            "api_info": lambda: deblurrer.run(image, mask=mask, return_info=True),
        }
        counted = {}
        for name in ("api", "api_info"):
            counter = FlopCounterMode(display=False)
            with counter:
                calls[name]()
            counted[name] = int(counter.get_total_flops())
        t = time_interleaved(calls, warmup=1, repeats=repeats)
        _, info = deblurrer.run(image, mask=mask, return_info=True)
        rows.append({
            "density": density, "active_fraction": info.active_fraction,
            **{f"{k}_ms": v.median * 1e3 for k, v in t.items()},
            **{f"{k}_spread": v.spread for k, v in t.items()},
            "info_over_no_info": t["api_info"].median / t["api"].median,
            "api_over_executor": t["api"].median / t["executor"].median,
            "api_info_over_executor": t["api_info"].median / t["executor"].median,
            "flops_reported": info.flops_executed,
            "flops_user_counter_no_info": counted["api"], "flops_user_counter_info": counted["api_info"],
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    from ..api import Deblurrer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", default="480x720", help="HxW or 480p/720p/1080p (default 480x720)")
    parser.add_argument("--densities", default="0.05,0.2,0.5")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    height, width = parse_resolution(args.resolution)
    deblurrer = Deblurrer(args.checkpoint, device="cpu", execution="sparse", tile=0)
    rows = measure(deblurrer, height, width, [float(d) for d in args.densities.split(",")], args.repeats)
    print(f"{height}x{width}, {torch.get_num_threads()} threads, median of {args.repeats}, interleaved")
    print("density  executor_ms  api_ms  api_info_ms  info/no-info  api/executor  api_info/executor  "
          "user-counter FLOPs equal")
    for r in rows:
        same = r["flops_user_counter_no_info"] == r["flops_user_counter_info"]
        print(f"{r['density']:7.2f}  {r['executor_ms']:11.1f}  {r['api_ms']:6.1f}  {r['api_info_ms']:11.1f}  "
              f"{r['info_over_no_info']:12.3f}  {r['api_over_executor']:12.3f}  {r['api_info_over_executor']:17.3f}  "
              f"{same}")
    if args.out:
        write_json(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
