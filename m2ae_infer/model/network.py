"""M2AENet: our reconstruction of the motion-aware adaptive pixel pruning network (README: What it does).

::

    image [B,3,H,W] --pad to even--> unshuffle x2 --> stem 3x3 --> s [B,C,H/2,W/2]
    s --> BlurMaskHead --> logits --> working mask m [B,1,H/2,W/2]
    x = s;  x <- x + m * motion(x);  for each block: x <- x + m * block(x)
    out = where(m up x2, image + shuffle(tail(x)), image) --> crop to H x W

The module's ``forward`` is the dense masked reference (every stage computed everywhere, then gated).
The sparse executor (:mod:`m2ae_infer.executor`) computes the same thing at the active pixels only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import M2AEConfig
from .blocks import RepBlock
from .detector import MultiScaleBlurDetector
from .mask import BlurMaskHead, binarize, full_resolution, pad_to_even, working_mask
from .motion import MotionAnalyzer

SHUFFLE = 2  # pixel-unshuffle factor: the body runs at half resolution


@dataclass
class TrainOutputs:
    """What the trainer needs from one forward pass (all at the padded, even size)."""

    restored: torch.Tensor      # [B, 3, H, W]
    mask_logits: torch.Tensor   # [B, 1, H/2, W/2]
    trajectory: torch.Tensor    # [B, 4, H/2, W/2] quadratic trajectory parameters, input pixels


def make_mask_head(cfg: M2AEConfig) -> nn.Module:
    """The blur-mask predictor ``cfg.detector`` names (see :data:`m2ae_infer.config.DETECTORS`)."""
    if cfg.detector == "multiscale":
        return MultiScaleBlurDetector(cfg.mask_channels, cfg.mask_layers, cfg.act)
    return BlurMaskHead(cfg.channels, cfg.mask_channels, cfg.mask_layers, cfg.act)


class M2AENet(nn.Module):
    """Local-motion deblurring network with a blur-mask gated, re-parameterizable body.

    Args:
        config: architecture size; ``M2AEConfig()`` if omitted.
        inference_mode: build the deploy form directly (what deploy checkpoints load into).
    """

    def __init__(self, config: M2AEConfig | None = None, inference_mode: bool = False):
        super().__init__()
        self.config = cfg = config or M2AEConfig()
        c = cfg.channels
        self.unshuffle = nn.PixelUnshuffle(SHUFFLE)
        self.stem = nn.Conv2d(3 * SHUFFLE**2, c, 3, padding=1)
        self.mask_head = make_mask_head(cfg)
        self.motion = MotionAnalyzer(c, cfg.motion_channels, cfg.act, inference_mode)
        self.blocks = nn.ModuleList(RepBlock(c, cfg.ffn_channels, cfg.act, inference_mode)
                                    for _ in range(cfg.num_blocks))
        self.tail = nn.Conv2d(c, 3 * SHUFFLE**2, 1)
        self.shuffle = nn.PixelShuffle(SHUFFLE)

    @property
    def inference_mode(self) -> bool:
        """True once every stage is in deploy form (see :func:`m2ae_infer.reparameterize_model`)."""
        return self.motion.inference_mode and all(b.inference_mode for b in self.blocks)

    # -- stages shared by every execution path -------------------------------------------------
    def stem_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``stem(unshuffle(image))`` as one 6x6 stride-2 convolution of the image, padding 2: ``(weight [C, 3,
        6, 6], bias [C])``. The unshuffle's channel order is folded into the weight: unshuffled channel
        ``4c + 2i + j`` at ``(y, x)`` is pixel ``(2y + i, 2x + j)`` of channel c."""
        c = self.stem.out_channels
        weight = self.stem.weight.view(c, 3, SHUFFLE, SHUFFLE, 3, 3).permute(0, 1, 4, 2, 5, 3)
        return weight.reshape(c, 3, 3 * SHUFFLE, 3 * SHUFFLE), self.stem.bias

    def stem_features(self, image: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` (H, W even) -> ``[B, C, H/2, W/2]``: ``stem(unshuffle(image))``, computed as the
        equivalent 6x6 stride-2 convolution (:meth:`stem_kernel`). One conv instead of a pixel-unshuffle copy and
        a conv: 16 ms against 23 ms at 720p on 2 CPU threads."""
        weight, bias = self.stem_kernel()
        return F.conv2d(image, weight, bias, stride=SHUFFLE, padding=SHUFFLE)

    def mask_features(self, padded: torch.Tensor) -> torch.Tensor | None:
        """What the mask head reads besides the image: the stem features (a v1 head), or None for a head that reads
        the image alone (v2), so a mask pass need not run the stem."""
        return None if self.mask_head.reads_image else self.stem_features(padded)

    def mask_logits(self, padded: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Blur logits ``[B, 1, H/2, W/2]`` from the padded image ``[B, 3, H, W]`` and its stem features
        (each mask head reads the one it needs)."""
        return self.mask_head(padded, features)

    def predict_mask(self, padded: torch.Tensor, features: torch.Tensor, threshold: float = 0.5,
                     dilation: int = 0) -> torch.Tensor:
        """Working mask ``[B, 1, H/2, W/2]`` bool from the padded image and its stem features."""
        return binarize(self.mask_logits(padded, features), threshold, dilation)

    def stages(self) -> list[nn.Module]:
        """The masked residual stages in execution order: motion analyzer, then the body blocks."""
        return [self.motion, *self.blocks]

    # -- dense masked reference ----------------------------------------------------------------
    def forward(self, image: torch.Tensor, mask: torch.Tensor | None = None,
                threshold: float = 0.5, dilation: int = 0) -> torch.Tensor:
        """Dense masked execution: every stage everywhere, gated by the mask.

        Args:
            image: ``[B, 3, H, W]`` float in [0, 1]; any H, W >= 1.
            mask: optional full-resolution ``[B, 1, H, W]`` bool; predicted when omitted.
        Returns:
            ``[B, 3, H, W]``; bit-identical to ``image`` outside the (working) mask.
        """
        height, width = image.shape[-2:]
        padded = pad_to_even(image)
        features = self.stem_features(padded)
        m = self.predict_mask(padded, features, threshold, dilation) if mask is None else working_mask(mask)
        return self.masked_body(padded, features, m)[..., :height, :width]

    def masked_body(self, padded: torch.Tensor, features: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Stages and tail, densely computed and gated by the working mask ``m``.

        The body runs in the dtype of this network's weights (a bfloat16 copy runs it in bf16,
        :class:`~m2ae_infer.executor.TorchExecutor` ``precision="bf16"``); the sum with the image and the
        pass-through stay in the image's dtype, so unmasked pixels are the input's bit for bit either way."""
        x = features.to(self.tail.weight.dtype)
        for stage in self.stages():
            # where() rather than x + m * F(x): exact pass-through even if F(x) is inf/nan somewhere.
            x = torch.where(m, x + stage(x), x)
        delta = self.shuffle(self.tail(x))
        return torch.where(full_resolution(m, padded.shape[-2:]), padded + delta, padded)

    def forward_train(self, image: torch.Tensor, mask: torch.Tensor, gate_predicted: bool = False) -> TrainOutputs:
        """Training pass: the body gated by the annotated working mask ``mask`` ``[B, 1, H/2, W/2]``
        (float 0/1), the mask head's logits and the trajectories returned for their losses.

        ``gate_predicted``: gate with the union of ``mask`` and the mask head's own hard mask (logit > 0,
        no gradient), so the body also sees the sharp pixels the predictor wrongly flags and learns to leave
        them alone, as it must at inference."""
        features = self.stem_features(image)
        logits = self.mask_logits(image, features)
        if gate_predicted:
            mask = torch.maximum(mask, (logits.detach() > 0).to(mask.dtype))
        guide, trajectory = self.motion.forward_with_trajectory(features)
        x = features + mask * guide
        for block in self.blocks:
            x = x + mask * block(x)
        up = full_resolution(mask, image.shape[-2:])
        restored = image + up * self.shuffle(self.tail(x))
        return TrainOutputs(restored, logits, trajectory)
