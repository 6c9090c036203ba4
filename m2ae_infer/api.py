"""The public API: ``Deblurrer(...).run(img)``."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .backends import EXECUTIONS, backend_entry, check_compile_dense, check_precision, make_backend
from .checkpoint import load_checkpoint
from .checks import check_detector_side, check_mask_settings
from .detector_scale import DETECTOR_SIDE, detector_factor, scaled_mask
from .errors import InvalidArgument
from .flops import MaskPassFlops
from .imgio import ImageError, check_tensor, load_image, prepare_image
from .messages import one_line
from .model import M2AENet
from .model.mask import full_resolution
from .reparam import reparameterize_model
from .shipped import DEFAULT_CHECKPOINT
from .tiling import Tiling, receptive_field, run_tiled

DEFAULT_THRESHOLD = 0.5   # blur-probability threshold for checkpoints whose meta recommends none


@dataclass(frozen=True)
class RunInfo:
    """What one :meth:`Deblurrer.run` call did.

    Attributes:
        mask: the pixels the network was allowed to change, at the input's size (bool): a numpy
            ``[H, W]`` array, or for tensor inputs a tensor ``[H, W]`` (CHW) / ``[B, H, W]`` (BCHW).
        active_fraction: share of working (half-resolution) pixels that were computed.
        flops_dense: FLOPs of the same call executed densely (``torch.utils.flop_counter``).
        flops_executed: FLOPs the call actually executed.
        seconds: wall time of the network (image conversion excluded).
        execution: ``"sparse"`` or ``"dense"``: the path that ran; for a tiled run ``"mixed"`` when tiles
            took different paths (``auto`` decides per tile) and ``"none"`` when no tile held blur.
        backend: the engine that ran it.
        tiles: how many tiles the image was cut into (1: run whole); FLOPs are summed over tiles.
        flops_untiled: FLOPs of the same call run whole and densely: the cost pixel pruning is measured
            against (:attr:`flops_saved_untiled`). Equals ``flops_dense`` for an untiled run; for a tiled
            run ``flops_dense`` also counts the overlaps each tile computes.
        detector_scale: the factor ``k`` the image was averaged down by for the mask prediction
            (:mod:`m2ae_infer.detector_scale`); 1: predicted at full size, or the mask was given.
    """

    mask: Any
    active_fraction: float
    flops_dense: int
    flops_executed: int
    seconds: float
    execution: str
    backend: str
    tiles: int = 1
    flops_untiled: int = 0
    detector_scale: int = 1

    @property
    def flops_saved(self) -> float:
        """Fraction of the dense FLOPs (of the same tiles) that pixel pruning did not have to execute."""
        return 1.0 - self.flops_executed / self.flops_dense if self.flops_dense else 0.0

    @property
    def flops_saved_untiled(self) -> float:
        """Fraction of :attr:`flops_untiled` not executed; negative when tile overlaps cost more than
        pruning saved."""
        return 1.0 - self.flops_executed / self.flops_untiled if self.flops_untiled else 0.0


class Deblurrer:
    """Deblur photos, computing only where they are blurred.

    Args:
        checkpoint: a ``.pth``/``.safetensors`` path, an :class:`M2AENet`, or ``None`` for the checkpoint
            shipped with the package.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        backend: ``"auto"`` or ``"torch"``; ``"onnxruntime"`` (the network exported to ONNX in memory and
            run by ONNX Runtime, see :mod:`m2ae_infer.export.ort`) or ``"tensorrt"`` (engines built from
            that ONNX, CUDA only; ``auto`` runs the dense graph there); ``"triton"`` (fused sparse-pixel Triton
            kernels, :mod:`m2ae_infer.triton_executor`: CUDA only, or CPU with ``TRITON_INTERPRET=1`` set, slow);
            ``"openvino"`` (the same ONNX graphs in OpenVINO's CPU plugin, :mod:`m2ae_infer.export.openvino`).
            Every name of :func:`m2ae_infer.backends.backend_names` works, engines registered later included.
        execution: ``"sparse"`` (active pixels only), ``"dense"`` (everything, then gated) or ``"auto"``
            (sparse below ``dense_above`` active fraction).
        threshold: blur probability above which a pixel is computed (``sigmoid(logit) > threshold``); ``None``:
            the threshold stored in the checkpoint's meta (``"threshold"``, chosen on the dev split for the
            shipped checkpoint), else 0.5.
        dilation: grow the predicted mask by this many working pixels (2 input pixels each).
        config, key_map: passed to :func:`load_checkpoint` for checkpoints that need them.
        dense_above: active fraction above which ``execution="auto"`` always runs dense; default: the backend's
            measured switch (torch 1.0: its cost model decides, see ``executor.KernelCosts``; ONNX Runtime 0.6,
            OpenVINO, Triton and TensorRT 0.45).
        tile: ``"auto"`` (images above ``tiling.AUTO_TILE_PIXELS`` pixels run in tiles of ``tiling.DEFAULT_TILE``),
            ``None``/``0`` (never tile) or a tile size in pixels (rounded up to a multiple of 4). Tiled
            output equals untiled output within float rounding (see :mod:`m2ae_infer.tiling`).
        tile_overlap: pixels of context around each tile; default and minimum: the network's receptive
            field (264 for the shipped v2 network, 28 for v1). Smaller values are refused.
        detector_side: the longest side the blur detector sees: a predicted mask of a larger image is made from
            the image averaged down by the smallest integer factor that fits (default 1024, the scale the
            shipped detector was trained at; on full-size photos it flags far fewer sharp pixels,
            :mod:`m2ae_infer.detector_scale`); ``None``/``0``: at the image's own size. The body always runs at
            full resolution; a given mask is used as it is.
        precision: ``"fp32"`` (default; what the contracts hold for) or ``"bf16"``, an opt-in of the ``torch``
            and ``openvino`` backends where the hardware runs bf16 natively (AVX-512-BF16/AMX CPUs; for torch also
            CUDA); the mask stays fp32's, unmasked pixels the input's, restored pixels within
            ``precision.BF16_TOLERANCE`` of fp32. Other backends, and CPUs without bf16, refuse it in one line.
        compile_dense: ``backend="torch"``/``"auto"`` only, opt-in: the dense path through ``torch.compile``. The
            first dense call of each image (or tile) size compiles, tens of seconds on 2 cores
            (``executor.compile_seconds``); later dense calls are faster than eager, and ``execution="auto"``
            weighs the sparse kernels against the compiled dense path. Results and FLOPs are the eager path's.
    """

    def __init__(self, checkpoint: str | os.PathLike | M2AENet | None = None, device: str = "auto",
                 backend: str = "auto", execution: str = "auto", threshold: float | None = None, dilation: int = 0,
                 config=None, key_map=None, dense_above: float | None = None, tile: int | str | None = "auto",
                 tile_overlap: int | None = None, precision: str = "fp32", compile_dense: bool = False,
                 detector_side: int | None = DETECTOR_SIDE):
        if backend != "auto":
            backend_entry(backend)    # an unknown name fails here, before the checkpoint loads
        check_precision(backend, precision)
        check_compile_dense(backend, compile_dense)
        if execution not in EXECUTIONS:
            raise InvalidArgument("execution", f"execution must be one of {EXECUTIONS}, got {execution!r}")
        check_mask_settings(0.5 if threshold is None else threshold, dilation)
        self.detector_side = check_detector_side(detector_side)
        self.device = _resolve_device(device)
        self.execution = execution
        net, stored = self._load(checkpoint, config, key_map)
        self.threshold, self.dilation = float(stored if threshold is None else threshold), dilation
        self.network = reparameterize_model(net).to(self.device)
        self.executor = make_backend(backend, self.network, device=self.device, execution=execution,
                                     threshold=self.threshold, dilation=dilation, dense_above=dense_above,
                                     precision=precision, compile_dense=compile_dense)
        self.backend = self.executor.name
        self.tiling = Tiling.resolve(tile, tile_overlap, receptive_field(self.network))
        self._mask_flops = None   # the tiled runs' FLOP counter, made on first use

    @staticmethod
    def _load(checkpoint, config, key_map) -> tuple[M2AENet, float]:
        """The network and the threshold its checkpoint's meta recommends (0.5 when it names none)."""
        if isinstance(checkpoint, M2AENet):
            net = checkpoint
        else:
            net = Deblurrer._load_file(checkpoint, config, key_map)
        stored = getattr(net, "checkpoint_meta", {}).get("threshold", DEFAULT_THRESHOLD)
        ok = isinstance(stored, (int, float)) and not isinstance(stored, bool) and 0.0 < stored < 1.0
        return net, float(stored) if ok else DEFAULT_THRESHOLD

    @staticmethod
    def _load_file(checkpoint, config, key_map) -> M2AENet:
        if checkpoint is None:
            if not DEFAULT_CHECKPOINT.is_file():
                raise FileNotFoundError(f"no default checkpoint is shipped in this install ({DEFAULT_CHECKPOINT}); "
                                        "pass checkpoint=PATH to a trained M2AENet checkpoint")
            checkpoint = DEFAULT_CHECKPOINT
        return load_checkpoint(checkpoint, config=config, key_map=key_map)

    def run(self, img, mask=None, return_info: bool = False):
        """Deblur one image (or a BCHW batch).

        Args:
            img: a path, a PIL image, a numpy ``HW``/``HWC`` array (uint8, uint16, float in [0, 1]) or a
                torch ``CHW``/``BCHW`` tensor. Gray and RGBA work (alpha passes through untouched).
            mask: ``None`` to predict the blur mask; ``"full"`` to restore everything (globally blurred
                photos); or your own mask (bool / 0-1 / 0-255 numpy, torch or PIL, or a path) of the image's
                height and width.
            return_info: also return a :class:`RunInfo`.
        Returns:
            The restored image as the same kind, dtype and size as ``img`` (a PIL image for a path), and
            the :class:`RunInfo` when ``return_info`` is true. Pixels outside the mask are bit-identical.

        A path is read with its EXIF orientation applied (the result is upright, without the tag). A PIL
        image is used as stored, so the result keeps its stored orientation and carries the input's EXIF,
        orientation tag included, in ``result.info["exif"]`` (and ``result.getexif()``): it displays like the
        input, and :func:`~m2ae_infer.save_image` writes that EXIF (``Image.save`` does when given
        ``exif=result.info["exif"]``). A multi-frame image (path or PIL) warns with an ImageWarning: only
        its first frame is deblurred.
        """
        prepared = prepare_image(img)
        batch, _, height, width = prepared.shape
        user_mask = self._mask_tensor(mask, batch, height, width)
        tiles = self.tiling.tiles(batch, height, width)
        scale = detector_factor(height, width, self.detector_side) if user_mask is None else 1
        if tiles is not None:
            return self._run_tiled(img, prepared, tiles, user_mask, return_info, scale)
        rgb = prepared.rgb.to(self.device)
        start = time.perf_counter()
        seen = None
        if scale > 1:   # the mask at the detector's scale, then given to the backend like a user's
            user_mask, seen = self._scaled_mask(lambda top, bottom: rgb[..., top:bottom, :], prepared.shape, scale)
        result = self.executor.run(rgb, user_mask, threshold=self.threshold, dilation=self.dilation,
                                   execution=self.execution)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        # every backend leaves the pixels outside its mask bit for bit (README: Contracts), so an input whose
        # pixels round-trip is converted whole, with no per-pixel select; then the changed mask is for RunInfo only
        select = not prepared.round_trips
        changed = full_resolution(result.mask, (height, width)).cpu() if select or return_info else None
        restored = prepared.restore(result.output.cpu(), changed if select else None)
        if not return_info:
            return restored
        predicted = user_mask is None
        detector = self._mask_counter()(batch, *seen) if seen is not None else 0
        dense = self.executor.count_flops(batch, height, width, 0, "dense", predicted) + detector
        info = RunInfo(
            mask=self._user_mask_view(changed, img),
            active_fraction=result.active_pixels / result.mask.numel(),
            flops_dense=dense,
            flops_executed=detector + self.executor.count_flops(batch, height, width, result.active_pixels,
                                                                result.execution, predicted, result.sparse_tiles,
                                                                result.tile_pixels, result.stem_cells),
            seconds=seconds, execution=result.execution, backend=self.backend, flops_untiled=dense,
            detector_scale=scale)
        return restored, info

    def _scaled_mask(self, region, shape, scale: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """The mask predicted at ``1/scale`` of the image's size, at full size ``[B, 1, H, W]`` (what the backends
        take as a given mask), and the size the detector saw."""
        working, seen = scaled_mask(self.network, region, shape, scale, self.threshold, self.dilation, self.device)
        return full_resolution(working, shape[-2:]), seen

    def _mask_counter(self) -> MaskPassFlops:
        """The mask pass's FLOP counter (per crop shape, cached), made on first use."""
        if self._mask_flops is None:
            self._mask_flops = MaskPassFlops(self.network)
        return self._mask_flops

    def _run_tiled(self, img, prepared, tiles, user_mask, return_info: bool, scale: int = 1):
        """:meth:`run` for images cut into ``tiles`` (:func:`m2ae_infer.tiling.run_tiled`); with ``scale`` > 1 the
        mask is predicted first, at the detector's scale, from the image read in bands."""
        counter = self._mask_counter() if return_info else None
        start, detector = time.perf_counter(), 0
        if scale > 1:
            user_mask, seen = self._scaled_mask(prepared.band, prepared.shape, scale)
            detector = counter(prepared.shape[0], *seen) if counter is not None else 0
        mask_seconds = time.perf_counter() - start
        run = run_tiled(prepared, tiles, self.executor, self.network, self.device, user_mask,
                        threshold=self.threshold, dilation=self.dilation, execution=self.execution,
                        count_flops=return_info, flop_counter=counter)
        restored = prepared.finish(run.output)
        if not return_info:
            return restored
        changed = full_resolution(run.mask, prepared.shape[-2:]).cpu()
        batch, _, height, width = prepared.shape
        # Counted on meta tensors: no untiled run happens.
        untiled = self.executor.count_flops(batch, height, width, 0, "dense", user_mask is None) + detector
        info = RunInfo(mask=self._user_mask_view(changed, img), active_fraction=run.active_pixels / run.mask.numel(),
                       flops_dense=run.flops_dense + detector, flops_executed=run.flops_executed + detector,
                       seconds=run.seconds + mask_seconds, execution=run.execution, backend=self.backend,
                       tiles=run.tiles, flops_untiled=untiled, detector_scale=scale)
        return restored, info

    def _mask_tensor(self, mask, batch: int, height: int, width: int) -> torch.Tensor | None:
        """User mask -> ``[B, 1, H, W]`` bool on the device (None: predict it)."""
        if mask is None:
            return None
        if isinstance(mask, str) and mask == "full":
            return torch.ones((batch, 1, height, width), dtype=torch.bool, device=self.device)
        if isinstance(mask, (str, os.PathLike)):
            mask = load_image(mask)
        if isinstance(mask, torch.Tensor):
            check_tensor(mask, f"mask ({mask.dtype} tensor of shape {tuple(mask.shape)})")
        else:
            try:
                array = np.asarray(mask)   # no copy (the mask is only read), unless torch could not share it
                array = array if array.flags.writeable else array.copy()
                # torch reads native byte order only; a big-endian mask is as valid as a big-endian image
                mask = torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=False))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"mask must be None, 'full', an array, a tensor, a PIL image or a path; "
                                 f"got {type(mask).__name__} ({one_line(exc, 80)})") from exc
        if mask.dtype.is_complex:
            raise ValueError(f"mask must be bool or real numbers (nonzero = blurred), got {mask.dtype}")
        if mask.is_floating_point() and not torch.isfinite(mask).all():
            raise ValueError("mask holds NaN or Inf; pass a bool or 0/1 mask")
        if mask.dim() == 3 and mask.shape[-1] in (3, 4) and tuple(mask.shape[:2]) == (height, width):
            mask = mask[..., 0]                      # an RGB(A) mask image: use its first channel
        # Accept [H, W], [1, H, W], [B, H, W], [1, 1, H, W] and [B, 1, H, W].
        if mask.dim() < 2 or tuple(mask.shape[-2:]) != (height, width) or mask.numel() not in (
                height * width, batch * height * width):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the image "
                             f"({batch}x{height}x{width}); pass an H x W mask")
        mask = mask.reshape(-1, 1, height, width).expand(batch, 1, height, width)
        return (mask if mask.dtype == torch.bool else mask != 0).to(self.device)

    @staticmethod
    def _user_mask_view(changed: torch.Tensor, img):
        """The changed-pixel mask ``[B, 1, H, W]`` in the form RunInfo documents."""
        if isinstance(img, torch.Tensor):
            mask = changed[:, 0].to(img.device)
            return mask if img.dim() == 4 else mask[0]
        return changed[0, 0].numpy()


def _resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if resolved.type not in ("cpu", "cuda"):   # meta, mps, ...: the executors run on CPU and CUDA only
        raise ValueError(f"device {device!r} is not supported; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here; use device='cpu'")
    return resolved


__all__ = ["Deblurrer", "RunInfo", "ImageError"]
