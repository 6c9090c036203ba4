"""Shared test utilities: random networks that prove something, and masks of every shape."""
from __future__ import annotations

import os

import torch
from torch import nn

from m2ae_infer import M2AEConfig, M2AENet
from m2ae_infer.benchmarks.masks import smooth_noise


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and every BatchNorm statistic random values, in place.

    A fresh BatchNorm is an identity (mean 0, var 1, weight 1, bias 0) and would hide a wrong fold;
    random biases make the residual updates visible. Scales keep activations O(1).
    """
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            # weights ~ 0.5/sqrt(fan_in), biases ~ 0.1: residual updates stay O(1) through the stages,
            # so absolute tolerances mean what they say.
            scale = 0.5 / p[0].numel() ** 0.5 if p.dim() > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=gen) * 0.5)
            module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
            module.weight.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
            module.bias.copy_(torch.randn(module.num_features, generator=gen) * 0.5)
    return model


def random_net(config: str | M2AEConfig = "tiny", seed: int = 0) -> M2AENet:
    """A training-form network with random weights and BN statistics, in eval mode."""
    cfg = M2AEConfig.from_name(config) if isinstance(config, str) else config
    return randomize_(M2AENet(cfg), seed).eval()


def make_mask(kind: str, height: int, width: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """Full-resolution bool masks ``[B, 1, H, W]`` of the kinds the contracts name."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, 1, height, width, dtype=torch.bool)
    if kind == "empty":
        pass
    elif kind == "full":
        mask[:] = True
    elif kind == "one_pixel":
        mask[:, :, height // 2, width // 2] = True
    elif kind == "corners":
        mask[:, :, [0, 0, -1, -1], [0, -1, 0, -1]] = True
    elif kind == "borders":
        mask[:, :, [0, -1], :] = True
        mask[:, :, :, [0, -1]] = True
    elif kind.startswith("random"):          # e.g. "random0.05": scattered pixels
        frac = float(kind[len("random"):])
        mask = torch.rand(batch, 1, height, width, generator=gen) < frac
    elif kind == "blobs":                    # smooth low-pass noise thresholded: object-like regions
        mask = smooth_noise(batch, height, width, 8, gen, mode="bilinear") > 0.6
    else:
        raise ValueError(kind)
    return mask


MASK_KINDS = ["empty", "full", "one_pixel", "corners", "borders", "random0.01", "random0.2", "random0.5", "blobs"]


def shipped_tiling() -> tuple[int, int]:
    """``(overlap, least)`` of the shipped checkpoint: its minimum tile overlap and the smallest ``--tile`` the
    CLI takes (``MIN_TILE_OVERLAPS`` overlaps), so CLI tiling tests follow the shipped network's receptive field."""
    from m2ae_infer import Deblurrer
    from m2ae_infer.jobs import MIN_TILE_OVERLAPS
    overlap = Deblurrer(tile=None).tiling.overlap
    return overlap, MIN_TILE_OVERLAPS * overlap


GIB = 2**30


def sparse_checkpoint(obj, path) -> None:
    """``torch.save(obj, path)`` without writing any tensor's bytes (``torch.serialization.skip_data``): the file
    declares every tensor at its full size, reads back zeros, and takes no disk for them (a sparse file), so a
    test can hold a 1 GiB tensor without 1 GiB of memory or disk. Tensors in ``obj`` may be ``torch.empty``
    (never touched)."""
    import torch
    with torch.serialization.skip_data():
        torch.save(obj, path)


_DEFLATED: dict = {}


def deflated_checkpoint(name: str, obj_factory) -> bytes:
    """The bytes of ``sparse_checkpoint(obj_factory())`` re-zipped with ZIP_DEFLATED (cached under ``name``): a
    1 GiB tensor of zeros becomes ~1 MB, the zip bomb of issue 18. Building one takes ~3 s of zlib."""
    if name not in _DEFLATED:
        import io
        import tempfile
        import zipfile
        with tempfile.TemporaryDirectory() as tmp:
            source = os.path.join(tmp, "sparse.pth")
            sparse_checkpoint(obj_factory(), source)
            out = io.BytesIO()
            with zipfile.ZipFile(source) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
                zeros = bytes(4 * 2**20)
                for info in src.infolist():
                    if "/data/" not in info.filename:   # data.pkl, version, ...: copied
                        dst.writestr(info.filename, src.read(info.filename))
                        continue
                    with dst.open(info.filename, "w", force_zip64=True) as target:   # tensor bytes: zeros
                        left = info.file_size      # (skip_data's records hold no bytes, and no valid CRC)
                        while left:
                            target.write(zeros[:min(left, len(zeros))])
                            left -= min(left, len(zeros))
        _DEFLATED[name] = out.getvalue()
    return _DEFLATED[name]
