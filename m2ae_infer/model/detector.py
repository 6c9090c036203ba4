"""Blur detector v2: its own directional features and a few hundred pixels of context (docs/model_card.md).

The v1 head (:class:`~m2ae_infer.model.mask.BlurMaskHead`) reads the body's stem features and sees +-31 input
pixels; it could not tell motion blur from defocus, flat surfaces or low-texture areas. This detector reads the
image itself::

    image [B,3,H,W] -> luma -> 5x5 filter bank (E oriented/scale filters, learned) -> square
          -> 4x4 average (local energy per filter) -> log            [B, E, H/4, W/4]
    image -> 4x4 average (colour/brightness context)                 [B, 3, H/4, W/4]
    concat -> 3x3 conv (1/4) -> stride-2 3x3 conv (1/8) -> residual dilated 3x3 convs (1, 2, 4, ... at 1/8)
          -> 1x1 logit at 1/8 -> bilinear up to the working grid [B, 1, H/2, W/2]
    (every trunk conv is followed by a BatchNorm: h = act(bn(conv(h))), or h + act(bn(conv(h))) in the
    dilated part)

Why these pieces:
* Motion blur is directional: gradients vanish along the motion and survive across it, while defocus and
  flat surfaces are isotropic. Log energies of oriented filters make that a *difference* of features (log a -
  log b), which a linear layer reads directly and which does not change when the local contrast changes.
* A blurred region is told from a smooth one by context (edges nearby that stop being sharp), so the trunk
  runs at 1/8 resolution with dilations up to 2**(layers-1): a few hundred input pixels for a small share of
  the dense FLOPs (it is the unprunable floor; ``m2ae-bench`` reports its share).
* Trainability: without normalization and residuals the 8-conv trunk did not learn on the corpus scenes
  (measured: the loss stayed at the trivial 1.5 for 750 steps, pre-activations drifted to -10 and GELU units
  died); with BatchNorm and residual dilated convs the same 600-step probe went 1.58 -> 1.35. BatchNorm stays
  in the deploy form as what eval mode computes, a per-channel affine map: pixel-local, so tiling and the
  receptive field are unchanged (:meth:`reparameterize` folds it into the convs).
* Every layer is a convolution or an average pool with a fixed grid, so the receptive field is finite and
  :mod:`m2ae_infer.tiling` can compute the logits tile by tile (:meth:`spatial_layers` lists the chain).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.reference import activation

LUMA = (0.299, 0.587, 0.114)   # ITU-R BT.601: motion blur shows in luma; 1 channel keeps the full-res filter cheap
ENERGY_EPS = 1e-4              # log(energy + eps): ~1/100 grey level of gradient, below 8-bit quantization
# log energies span about -9.2 (flat) .. 0 (strong edges); unscaled, they saturated the trunk and training
# collapsed to "nothing is blurred" (measured): centre and scale them to about -1 .. 2.
LOG_ENERGY_CENTRE, LOG_ENERGY_SCALE = -6.0, 1.0 / 3.0


class MultiScaleBlurDetector(nn.Module):
    """Blur logits from the padded image (even H, W); ignores the stem features.

    Args:
        filters: E, number of learned 5x5 luma filters whose local log-energies feed the trunk.
        channels: trunk width at 1/8 resolution (the 1/4-resolution conv is half as wide).
        layers: dilated 3x3 convs at 1/8 resolution, dilations 1, 2, 4, ...
        act: activation after each trunk conv.
    """

    reads_image = True
    jump = 8            # input pixels per logit cell

    def __init__(self, channels: int, layers: int, act: str, filters: int = 12):
        super().__init__()
        self.act = act
        self.register_buffer("luma", torch.tensor(LUMA).view(1, 3, 1, 1), persistent=False)
        self.filters = nn.Conv2d(1, filters, 5, padding=2, bias=False)
        self.energy_pool = nn.AvgPool2d(4)
        self.colour_pool = nn.AvgPool2d(4)
        quarter = max(channels // 2, 8)
        self.quarter = nn.Conv2d(filters + 3, quarter, 3, padding=1)
        self.down = nn.Conv2d(quarter, channels, 3, stride=2, padding=1)
        self.trunk = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=2 ** i, dilation=2 ** i)
                                   for i in range(layers))
        self.norms = nn.ModuleList(nn.BatchNorm2d(c) for c in (quarter, channels, *([channels] * layers)))
        # True once the norms are folded into the convs (deploy form). A Python bool drives forward (meta-device
        # and ONNX tracing need no tensor read); the buffer carries it through checkpoints.
        self.folded = False
        self.register_buffer("norms_folded", torch.tensor(False))
        self.logit = nn.Conv2d(channels, 1, 1)
        _init_derivative_filters(self.filters.weight)

    def forward(self, image: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, 3, H, W]`` (H, W even) -> logits ``[B, 1, H/2, W/2]`` on the working grid."""
        size = (image.shape[-2] // 2, image.shape[-1] // 2)
        return self.upsample(self.coarse_logits(image, features), size)

    def coarse_logits(self, image: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, 3, H, W]`` -> logits ``[B, 1, ceil(H/8), ceil(W/8)]`` before the upsample (local: see tiling)."""
        # luma as a 1x1 convolution: a weighted sum over the channels of a channels-last image ran as a slow strided
        # reduction, and the 1-channel map it made sent the filter bank down a slow path. With the in-place square
        # below, a whole 720p call with a predicted mask went from 84.6-101.0 to 78.0-93.7 ms (old and new code
        # interleaved in one process, two runs, 2 threads); the mask was the same, the output within 6e-8.
        luma = F.conv2d(image, self.luma.to(image.dtype))
        response = self.filters(luma)
        # squared in place where nothing keeps the response for a backward pass: no second 12-channel full-size map
        response = response ** 2 if torch.is_grad_enabled() else response.square_()
        energy = torch.log(self.energy_pool(_pad_to(response, 4)) + ENERGY_EPS)
        energy = (energy - LOG_ENERGY_CENTRE) * LOG_ENERGY_SCALE      # O(1) inputs for the trunk
        colour = self.colour_pool(_pad_to(image, 4))
        norms = [_identity] * len(self.norms) if self.folded else list(self.norms)
        h = activation(norms[0](self.quarter(torch.cat([energy, colour], dim=1))), self.act)
        h = activation(norms[1](self.down(h)), self.act)
        for conv, norm in zip(self.trunk, norms[2:]):
            h = h + activation(norm(conv(h)), self.act)
        return self.logit(h)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        flag = state_dict.get(prefix + "norms_folded")
        if flag is not None and flag.device.type != "meta":
            self.folded = bool(flag)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold each BatchNorm (eval statistics) into the conv before it; the norms are then skipped
        (called by :func:`~m2ae_infer.reparameterize_model`; idempotent). The state-dict keys stay the same (the
        norms keep identity statistics), so both forms load into one module."""
        if self.folded:
            return
        for conv, norm in zip((self.quarter, self.down, *self.trunk), self.norms):
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            conv.bias.copy_((conv.bias - norm.running_mean) * scale + norm.bias)
            norm.reset_parameters()     # identity statistics: the folded form carries no stale numbers
        self.folded = True
        self.norms_folded.fill_(True)

    def spatial_layers(self) -> list[nn.Module]:
        """The longest chain of spatial layers from the image to the coarse logits, in order (the colour
        branch, a 4x4 average, reaches less far than the filter bank + energy pool beside it)."""
        return [self.filters, self.energy_pool, self.quarter, self.down, *self.trunk, self.logit]

    @staticmethod
    def upsample(logits: torch.Tensor, size) -> torch.Tensor:
        """Coarse logits -> ``[B, 1, *size]``; not local for odd sizes, so tiled runs apply it to the whole map."""
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad H, W up to a multiple (the pools then cover every pixel; a no-op for typical sizes)."""
    pad_h, pad_w = -x.shape[-2] % multiple, -x.shape[-1] % multiple
    if not (pad_h or pad_w):
        return x
    return F.pad(x, [0, pad_w, 0, pad_h], mode="replicate")


@torch.no_grad()
def _init_derivative_filters(weight: torch.Tensor) -> None:
    """Start the filter bank as first and second derivatives of Gaussians at two scales and four orientations
    (then learned): the training starts from features that already see direction."""
    # Built in numpy: torch ops here would run under the checkpoint loader's meta-device mode, whose first
    # arange/meshgrid imports torch._dynamo (and with it triton) in a plain CPU process.
    y, x = np.mgrid[-2:3, -2:3].astype(np.float64)
    bank = []
    for sigma in (0.8, 1.6):
        g = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
        for theta in np.arange(4) * np.pi / 4:
            bank.append(-(x * np.cos(theta) + y * np.sin(theta)) * g)          # first derivative across theta
        for theta in np.arange(2) * np.pi / 2:
            u = x * np.cos(theta) + y * np.sin(theta)
            bank.append((u * u / sigma ** 2 - 1) * g)                         # second derivative
    rng = np.random.default_rng(0)
    for i in range(weight.shape[0]):
        f = bank[i] if i < len(bank) else rng.standard_normal((5, 5))
        f = f - f.mean()
        weight[i, 0] = torch.from_numpy((f / max(np.linalg.norm(f), 1e-6)).astype(np.float32))
