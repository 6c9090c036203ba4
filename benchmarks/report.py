"""Writing a benchmark result: terminal table, ``results.json``, ``results.csv``, ``baselines.csv`` and plots."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..atomic import atomic_write
from .grid import BenchResult

OUTPUT_FILES = ("results.json", "results.csv", "baselines.csv", "latency_ratio.png", "flop_ratio.png")


def _write(path: Path, data: bytes, overwrite: bool) -> None:
    with atomic_write(path, "wb", overwrite=overwrite) as f:     # never a half-written result file
        f.write(data)


def _csv_bytes(rows: list[dict]) -> bytes:
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue().encode()


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(result: BenchResult) -> str:
    """The terminal table: one line per cell, then the baselines."""
    m = result.machine
    lines = [f"m2ae-bench: {m['cpu']}, {m['torch_threads']} torch threads, torch {m['torch']}"
             f"{', CUDA ' + m['cuda'] if m.get('cuda') else ''}; median of {result.settings.repeats} "
             "(spread = (max-min)/median); ratios are sparse/dense within this run"]
    head = (f"{'res':>6} {'mask':>9} {'active':>7} {'FLOP ratio':>10} {'backend':>11} {'dense ms':>9} "
            f"{'sparse ms':>9} {'lat. ratio':>10} {'spread d/s':>10} {'auto':>6} {'peak MB d/s':>13} {'max|s-d|':>9}")
    lines += ["", head, "-" * len(head)]
    for r in result.rows:
        mask = r["mask"] if r["mask"] != "real" else f"real:{r['photo']}"[:9]
        spread = f"{r['dense_spread']:.0%}/{r['sparse_spread']:.0%}"
        peak = f"{_fmt(r['dense_peak_mb'], '.0f')}/{_fmt(r['sparse_peak_mb'], '.0f')}"
        lines.append(f"{r['resolution']:>6} {mask:>9} {r['active_fraction']:7.1%} {r['flop_ratio']:10.3f} "
                     f"{r['backend']:>11} {r['dense_ms']:9.1f} {r['sparse_ms']:9.1f} {r['latency_ratio']:10.3f} "
                     f"{spread:>10} {r['auto_picks']:>6} {peak:>13} {r['max_abs_diff']:9.1e}")
    if result.baselines:
        head = f"{'res':>6} {'network':>27} {'params':>9} {'GFLOP':>8} {'ms':>9} {'spread':>7} {'peak MB':>8}"
        lines += ["", "networks side by side, same run (ours: this checkpoint on the first real photo; NAFNet: random weights):", head, "-" * len(head)]
        for b in result.baselines:
            name = b["network"] + (f" @{b['active_fraction']:.0%}" if "sparse" in b["network"] else "")
            lines.append(f"{b['resolution']:>6} {name:>27} {b['params']:9d} {b['flops'] / 1e9:8.2f} {b['ms']:9.1f} "
                         f"{b['spread']:7.0%} {_fmt(b['peak_mb'], '8.0f')}")
    if result.kernels:
        head = f"{'C':>4} {'grid':>9} {'density':>8} {'dtype':>9} {'triton ms':>10} {'dense ms':>9} {'dense/triton':>12}"
        lines += ["", "Triton stage kernel vs dense cuDNN stage (triton.testing.do_bench):", head, "-" * len(head)]
        for k in result.kernels:
            lines.append(f"{k['channels']:4d} {k['height']:>4}x{k['width']:<4} {k['density']:8.2f} "
                         f"{str(k['dtype']).replace('torch.', ''):>9} {k['triton_stage_ms']:10.3f} "
                         f"{k['dense_stage_ms']:9.3f} {k['dense_over_triton']:12.2f}")
    if result.skipped:
        lines += [""] + [f"not run: {name}: {why}" for name, why in result.skipped.items()]
    return "\n".join(lines)


def plot(result: BenchResult, path: Path, metric: str, overwrite: bool = False) -> None:
    """``metric`` (``latency_ratio`` or ``flop_ratio``) against the active fraction, with the ideal y = x."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    groups: dict[tuple, list[dict]] = {}
    for r in result.rows:
        groups.setdefault((r["resolution"], r["backend"], r["mask"]), []).append(r)
    for (resolution, backend, mask), rows in groups.items():
        rows.sort(key=lambda r: r["active_fraction"])
        x, y = [r["active_fraction"] for r in rows], [r[metric] for r in rows]
        label = f"{backend} {resolution} {mask}"
        if mask == "real":
            ax.scatter(x, y, marker="*", s=90, label=label + " (predicted masks)", zorder=3)
        else:
            ax.plot(x, y, marker="o" if mask == "blobs" else "s", label=label)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="ideal: ratio = active fraction")
    if metric == "latency_ratio":
        ax.axhline(1.0, color="gray", lw=1, ls=":", label="dense")
    ax.set_xlabel("active fraction (working-grid pixels computed)")
    ax.set_ylabel({"latency_ratio": "latency sparse / dense", "flop_ratio": "FLOPs sparse / dense"}[metric])
    m = result.machine
    ax.set_title(f"{metric.replace('_', ' ')}: {m['torch_threads']} threads, median of {result.settings.repeats}",
                 fontsize=10)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    _write(path, buf.getvalue(), overwrite)


def existing_outputs(out: Path) -> list[Path]:
    return [out / name for name in OUTPUT_FILES if (out / name).exists()]


def write(result: BenchResult, out: Path, plots: bool = True, overwrite: bool = False) -> list[Path]:
    """Write the result files into ``out`` (created if missing); returns the paths written.

    Raises FileExistsError for a result file already there unless ``overwrite``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in (("results.json", json.dumps(result.as_dict(), indent=2).encode()),
                       ("results.csv", _csv_bytes(result.rows)), ("baselines.csv", _csv_bytes(result.baselines))):
        _write(out / name, data, overwrite)
        written.append(out / name)
    if plots and result.rows:
        for metric in ("latency_ratio", "flop_ratio"):
            plot(result, out / f"{metric}.png", metric, overwrite)
            written.append(out / f"{metric}.png")
    return written
