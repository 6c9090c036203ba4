"""The benchmark grid: mask densities x resolutions x backends, dense vs sparse, measured side by side.

Per case (one image and mask) every backend runs dense and sparse, and every dense engine of
:data:`~.baselines.DENSE_ENGINES` asked for (torch eager, ``torch.compile``, OpenVINO f32/bf16, ONNX Runtime)
runs dense, all timed alternately in one process (:func:`~.latency.time_interleaved`, a short pause between
calls so that thread pools do not fight), so each ratio is taken within the run. Each sparse cell reports its
ratio to its own backend's dense call, to torch eager dense, and the headline: to the fastest dense row of the
same precision in that case (:func:`~.baselines.fastest_dense`). FLOPs are counted by
``torch.utils.flop_counter.FlopCounterMode`` on the code that runs (``executor.count_flops``; the ONNX and
TensorRT graphs compute the same GEMMs and convolutions as the torch code they were exported from).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch

from ..api import Deblurrer
from ..backends import Backend, backend_entry, make_backend
from ..cliutil import progress_stream
from ..flops import count_isolated
from ..model import M2AENet
from ..model.mask import pad_to_even
from ..reparam import reparameterize_model
from .baselines import (DEFAULT_BASELINES, DENSE_ENGINES, CompiledDense, build_baseline, default_dense_baselines,
                        dense_engine_name, fastest_dense, parameter_count)
from .latency import peak_memory, time_interleaved
from .masks import MASK_KINDS, working_density_mask
from .photos import real_photos

RESOLUTIONS = {"480p": (480, 854), "720p": (720, 1280), "1080p": (1080, 1920)}
# The bench's default order: registry names, ``name:bf16`` for an engine's bf16 opt-in.
BACKENDS = ("torch", "torch:bf16", "onnxruntime", "openvino", "openvino:bf16", "triton", "tensorrt")
# Opt-in variants of the torch executor: -> (its options, the dense row it shares). Its sparse kernels one at a time
# (``torch`` runs their mix, the default), and its opt-in compiled dense path, whose own dense call is the
# ``compile`` row (``--backends torch,torch/pixels,torch/tiles,torch/compile``).
TORCH_VARIANTS = {"torch/pixels": ({"sparse_kernel": "pixels"}, "eager"),
                  "torch/tiles": ({"sparse_kernel": "tiles"}, "eager"),
                  "torch/compile": ({"compile_dense": True}, "compile")}
# Untimed seconds before each timed call when several engines share the run (see time_interleaved).
PAUSE = 0.03
MASK_SOURCES = (*MASK_KINDS, "real")
MB = 2 ** 20


def parse_resolution(name: str) -> tuple[int, int]:
    """``"720p"`` or ``"HxW"`` -> ``(H, W)``."""
    if name in RESOLUTIONS:
        return RESOLUTIONS[name]
    try:
        h, w = (int(v) for v in name.lower().split("x"))
    except ValueError:
        raise ValueError(f"resolution {name!r} is neither one of {list(RESOLUTIONS)} nor HxW (e.g. 720x1280)") from None
    if h < 2 or w < 2:
        raise ValueError(f"resolution {name!r} is too small; need at least 2x2")
    return h, w


@dataclass(frozen=True)
class BenchSettings:
    """What to measure. ``backends=None``: every backend that can run on this machine."""

    resolutions: tuple[str, ...] = ("480p", "720p", "1080p")
    densities: tuple[float, ...] = (0.01, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)
    masks: tuple[str, ...] = MASK_SOURCES
    backends: tuple[str, ...] | None = None
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    dense_baselines: tuple[str, ...] | None = None   # dense rows (DENSE_ENGINES); None: default_dense_baselines()
    repeats: int = 5
    warmup: int = 1
    device: str = "cpu"
    memory: bool = True
    photos: int | None = None       # real photos per resolution (None: all of photos.blurred_photos)
    seed: int = 0

    def __post_init__(self):
        for r in self.resolutions:
            parse_resolution(r)
        bad = [m for m in self.masks if m not in MASK_SOURCES]
        if bad:
            raise ValueError(f"unknown mask source(s) {bad}; choose from {MASK_SOURCES}")
        if self.backends is not None and (bad := [b for b in self.backends if b not in (*BACKENDS, *TORCH_VARIANTS)]):
            raise ValueError(f"unknown backend(s) {bad}; choose from {(*BACKENDS, *TORCH_VARIANTS)}")
        if self.dense_baselines is not None and (bad := [d for d in self.dense_baselines if d not in DENSE_ENGINES]):
            raise ValueError(f"unknown dense baseline(s) {bad}; choose from {tuple(DENSE_ENGINES)}")
        if not all(0.0 <= d <= 1.0 for d in self.densities):
            raise ValueError(f"densities must lie in [0, 1], got {list(self.densities)}")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"need repeats >= 1 and warmup >= 0, got {self.repeats} and {self.warmup}")


# --quick: one resolution, four densities, blobs + real photos, < 2 minutes on 2 CPU cores.
QUICK = BenchSettings(resolutions=("480p",), densities=(0.05, 0.2, 0.5, 1.0), masks=("blobs", "real"),
                      baselines=DEFAULT_BASELINES[:1], photos=1)


@dataclass
class Engine:
    """One engine of a run. ``name``: its label (a :data:`BACKENDS` entry, or a dense row's name for a
    dense-only engine); ``runner``: a :class:`~m2ae_infer.backends.Backend`, or :class:`CompiledDense`;
    ``dense_name``: the name of its dense row; ``sparse``: whether it runs sparse cells too."""

    name: str
    precision: str
    runner: Backend | CompiledDense
    dense_name: str
    sparse: bool = True

    def dense(self, case: "Case") -> torch.Tensor:
        if isinstance(self.runner, CompiledDense):
            return self.runner(case.image, case.mask)
        return self.runner.run(case.image, case.mask, execution="dense").output

    def run_sparse(self, case: "Case", execution: str = "sparse"):
        return self.runner.run(case.image, case.mask, execution=execution)


def make_backends(net: M2AENet, names, device: str, threads: int | None,
                  dense: tuple[str, ...] = ()) -> tuple[list[Engine], dict[str, str]]:
    """Engines for the backends ``names`` (None: all of :data:`BACKENDS`) and the dense-only rows ``dense``
    (:data:`DENSE_ENGINES` names a backend already covers are not built twice), and ``{name: why not}`` for
    those that cannot run, or whose timings mean nothing on ``device``. Every thread pool gets ``threads``
    (None: torch's count): OpenVINO's ``INFERENCE_NUM_THREADS``, ONNX Runtime's intra-op threads."""
    threads = threads or torch.get_num_threads()
    engines, skipped = [], {}

    def build(label: str, name: str, precision: str, sparse: bool) -> None:
        entry = backend_entry(name)
        if not entry.timed_on(device):
            skipped[label] = entry.untimed_reason
            return
        try:
            # a deploy copy each: engines may change their network's memory format or device
            deploy = reparameterize_model(net).to(device)
            runner = make_backend(name, deploy, device=device, execution="sparse" if sparse else "dense",
                                  threads=threads, precision=precision)
        except (ValueError, ImportError, RuntimeError) as exc:
            skipped[label] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return
        engines.append(Engine(label, precision, runner, dense_engine_name(name, precision), sparse))

    for label in names or BACKENDS:
        if label in TORCH_VARIANTS:   # the torch executor with other options; it shares a dense row
            from ..executor import TorchExecutor
            options, dense_row = TORCH_VARIANTS[label]
            engines.append(Engine(label, "fp32", TorchExecutor(reparameterize_model(net).to(device), **options),
                                  dense_row))
            continue
        name, _, precision = label.partition(":")
        build(label, name, precision or "fp32", True)
    for row in (d for d in dense if d not in {e.dense_name for e in engines}):
        if row == "compile":
            engines.append(Engine(row, "fp32", CompiledDense(reparameterize_model(net).to(device)), row, False))
        else:
            build(row, *DENSE_ENGINES[row], False)
    return engines, skipped


@dataclass
class Case:
    """One image and the mask it runs with (``mask=None``: the network predicts it)."""

    source: str                 # "blobs" | "scattered" | "real"
    image: torch.Tensor
    mask: torch.Tensor | None
    target: float | None        # controlled masks: the requested working-grid density
    photo: str = ""


def cases_for(height: int, width: int, settings: BenchSettings, device: str) -> list[Case]:
    photos = real_photos(height, width, settings.seed, settings.photos)
    cases = []
    for kind in (m for m in settings.masks if m != "real"):
        for density in settings.densities:
            mask = working_density_mask(kind, height, width, density, settings.seed).to(device)
            cases.append(Case(kind, photos[0][1].to(device), mask, density))
    if "real" in settings.masks:
        cases += [Case("real", image.to(device), None, None, name) for name, image in photos]
    return cases


def measure_case(engines: list[Engine], case: Case, settings: BenchSettings) -> tuple[list[dict], list[dict]]:
    """Every engine dense, and sparse where it runs sparse cells, on one case, all timed alternately:
    ``(cell rows, dense rows)``."""
    calls = {}
    # one dense row per dense engine, run by the first engine that has it: the torch variants (TORCH_VARIANTS)
    # share torch's, or the compile row
    owners: dict[str, Engine] = {}
    for e in engines:
        owners.setdefault(e.dense_name, e)
    dense_engines = list(owners.values())
    for e in engines:
        if e in dense_engines:
            calls[f"{e.name} dense"] = lambda e=e: e.dense(case)
        if e.sparse:
            calls[f"{e.name} sparse"] = lambda e=e: e.run_sparse(case)
            calls[f"{e.name} auto"] = lambda e=e: e.run_sparse(case, "auto")
    outputs = {key: fn() for key, fn in calls.items()}      # untimed: results to check, compilations done
    t = time_interleaved(calls, warmup=settings.warmup, repeats=settings.repeats,
                         pause=PAUSE if len(engines) > 1 else 0.0)
    eager = next((e for e in dense_engines if e.dense_name == "eager"), None)
    reference = outputs[f"{(eager or dense_engines[0]).name} dense"]
    dense_rows = []
    for e in dense_engines:
        timing = t[f"{e.name} dense"]
        dense_rows.append({
            "engine": e.dense_name, "precision": e.precision, "ms": timing.median * 1e3, "spread": timing.spread,
            "repeats": settings.repeats,
            "compile_s": _compile_seconds(e.runner, case),
            # against torch eager dense (or the first engine): bf16 rows show their rounding here
            "max_abs_vs_eager": float((outputs[f"{e.name} dense"] - reference).abs().max())})
    cells = [measure_cell(e, case, settings, t[f"{e.name} sparse"], dense_rows, outputs[f"{e.name} sparse"],
                          outputs[f"{owners[e.dense_name].name} dense"], t[f"{e.name} auto"], outputs[f"{e.name} auto"])
             for e in engines if e.sparse]
    return cells, dense_rows


def _compile_seconds(runner, case: Case) -> float | None:
    """First-call seconds (compilation and one run) of a compiled dense path for this case's shape, else None."""
    if isinstance(runner, CompiledDense):
        return runner.compile_seconds[(tuple(case.image.shape), case.mask is None)]
    if getattr(runner, "compile_dense", False):     # TorchExecutor(compile_dense=True): keyed by the padded shape
        return runner.compile_seconds[tuple(pad_to_even(case.image).shape)]
    return None


def measure_cell(engine: Engine, case: Case, settings: BenchSettings, sparse_time, dense_rows: list[dict],
                 sparse_out, dense_out: torch.Tensor, auto_time, auto_out) -> dict:
    """The sparse cell of one backend on one case, against its own dense call, torch eager dense and the
    fastest dense row of its precision (the headline); and its ``execution="auto"`` call against the same."""
    ex = engine.runner
    height, width = case.image.shape[-2:]
    active, total = sparse_out.active_pixels, sparse_out.mask.numel()
    predicted = case.mask is None
    flops_dense = ex.count_flops(1, height, width, 0, "dense", predicted)
    flops_sparse = ex.count_flops(1, height, width, active, "sparse", predicted, sparse_out.sparse_tiles,
                                  sparse_out.tile_pixels, sparse_out.stem_cells)
    measure = settings.memory and ex.measures_memory
    mem = {k: peak_memory(lambda: ex.run(case.image, case.mask, execution=k), settings.device) if measure else None
           for k in ("dense", "sparse")}
    own = next(r for r in dense_rows if r["engine"] == engine.dense_name)
    eager = next((r for r in dense_rows if r["engine"] == "eager"), None)
    best = fastest_dense(dense_rows, engine.precision)
    sparse_ms = sparse_time.median * 1e3
    return {
        "backend": engine.name, "precision": engine.precision, "mask": case.source, "photo": case.photo,
        "target_density": case.target, "active_fraction": active / total, "flops_dense": flops_dense,
        "flops_sparse": flops_sparse, "flop_ratio": flops_sparse / flops_dense,
        "dense_ms": own["ms"], "dense_spread": own["spread"],
        "sparse_ms": sparse_ms, "sparse_spread": sparse_time.spread,
        "latency_ratio": sparse_ms / own["ms"], "repeats": settings.repeats,
        "eager_ratio": sparse_ms / eager["ms"] if eager else None,
        "headline_dense": best["engine"], "headline_dense_ms": best["ms"], "headline_ratio": sparse_ms / best["ms"],
        "dense_peak_mb": _mb(mem["dense"]), "sparse_peak_mb": _mb(mem["sparse"]),
        "sparse_tiles": sparse_out.sparse_tiles, "tile_pixels": sparse_out.tile_pixels,
        "stem_cells": sparse_out.stem_cells,   # None: the dense stem
        "tiled_fraction": sparse_out.tile_pixels / active if active else 0.0,
        "auto_picks": auto_out.execution, "auto_ms": auto_time.median * 1e3, "auto_spread": auto_time.spread,
        "auto_headline_ratio": auto_time.median * 1e3 / best["ms"], "auto_own_ratio": auto_time.median * 1e3 / own["ms"],
        # sparse must equal dense (README: Contracts): a benchmark that measured a wrong result would be worthless.
        "max_abs_diff": float((sparse_out.output - dense_out).abs().max()),
    }


def measure_baselines(net: M2AENet, image: torch.Tensor, names, settings: BenchSettings) -> list[dict]:
    """Our network dense (the main baseline) and sparse on a real photo, next to standard dense networks."""
    ours = Deblurrer(net, device=settings.device, backend="torch")
    height, width = image.shape[-2:]
    sparse = ours.executor.run(image, execution="sparse")
    sparse_flops = ours.executor.count_flops(1, height, width, sparse.active_pixels, "sparse", True,
                                             sparse.sparse_tiles, sparse.tile_pixels, sparse.stem_cells)
    calls = {"M2AENet dense (ours)": (lambda: ours.executor.run(image, execution="dense"),
                                      ours.executor.count_flops(1, height, width, 0, "dense"),
                                      parameter_count(ours.network)),
             "M2AENet sparse (ours)": (lambda: ours.executor.run(image, execution="sparse"),
                                       sparse_flops,
                                       parameter_count(ours.network))}
    for name in names:
        baseline = build_baseline(name).to(settings.device)
        calls[name] = (_no_grad(baseline, image), _count_flops(baseline, image), parameter_count(baseline))
    timings = time_interleaved({k: v[0] for k, v in calls.items()}, warmup=settings.warmup, repeats=settings.repeats)
    rows = []
    for name, (fn, flops, params) in calls.items():
        mem = peak_memory(fn, settings.device) if settings.memory else None
        rows.append({"network": name, "params": params, "flops": flops, "ms": timings[name].median * 1e3,
                     "spread": timings[name].spread, "peak_mb": _mb(mem), "repeats": settings.repeats,
                     "active_fraction": sparse.active_pixels / sparse.mask.numel() if "sparse" in name else 1.0})
    return rows


def _no_grad(net: torch.nn.Module, image: torch.Tensor):
    x = image.contiguous(memory_format=torch.channels_last)

    def call():
        with torch.inference_mode():
            return net(x)
    return call


def _count_flops(net: torch.nn.Module, image: torch.Tensor) -> int:
    return count_isolated(lambda: net(image))   # FlopCounterMode, under no_grad


def _mb(n: int | None) -> float | None:
    return None if n is None else max(n, 0) / MB


@dataclass
class BenchResult:
    settings: BenchSettings
    machine: dict
    rows: list[dict] = field(default_factory=list)
    baselines: list[dict] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    kernels: list[dict] = field(default_factory=list)
    dense: list[dict] = field(default_factory=list)     # one per case and dense engine (measure_case)

    def as_dict(self) -> dict:
        return {"machine": self.machine, "settings": asdict(self.settings), "skipped": self.skipped,
                "rows": self.rows, "dense": self.dense, "baselines": self.baselines, "kernels": self.kernels}


def run_grid(net: M2AENet, settings: BenchSettings, machine: dict, threads: int | None = None,
             progress: bool = True) -> BenchResult:
    """Measure the whole grid; ``net`` in deploy form."""
    from tqdm import tqdm

    dense = default_dense_baselines() if settings.dense_baselines is None else settings.dense_baselines
    engines, skipped = make_backends(net, settings.backends, settings.device, threads, dense)
    if not any(e.sparse for e in engines):
        raise ValueError(f"no backend can run here: {skipped}")
    result = BenchResult(replace(settings, backends=tuple(e.name for e in engines if e.sparse),
                                 dense_baselines=tuple(d for d in dense if d not in skipped)), machine,
                         skipped=skipped)
    with tqdm(total=None, disable=not progress, unit="case", desc="m2ae-bench", file=progress_stream()) as bar:
        for resolution in settings.resolutions:
            height, width = parse_resolution(resolution)
            cases = cases_for(height, width, settings, settings.device)
            bar.total = (bar.total or 0) + len(cases) + (1 if settings.baselines else 0)
            for case in cases:
                bar.set_postfix_str(f"{resolution} {case.source} {case.target or case.photo}")
                cells, dense_rows = measure_case(engines, case, settings)
                where = {"resolution": resolution, "height": height, "width": width}
                result.rows += [{**where, **row} for row in cells]
                result.dense += [{**where, "mask": case.source, "photo": case.photo, "target_density": case.target,
                                  "active_fraction": cells[0]["active_fraction"], **row} for row in dense_rows]
                bar.update()
            if settings.baselines:
                bar.set_postfix_str(f"{resolution} baselines")
                photo = cases[0].image if cases else real_photos(height, width, settings.seed, 1)[0][1]
                for row in measure_baselines(net, photo, settings.baselines, settings):
                    result.baselines.append({"resolution": resolution, "height": height, "width": width, **row})
                bar.update()
    if any(e.name == "triton" for e in engines) and torch.device(settings.device).type == "cuda":
        bar.set_postfix_str("triton stage kernels vs cuDNN")
        result.kernels = triton_stage_timings(net, settings)
    return result


def triton_stage_timings(net: M2AENet, settings: BenchSettings) -> list[dict]:
    """One body stage of ``net``'s width: the Triton kernel vs dense cuDNN, ``triton.testing.do_bench`` (CUDA)."""
    from ..kernels.triton_bench import gpu_stage_timings
    sizes = tuple(((h + 1) // 2, (w + 1) // 2) for h, w in map(parse_resolution, settings.resolutions))
    return gpu_stage_timings(channels=(net.config.channels,), sizes=sizes,
                             densities=tuple(d for d in settings.densities if d > 0), act=net.config.act,
                             ffn_expand=net.config.ffn_expand, device=settings.device)

