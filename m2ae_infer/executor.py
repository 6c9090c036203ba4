"""Torch execution of the deploy network: dense masked, or sparse at the active pixels only.

Both paths share the dense stages (pad, stem, mask prediction) and differ in how the masked stages run:

* ``dense``: every stage computed everywhere with oneDNN channels-last convolutions, then gated.
* ``sparse``: the stem features go into a zero-bordered channels-last buffer, only at the cells the stages read
  where that is the smaller part of the grid (:mod:`m2ae_infer.kernels.cells`: a given mask, or a mask head that
  reads the image; else the dense stem's features are copied in); the stages update the active pixels only, by
  one of two kernels, and the tail writes only the active pixels of the output, which starts as a copy of the
  input:

  - ``pixels`` (:mod:`m2ae_infer.kernels.reference`): each stage gathers the 3x3 neighbourhoods of the active
    pixels, runs its GEMMs and adds the update back at those pixels; its cost follows the active count;
  - ``tiles`` (:mod:`m2ae_infer.kernels.tiles`): each stage runs as a dense convolution over the active 8x8
    tiles of the working grid, gated inside them; its cost follows the active tiles' area, several times
    cheaper per pixel, so it wins on masks made of regions and loses on scattered ones.

  ``sparse_kernel="auto"`` (the default) runs both in one call: tiles at least ``tile / pixel`` full
  (:class:`KernelCosts`) go to the tile kernel, the other active pixels to the per-pixel one
  (:func:`~m2ae_infer.kernels.tiles.plan_tiles`).
* ``auto``: sparse where the cost model (:meth:`KernelCosts.body`) says it beats the dense body, else dense; always
  dense above the ``dense_above`` active fraction (docs/performance.md).
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .allocator import keep_freed_memory
from .backends import ExecutionResult, choose_execution
from .errors import CostsFileError, InvalidArgument
from .flops import AffineFlops, count_isolated
from .kernels.cells import read_cells, stem_tile_buffer
from .kernels.reference import active_pixels, padded_rows, shuffle_targets, sparse_tail_
from .kernels.tiles import TILE, TileHalo, TilePlan, masked_stages_, plan_tiles, spatial_weights, to_tile_buffer
from .model import M2AENet
from .model.mask import pad_to_even, working_mask
from .model.network import SHUFFLE
from .packing import pack_stages, pack_tail
from .precision import DTYPES, bf16_unavailable

# Active fraction above which `auto` always runs dense; below it the cost model (KernelCosts.body) chooses. 1.0: the
# cost model alone (it already prefers dense where the sparse kernels cost more).
DENSE_ABOVE = 1.0
# The sparse stem (kernels.cells) runs when the cells the stages read cover at most this share of the working grid's
# pixels; above it the dense stem and one copy into the buffer are cheaper. Whole 720p sparse calls, sparse stem
# against dense stem, interleaved, median of 8, 2 threads, AMD EPYC without AVX-512 (2026-12-07), by the cells' share:
# 0.04 -> 0.57, 0.15 -> 0.78, 0.18 -> 0.65, 0.24 -> 0.96 / 0.98, 0.31 -> 0.94, 0.33 -> 0.91, 0.36 -> 1.00,
# 0.43 -> 1.04 / 1.03, 0.58 -> 1.04, 0.63 -> 1.28, 0.78 -> 1.07, 0.99 -> 1.26 (docs/performance.md).
STEM_CELLS_BELOW = 0.35


@dataclass(frozen=True)
class KernelCosts:
    """The cost model of the two sparse kernels, in units of the dense body's time per working pixel
    (``python -m m2ae_infer.benchmarks.tile_sparse`` measures both): ``pixel``, the per-pixel kernel's body time
    per active pixel; ``tile``, the tile kernel's per pixel of tile area."""

    pixel: float
    tile: float
    compiled_dense: float = 1.0     # the torch.compile'd dense body's time in units of the eager one's

    def min_fill(self, kernel: str) -> float:
        """:func:`~m2ae_infer.kernels.tiles.plan_tiles`' ``min_fill`` for ``sparse_kernel=kernel``: ``auto``
        tiles a tile where the tile kernel is the cheaper (fill >= tile / pixel); ``tiles`` every tile, ``pixels``
        none."""
        return {"auto": self.tile / self.pixel, "tiles": 0.0, "pixels": 2.0}[kernel]

    def body(self, plan: TilePlan, total: int) -> float:
        """Estimated time of the sparse body for ``plan``, as a fraction of the dense body's (``total`` working
        pixels): ``pixel`` per pixel left to the per-pixel kernel, ``tile`` per pixel of tile area."""
        return (self.pixel * plan.pixels[0].numel() + self.tile * plan.tiles * TILE * TILE) / max(total, 1)


# torch.compile's dense body against eager, 720p, 2 threads: fp32 0.79 (the bench's compile row against eager in three
# m2ae-bench runs of 2026-12-08 on the AMD EPYC with AVX-512-BF16: 0.787, 0.787, 0.757; 0.788 on 2026-12-04, the
# dense body alone, interleaved, median of 9), bf16 0.73 (2026-12-04: 86.6 against 119.3 ms; compiled output equal
# to eager's).
COMPILED_FP32 = 0.79
COMPILED_BF16 = 0.73

# Per precision: medians over blob and scattered masks of 5-80 % at 720p, shipped checkpoint, 2 threads
# (`python -m m2ae_infer.benchmarks.tile_sparse --densities 0.05,0.2,0.35,0.5,0.8`, docs/performance.md "oneDNN's
# matmul"), measured on the 2-core AMD EPYC with AVX-512-BF16 on 2026-12-08, after the kernels' GEMMs moved to oneDNN's
# matmul and the per-pixel kernel to 4096-row chunks: fp32 1.84 per active pixel (per-pixel kernel) and 1.62 per pixel
# of tile area (tile kernel); bf16 2.21 and 1.62. The per-pixel kernel used to cost far more (fp32 1.90-2.9 and bf16
# 3.35 on the CPUs of 2026-12-03 to 12-06, with addmm and 1024-row chunks), so the tile kernel now takes only tiles
# at least 0.88 (bf16 0.73) full; on blob masks the two kernels cost about the same per active pixel there (whole
# calls within 2 % of each other at min_fill 0.61-2.0). The constants depend on the CPU: its convolutions against
# its memory traffic (tile cost 1.16 on the project's Intel Xeon of 2026-12-06, 1.38 on an AVX-512 EPYC without bf16).
KERNEL_COSTS = {"fp32": KernelCosts(pixel=1.84, tile=1.62, compiled_dense=COMPILED_FP32),
                "bf16": KernelCosts(pixel=2.21, tile=1.62, compiled_dense=COMPILED_BF16)}
SPARSE_KERNELS = ("auto", "pixels", "tiles")
# A JSON file of this machine's constants, ``{"fp32": {"pixel": P, "tile": T, "compiled_dense": C}, "bf16": ...}``
# (any subset), as ``python -m m2ae_infer.benchmarks.tile_sparse --write-costs FILE`` writes it: every TorchExecutor
# made while this variable names it takes its constants from there, the rest from KERNEL_COSTS.
COSTS_ENV = "M2AE_KERNEL_COSTS"


def kernel_costs(precision: str) -> KernelCosts:
    """The cost constants for ``precision``: :data:`KERNEL_COSTS`, overridden by the file :data:`COSTS_ENV` names.
    A file that cannot be read or holds a bad value is a :class:`~m2ae_infer.errors.CostsFileError` (one line)."""
    default = KERNEL_COSTS[precision]
    path = os.environ.get(COSTS_ENV, "").strip()
    if not path:
        return default
    fix = f"write it with: python -m m2ae_infer.benchmarks.tile_sparse --write-costs {path}, or unset {COSTS_ENV}"
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise CostsFileError(f"{COSTS_ENV}={path}: cannot read it ({exc}); {fix}") from None
    entry = data.get(precision, {}) if isinstance(data, dict) else None
    if not isinstance(entry, dict):
        raise CostsFileError(f"{COSTS_ENV}={path}: not a {{precision: {{pixel, tile}}}} table; {fix}")
    values = {}
    for name in ("pixel", "tile", "compiled_dense"):
        value = entry.get(name, getattr(default, name))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e3:
            raise CostsFileError(f"{COSTS_ENV}={path}: {precision}.{name} must be a positive number, "
                                 f"got {value!r}; {fix}")
        values[name] = float(value)
    return KernelCosts(**values)


def _crop(out: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``out[..., :height, :width]``, channels-last (a copy only where padding is cut off)."""
    return out[..., :height, :width].contiguous(memory_format=torch.channels_last)


def dense_front(net: M2AENet, image: torch.Tensor, mask: torch.Tensor | None, threshold: float,
                dilation: int, stem: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The part every executor runs densely: ``(padded image, stem features, working mask)``.

    ``image`` ``[B, 3, H, W]`` is padded to even H, W (channels-last for oneDNN); the working mask is predicted
    (``threshold``, ``dilation``) or max-pooled from the user's full-resolution ``mask``. ``stem=False``: the
    features only where the mask prediction reads them (:meth:`M2AENet.mask_features`), else None, for a caller
    that computes them later, only where it needs them.
    """
    padded = pad_to_even(image).contiguous(memory_format=torch.channels_last)
    if stem:
        features = net.stem_features(padded)
    else:
        features = net.mask_features(padded) if mask is None else None
    if mask is None:
        return padded, features, net.predict_mask(padded, features, threshold, dilation)
    return padded, features, working_mask(mask.to(image.device))


class TorchExecutor:
    """Runs a deploy-form :class:`M2AENet` with torch ops on any device torch supports
    (the ``torch`` :class:`~m2ae_infer.backends.Backend`).

    Args:
        net: the network in deploy form (``reparameterize_model`` first).
        dense_above: active fraction above which ``execution="auto"`` always runs dense (None: :data:`DENSE_ABOVE`).
        sparse_kernel: ``"auto"`` (both, split by the cost model of its precision: :func:`kernel_costs`, which
            this machine's file (:data:`COSTS_ENV`) may set),
            ``"pixels"`` or ``"tiles"``: how the sparse execution updates the active pixels (all exact; module
            docstring).
        compile_dense: run the dense body through ``torch.compile`` (inductor, static shapes), opt-in: the first
            dense call of each shape compiles (tens of seconds on 2 cores; :attr:`compile_seconds`), later ones
            are faster than eager (:attr:`KernelCosts.compiled_dense`), and ``auto`` weighs the sparse kernels
            against the compiled dense body. Same operations, same FLOP count as eager.
        precision: ``"fp32"`` (default) or ``"bf16"``: the masked stages and the tail in bfloat16 (weights and
            features; oneDNN's native bf16 convolutions and GEMMs), on devices that run bf16 natively
            (:func:`~m2ae_infer.precision.bf16_unavailable`). The stem and the mask prediction stay fp32 (the
            mask is fp32's), the output is fp32 and unmasked pixels are the input's bit for bit; the restored
            pixels are within :data:`~m2ae_infer.precision.BF16_TOLERANCE` of the fp32 reference, and sparse
            equals dense within bf16 rounding (not bit for bit: the two sum in different orders).
    """

    name = "torch"
    measures_memory = True

    def __init__(self, net: M2AENet, dense_above: float | None = None, sparse_kernel: str = "auto",
                 precision: str = "fp32", compile_dense: bool = False):
        if not net.inference_mode:
            raise ValueError("TorchExecutor needs the deploy form: call reparameterize_model(net) first")
        dense_above = DENSE_ABOVE if dense_above is None else dense_above
        if not 0.0 <= dense_above <= 1.0:
            raise ValueError(f"dense_above must lie in [0, 1], got {dense_above}")
        if sparse_kernel not in SPARSE_KERNELS:
            raise ValueError(f"sparse_kernel must be one of {SPARSE_KERNELS}, got {sparse_kernel!r}")
        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {tuple(DTYPES)}, got {precision!r}")
        missing = bf16_unavailable(next(net.parameters()).device) if precision == "bf16" else None
        if missing:
            raise InvalidArgument("precision", f"backend 'torch': precision='bf16' needs native bf16; {missing}; "
                                  "use precision='fp32'")
        # channels-last weights: oneDNN's fast dense convolutions on CPU.
        self.net = net.eval().to(memory_format=torch.channels_last)
        if all(p.device.type == "cpu" for p in net.parameters()):
            keep_freed_memory()     # dense calls re-fault hundreds of MB per call otherwise (see allocator.py)
        self.dense_above, self.sparse_kernel, self.precision = dense_above, sparse_kernel, precision
        self.costs = kernel_costs(precision)
        self.compile_dense = bool(compile_dense)
        self._compiled = None                               # the compiled dense body, made on first use
        self.compile_seconds: dict[tuple, float] = {}       # (padded shape) -> first call: compilation + one run
        dtype = DTYPES[precision]
        # the dense body's network: the net itself, or a copy in the body's precision (its front is not used)
        self.body_net = self.net if precision == "fp32" else copy.deepcopy(self.net).to(dtype)
        self.stages = [stage.to(dtype) for stage in pack_stages(net)]
        self.tile_weights = spatial_weights(self.stages)      # the 3x3 convs the tile kernel runs
        self.tail_weight, self.tail_bias = (t.to(dtype) for t in pack_tail(net))   # [C, 12], [12]
        self._meta: TorchExecutor | None = None    # meta-device twin for FLOP counting
        self._flops = AffineFlops(self._count_on_meta)

    def choose(self, execution: str, active: int, total: int) -> str:
        return choose_execution(execution, active, total, self.dense_above)

    def prepare(self, execution: str, threshold: float = 0.5, dilation: int = 0) -> None:
        """Nothing to build ahead: eager torch."""
        choose_execution(execution, 0, 1, self.dense_above)   # validates the name

    @torch.inference_mode()
    def run(self, image: torch.Tensor, mask: torch.Tensor | None = None, *, threshold: float = 0.5,
            dilation: int = 0, execution: str = "auto") -> ExecutionResult:
        """Restore ``image`` ``[B, 3, H, W]`` (float32 in [0, 1]).

        Args:
            mask: optional full-resolution ``[B, 1, H, W]`` bool mask; predicted when omitted.
            threshold, dilation: mask prediction settings (ignored when ``mask`` is given).
            execution: ``"auto"``, ``"sparse"`` or ``"dense"``.
        """
        height, width = image.shape[-2:]
        padded, features, m = dense_front(self.net, image, mask, threshold, dilation, stem=False)
        active = int(m.sum())
        chosen = self.choose(execution, active, m.numel())
        if chosen == "sparse":
            plan = plan_tiles(m, self.costs.min_fill(self.sparse_kernel), TILE)
            dense_cost = self.costs.compiled_dense if self.compile_dense else 1.0
            if execution == "auto" and self.costs.body(plan, m.numel()) >= dense_cost:
                chosen = "dense"
        if chosen == "dense":
            features = self.net.stem_features(padded) if features is None else features
            out = self.dense_body(padded, features, m)
            return ExecutionResult(_crop(out, height, width), m, chosen, active)
        cells = None
        if features is None:
            cells = read_cells(plan, *m.shape[:1], *m.shape[-2:])
            if cells.shape[0] * TILE * TILE > STEM_CELLS_BELOW * m.numel():   # never more than the dense stem
                cells, features = None, self.net.stem_features(padded)
        coords = plan.pixels if not plan.tiles else active_pixels(m[:, 0])   # no tiles: the plan's are all of them
        out = self.sparse_body(padded, features, coords, plan, cells=cells)
        return ExecutionResult(_crop(out, height, width), m, chosen, active, plan.tiles, plan.tile_pixels,
                               None if cells is None else cells.shape[0])

    def dense_body(self, padded: torch.Tensor, features: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Masked stages and tail everywhere (:meth:`M2AENet.masked_body`), eager or compiled."""
        if not self.compile_dense:
            return self.body_net.masked_body(padded, features, m)
        if self._compiled is None:
            self._compiled = torch.compile(self.body_net.masked_body, dynamic=False)
        key, start = tuple(padded.shape), time.perf_counter()
        out = self._compiled(padded, features, m)
        self.compile_seconds.setdefault(key, time.perf_counter() - start)   # the first call compiles
        return out

    def sparse_body(self, padded: torch.Tensor, features: torch.Tensor | None,
                    coords: tuple[torch.Tensor, torch.Tensor, torch.Tensor], plan: TilePlan,
                    halo: TileHalo | None = None, cells: torch.Tensor | None = None) -> torch.Tensor:
        """Masked stages and tail at the working-grid pixels ``coords = (b, y, x)`` only, split between the tile and
        per-pixel kernels by ``plan`` (:func:`~m2ae_infer.kernels.tiles.plan_tiles`).

        ``padded``: ``[B, 3, H, W]`` (H, W even); ``features``: ``[B, C, H/2, W/2]``, or None: the stem runs here
        at ``cells`` only (:func:`~m2ae_infer.kernels.cells.read_cells` of the plan). The output is channels-last
        (the layout of an HWC image, and of the padded input :func:`dense_front` makes): no transposing copy.
        """
        padded = padded.contiguous(memory_format=torch.channels_last)
        if features is None:
            buffer = stem_tile_buffer(padded, *self.net.stem_kernel(), cells, (padded.shape[-2] // SHUFFLE,
                                      padded.shape[-1] // SHUFFLE), TILE, dtype=self.tail_weight.dtype)
        else:
            buffer = to_tile_buffer(features.to(self.tail_weight.dtype), TILE)
        grid_h, grid_w = buffer.shape[1] - 2, buffer.shape[2] - 2
        rows_view = buffer.view(-1, buffer.shape[-1])
        masked_stages_(rows_view, buffer.shape, plan, self.stages, self.tile_weights, halo)
        targets = shuffle_targets(*coords, padded.shape[1], SHUFFLE, *padded.shape[-2:], channels_last=True)
        out = padded.clone()
        sparse_tail_(out, padded, rows_view, padded_rows(*coords, grid_h, grid_w), targets, self.tail_weight,
                     self.tail_bias)
        return out

    def count_flops(self, batch: int, height: int, width: int, active: int, execution: str,
                    predict_mask: bool = True, sparse_tiles: int = 0, tile_pixels: int = 0,
                    stem_cells: int | None = None) -> int:
        """FLOPs one call executes, from a per-shape cost model: ``active`` True working-mask pixels, of which
        ``tile_pixels`` lay in the ``sparse_tiles`` tiles the tile kernel ran, and the stem run densely
        (``stem_cells=None``) or at ``stem_cells`` cells (:class:`ExecutionResult`).

        Counted once per shape by ``FlopCounterMode`` on a meta-device twin running this executor's own
        code, so the count equals what ``FlopCounterMode`` sees on the real call; sparse counts are affine in
        the per-pixel kernel's pixels, the tiles, the tiles' pixels and the stem's cells
        (:class:`~m2ae_infer.flops.AffineFlops`),
        and the counting never shows in a ``FlopCounterMode`` (or any ``TorchDispatchMode``) around the caller
        (:func:`~m2ae_infer.flops.count_isolated`). Gathers and scatters move bytes, not FLOPs, and count zero.
        A tile's inactive pixels are computed and count; the tail runs at the active pixels only.
        """
        if execution == "dense":
            return self._flops((batch, height, width, "dense", predict_mask), ())
        cells = () if stem_cells is None else (stem_cells,)
        return self._flops((batch, height, width, "sparse", predict_mask, stem_cells is not None),
                           (active - tile_pixels, sparse_tiles, tile_pixels, *cells))

    def _count_on_meta(self, key: tuple, counts: tuple[int, ...]) -> int:
        batch, height, width, execution, predict_mask, *sparse_stem = key
        if self._meta is None:
            self._meta = TorchExecutor(copy.deepcopy(self.net).to("meta"), self.dense_above,
                                       precision=self.precision)
        net = self._meta.net
        meta = lambda *shape, dtype=torch.long: torch.empty(shape, dtype=dtype, device="meta")  # noqa: E731

        def call() -> None:
            padded = pad_to_even(torch.empty((batch, 3, height, width), device="meta"))
            lazy = execution == "sparse" and sparse_stem[0]
            features = None if lazy else net.stem_features(padded)
            if predict_mask:
                net.mask_logits(padded, features)
            if execution == "dense":
                self._meta.dense_body(padded, features, meta(batch, 1, *features.shape[-2:], dtype=torch.bool))
                return
            per_pixel, tiles, in_tiles, *stem_cells = counts
            coords = tuple(meta(per_pixel + in_tiles) for _ in range(3))
            plan = TilePlan(meta(tiles, 3), meta(tiles, TILE, TILE, 1, dtype=torch.bool),
                            tuple(meta(per_pixel) for _ in range(3)), in_tiles,
                            meta(max(tiles * TILE * TILE - in_tiles, 0)))   # copies: no FLOPs, any size
            inner = tiles * TILE * TILE
            none = meta(0)    # no exchange: copies count no FLOPs
            halo = TileHalo(patch_rows=meta(tiles * (TILE + 2) ** 2), inner_rows=meta(inner), interior=meta(inner),
                            ring_to=none, ring_from=none, pixel_ring_to=none, pixel_ring_from=none,
                            export_from=none, export_to=none, inactive=plan.inactive)
            self._meta.sparse_body(padded, features, coords, plan, halo, meta(*stem_cells, 3) if lazy else None)
        return count_isolated(call)
