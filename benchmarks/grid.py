"""The benchmark grid: mask densities x resolutions x backends, dense vs sparse, measured side by side.

Every cell runs one backend dense and sparse on the same image and mask, timed alternately in one process
(:func:`~.latency.time_interleaved`), so each sparse/dense ratio is taken within the run. FLOPs are counted by
``torch.utils.flop_counter.FlopCounterMode`` on the code that runs (``executor.count_flops``; the ONNX and
TensorRT graphs compute the same GEMMs and convolutions as the torch code they were exported from).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch

from ..api import Deblurrer
from ..backends import Backend, backend_entry, make_backend
from ..cliutil import progress_stream
from ..model import M2AENet
from ..reparam import reparameterize_model
from .baselines import DEFAULT_BASELINES, build_baseline, parameter_count
from .latency import peak_memory, time_interleaved
from .masks import MASK_KINDS, working_density_mask
from .photos import real_photos

RESOLUTIONS = {"480p": (480, 854), "720p": (720, 1280), "1080p": (1080, 1920)}
BACKENDS = ("torch", "onnxruntime", "triton", "tensorrt")   # the bench's default order (registry names)
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
        if self.backends is not None and (bad := [b for b in self.backends if b not in BACKENDS]):
            raise ValueError(f"unknown backend(s) {bad}; choose from {BACKENDS}")
        if not all(0.0 <= d <= 1.0 for d in self.densities):
            raise ValueError(f"densities must lie in [0, 1], got {list(self.densities)}")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"need repeats >= 1 and warmup >= 0, got {self.repeats} and {self.warmup}")


# --quick: one resolution, four densities, blobs + real photos, < 2 minutes on 2 CPU cores.
QUICK = BenchSettings(resolutions=("480p",), densities=(0.05, 0.2, 0.5, 1.0), masks=("blobs", "real"),
                      baselines=DEFAULT_BASELINES[:1], photos=1)


def make_backends(net: M2AENet, names, device: str, threads: int | None) -> tuple[list, dict[str, str]]:
    """Engines (:class:`~m2ae_infer.backends.Backend`) for ``names`` (None: all of :data:`BACKENDS`), and
    ``{name: why not}`` for those that cannot run, or whose timings mean nothing on ``device``.
    ``threads``: engines with their own thread pool (ONNX Runtime) get torch's count."""
    ready, skipped = [], {}
    for name in names or BACKENDS:
        entry = backend_entry(name)
        if not entry.timed_on(device):
            skipped[name] = entry.untimed_reason
            continue
        try:
            # a deploy copy each: engines may change their network's memory format or device
            deploy = reparameterize_model(net).to(device)
            ready.append(make_backend(name, deploy, device=device, execution="sparse", threads=threads))
        except (ValueError, ImportError, RuntimeError) as exc:
            skipped[name] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ready, skipped


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


def measure_cell(backend: Backend, case: Case, settings: BenchSettings) -> dict:
    """Dense vs sparse for one backend on one case: a result row."""
    ex = backend
    run: Callable[[str], object] = lambda execution: ex.run(case.image, case.mask, execution=execution)  # noqa: E731
    dense_out, sparse_out = run("dense"), run("sparse")
    height, width = case.image.shape[-2:]
    active, total = sparse_out.active_pixels, sparse_out.mask.numel()
    predicted = case.mask is None
    flops_dense = ex.count_flops(1, height, width, 0, "dense", predicted)
    flops_sparse = ex.count_flops(1, height, width, active, "sparse", predicted)
    t = time_interleaved({"dense": lambda: run("dense"), "sparse": lambda: run("sparse")},
                         warmup=settings.warmup, repeats=settings.repeats)
    measure = settings.memory and backend.measures_memory
    mem = {k: peak_memory(lambda: run(k), settings.device) if measure else None for k in ("dense", "sparse")}
    return {
        "backend": backend.name, "mask": case.source, "photo": case.photo, "target_density": case.target,
        "active_fraction": active / total, "flops_dense": flops_dense, "flops_sparse": flops_sparse,
        "flop_ratio": flops_sparse / flops_dense,
        "dense_ms": t["dense"].median * 1e3, "dense_spread": t["dense"].spread,
        "sparse_ms": t["sparse"].median * 1e3, "sparse_spread": t["sparse"].spread,
        "latency_ratio": t["sparse"].median / t["dense"].median, "repeats": settings.repeats,
        "dense_peak_mb": _mb(mem["dense"]), "sparse_peak_mb": _mb(mem["sparse"]),
        "auto_picks": ex.choose("auto", active, total),
        # sparse must equal dense (README: Contracts): a benchmark that measured a wrong result would be worthless.
        "max_abs_diff": float((sparse_out.output - dense_out.output).abs().max()),
    }


def measure_baselines(net: M2AENet, image: torch.Tensor, names, settings: BenchSettings) -> list[dict]:
    """Our network dense (the main baseline) and sparse on a real photo, next to standard dense networks."""
    ours = Deblurrer(net, device=settings.device, backend="torch")
    height, width = image.shape[-2:]
    sparse = ours.executor.run(image, execution="sparse")
    calls = {"M2AENet dense (ours)": (lambda: ours.executor.run(image, execution="dense"),
                                      ours.executor.count_flops(1, height, width, 0, "dense"),
                                      parameter_count(ours.network)),
             "M2AENet sparse (ours)": (lambda: ours.executor.run(image, execution="sparse"),
                                       ours.executor.count_flops(1, height, width, sparse.active_pixels, "sparse"),
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
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        net(image)
    return int(counter.get_total_flops())


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

    def as_dict(self) -> dict:
        return {"machine": self.machine, "settings": asdict(self.settings), "skipped": self.skipped,
                "rows": self.rows, "baselines": self.baselines, "kernels": self.kernels}


def run_grid(net: M2AENet, settings: BenchSettings, machine: dict, threads: int | None = None,
             progress: bool = True) -> BenchResult:
    """Measure the whole grid; ``net`` in deploy form."""
    from tqdm import tqdm

    backends, skipped = make_backends(net, settings.backends, settings.device, threads)
    if not backends:
        raise ValueError(f"no backend can run here: {skipped}")
    result = BenchResult(replace(settings, backends=tuple(b.name for b in backends)), machine, skipped=skipped)
    with tqdm(total=None, disable=not progress, unit="cell", desc="m2ae-bench", file=progress_stream()) as bar:
        for resolution in settings.resolutions:
            height, width = parse_resolution(resolution)
            cases = cases_for(height, width, settings, settings.device)
            bar.total = (bar.total or 0) + len(cases) * len(backends) + (1 if settings.baselines else 0)
            for case in cases:
                for backend in backends:
                    bar.set_postfix_str(f"{resolution} {case.source} {case.target or case.photo} {backend.name}")
                    row = measure_cell(backend, case, settings)
                    result.rows.append({"resolution": resolution, "height": height, "width": width, **row})
                    bar.update()
            if settings.baselines:
                bar.set_postfix_str(f"{resolution} baselines")
                photo = cases[0].image if cases else real_photos(height, width, settings.seed, 1)[0][1]
                for row in measure_baselines(net, photo, settings.baselines, settings):
                    result.baselines.append({"resolution": resolution, "height": height, "width": width, **row})
                bar.update()
    if any(b.name == "triton" for b in backends) and torch.device(settings.device).type == "cuda":
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

