"""Writing a benchmark result: terminal table, ``results.md``, ``results.json``, ``results.csv``, ``dense.csv``,
``baselines.csv`` and plots.

Ratios of a sparse cell: ``headline`` = sparse / the fastest dense row of the same precision in the same case
(named in ``best dense``), ``own`` = sparse / its own backend's dense call, ``vs eager`` = sparse / torch eager
dense."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..atomic import atomic_write
from .grid import BenchResult

OUTPUT_FILES = ("results.md", "results.json", "results.csv", "dense.csv", "baselines.csv", "latency_ratio.png",
                "flop_ratio.png")


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


def _mask(r: dict) -> str:
    return r["mask"] if r["mask"] != "real" else f"real:{r['photo']}"[:9]


def _header(result: BenchResult) -> str:
    m = result.machine
    return (f"m2ae-bench: {m['cpu']}, {m['torch_threads']} torch threads, torch {m['torch']}"
            f"{', CUDA ' + m['cuda'] if m.get('cuda') else ''}; median of {result.settings.repeats} "
            "(spread = (max-min)/median); ratios are sparse/dense within this run; headline: against the fastest "
            "dense row of the same precision")


# (header, terminal width, the row's value as text): one list per table, rendered as text or markdown.
CELL_COLUMNS = [
    ("res", 6, lambda r: r["resolution"]), ("mask", 9, _mask), ("active", 7, lambda r: f"{r['active_fraction']:.1%}"),
    ("FLOP ratio", 10, lambda r: f"{r['flop_ratio']:.3f}"), ("backend", 13, lambda r: r["backend"]),
    ("prec", 5, lambda r: r["precision"]),
    ("dense ms", 9, lambda r: f"{r['dense_ms']:.1f}"), ("sparse ms", 9, lambda r: f"{r['sparse_ms']:.1f}"),
    ("own ratio", 9, lambda r: f"{r['latency_ratio']:.3f}"), ("vs eager", 8, lambda r: _fmt(r["eager_ratio"], ".3f")),
    ("best dense", 13, lambda r: r["headline_dense"]), ("headline", 8, lambda r: f"{r['headline_ratio']:.3f}"),
    ("spread d/s", 10, lambda r: f"{r['dense_spread']:.0%}/{r['sparse_spread']:.0%}"),
    ("tiled", 6, lambda r: f"{r['tiled_fraction']:.0%}"),
    ("auto runs", 9, lambda r: r["auto_picks"]), ("auto/best", 9, lambda r: f"{r['auto_headline_ratio']:.3f}"),
    ("auto/own", 8, lambda r: f"{r['auto_own_ratio']:.3f}"),
    ("peak MB d/s", 13, lambda r: f"{_fmt(r['dense_peak_mb'], '.0f')}/{_fmt(r['sparse_peak_mb'], '.0f')}"),
    ("max|s-d|", 9, lambda r: f"{r['max_abs_diff']:.1e}")]
DENSE_COLUMNS = [
    ("res", 6, lambda d: d["resolution"]), ("mask", 9, _mask), ("active", 7, lambda d: f"{d['active_fraction']:.1%}"),
    ("dense engine", 13, lambda d: d["engine"]), ("prec", 5, lambda d: d["precision"]),
    ("ms", 9, lambda d: f"{d['ms']:.1f}"), ("spread", 7, lambda d: f"{d['spread']:.0%}"),
    ("compile s", 9, lambda d: _fmt(d["compile_s"], ".1f")), ("max|d-eager|", 12, lambda d: f"{d['max_abs_vs_eager']:.1e}")]


def _render(rows: list[dict], columns, markdown: bool = False) -> list[str]:
    """A table of ``rows``: right-aligned text with a rule under the header, or markdown."""
    if markdown:
        return (["| " + " | ".join(c[0].replace("|", "\\|") for c in columns) + " |", "|---" * len(columns) + "|"]
                + ["| " + " | ".join(c[2](r) for c in columns) + " |" for r in rows])
    head = " ".join(f"{name:>{width}}" for name, width, _ in columns)
    return [head, "-" * len(head)] + [" ".join(f"{value(r):>{width}}" for _, width, value in columns) for r in rows]


DENSE_TITLE = "dense rows, same cases, same run (interleaved with the sparse cells):"


def table(result: BenchResult) -> str:
    """The terminal table: one line per cell, the dense rows, then the baselines."""
    lines = [_header(result), ""] + _render(result.rows, CELL_COLUMNS)
    if result.dense:
        lines += ["", DENSE_TITLE] + _render(result.dense, DENSE_COLUMNS)
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


def markdown(result: BenchResult) -> str:
    """``results.md``: the sparse cells with their headline ratio, then the dense rows, as markdown tables."""
    lines = [f"# {_header(result)}", ""] + _render(result.rows, CELL_COLUMNS, markdown=True)
    lines += ["", DENSE_TITLE, ""] + _render(result.dense, DENSE_COLUMNS, markdown=True)
    if result.skipped:
        lines += [""] + [f"- not run: {name}: {why}" for name, why in result.skipped.items()]
    return "\n".join(lines) + "\n"


def plot(result: BenchResult, path: Path, metric: str, overwrite: bool = False) -> None:
    """``metric`` (``headline_ratio``, ``latency_ratio`` or ``flop_ratio``) against the active fraction, with the
    ideal y = x."""
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
    if metric != "flop_ratio":
        ax.axhline(1.0, color="gray", lw=1, ls=":", label="dense")
    ax.set_xlabel("active fraction (working-grid pixels computed)")
    ax.set_ylabel({"headline_ratio": "latency sparse / fastest dense of its precision",
                   "latency_ratio": "latency sparse / its own dense", "flop_ratio": "FLOPs sparse / dense"}[metric])
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
    for name, data in (("results.md", markdown(result).encode()),
                       ("results.json", json.dumps(result.as_dict(), indent=2).encode()),
                       ("results.csv", _csv_bytes(result.rows)), ("dense.csv", _csv_bytes(result.dense)),
                       ("baselines.csv", _csv_bytes(result.baselines))):
        _write(out / name, data, overwrite)
        written.append(out / name)
    if plots and result.rows:
        for name, metric in (("latency_ratio", "headline_ratio"), ("flop_ratio", "flop_ratio")):
            plot(result, out / f"{name}.png", metric, overwrite)
            written.append(out / f"{name}.png")
    return written
