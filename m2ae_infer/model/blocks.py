"""Re-parameterizable body block of M2AENet.

``F(x) = mix_out(simple_gate(mix_in(act(spatial(x)))))`` with the residual update ``x <- x + m * F(x)``
applied by the network. ``spatial`` is the ONLY spatial operator of the block (a 3x3 conv); everything
after it is per pixel, so a pixel's update needs nothing but its own 3x3 neighbourhood of ``x``.

Training form of ``spatial``: RepVGG branches 3x3 conv+BN, 1x1 conv+BN and an identity BN, summed.
Deploy form: one 3x3 conv with bias, obtained exactly by :meth:`RepBlock.reparameterize`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.reference import activation


class ConvBN(nn.Sequential):
    """``k x k`` convolution without bias followed by BatchNorm (one RepVGG branch)."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(channels)


def fuse_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the preceding bias-free conv: returns (weight, bias)."""
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std
    return kernel * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


class RepBlock(nn.Module):
    """Masked residual body block; ``forward`` returns the update ``F(x)`` (not ``x + F(x)``).

    Args:
        channels: C, input and output width.
        ffn_channels: E, width after the simple gate of the pointwise mixer.
        act: activation name applied after the spatial conv.
        inference_mode: build the deploy form directly (for loading deploy checkpoints).
    """

    def __init__(self, channels: int, ffn_channels: int, act: str = "gelu", inference_mode: bool = False):
        super().__init__()
        self.channels, self.act = channels, act
        if inference_mode:
            self.spatial = nn.Conv2d(channels, channels, 3, padding=1, bias=True)
        else:
            self.rbr_3x3 = ConvBN(channels, 3)
            self.rbr_1x1 = ConvBN(channels, 1)
            self.rbr_identity = nn.BatchNorm2d(channels)
        self.mix_in = nn.Conv2d(channels, 2 * ffn_channels, 1)
        self.mix_out = nn.Conv2d(ffn_channels, channels, 1)

    @property
    def inference_mode(self) -> bool:
        return hasattr(self, "spatial")

    def spatial_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inference_mode:
            return self.spatial(x)
        return self.rbr_3x3(x) + self.rbr_1x1(x) + self.rbr_identity(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W] -> [N, C, H, W]``: the residual update F(x)."""
        h = activation(self.spatial_forward(x), self.act)
        a, b = self.mix_in(h).chunk(2, dim=1)
        return self.mix_out(a * b)

    def merged_spatial(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The three training branches as one 3x3 conv (weight ``[C, C, 3, 3]``, bias ``[C]``)."""
        w3, b3 = fuse_bn(self.rbr_3x3.conv.weight, self.rbr_3x3.bn)
        w1, b1 = fuse_bn(F.pad(self.rbr_1x1.conv.weight, [1, 1, 1, 1]), self.rbr_1x1.bn)
        identity = torch.zeros_like(w3)
        identity[torch.arange(self.channels), torch.arange(self.channels), 1, 1] = 1.0
        wi, bi = fuse_bn(identity, self.rbr_identity)
        return w3 + w1 + wi, b3 + b1 + bi

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Switch to the deploy form in place (idempotent). Exact in eval mode: BN uses running stats."""
        if self.inference_mode:
            return
        weight, bias = self.merged_spatial()
        self.spatial = nn.Conv2d(self.channels, self.channels, 3, padding=1, bias=True).to(weight)
        self.spatial.weight.copy_(weight)
        self.spatial.bias.copy_(bias)
        del self.rbr_3x3, self.rbr_1x1, self.rbr_identity

    @torch.no_grad()
    def expand(self) -> None:
        """The inverse of :meth:`reparameterize`, in place (idempotent): training-form branches that merge
        back into exactly the deploy conv, so a deploy checkpoint can be fine-tuned (``m2ae-train --train
        body``). The 3x3 branch carries the kernel, its BN the bias (scale ``weight / std`` is exactly 1 in eval
        mode: the weight is set to that std); the 1x1 and identity branches start at zero and may grow. Exact
        only while the BatchNorms stay in eval mode (batch statistics would change the output)."""
        if not self.inference_mode:
            return
        weight, bias = self.spatial.weight, self.spatial.bias
        self.rbr_3x3, self.rbr_1x1 = ConvBN(self.channels, 3).to(weight), ConvBN(self.channels, 1).to(weight)
        self.rbr_identity = nn.BatchNorm2d(self.channels).to(weight)
        self.rbr_3x3.conv.weight.copy_(weight)
        self.rbr_1x1.conv.weight.zero_()
        for bn, shift in ((self.rbr_3x3.bn, bias), (self.rbr_1x1.bn, None), (self.rbr_identity, None)):
            bn.weight.copy_((bn.running_var + bn.eps).sqrt())   # scale weight / std == 1 exactly
            bn.bias.copy_(shift) if shift is not None else bn.bias.zero_()
        self.rbr_identity.weight.zero_()                      # the identity branch contributes nothing yet
        del self.spatial

    @property
    def pointwise(self) -> tuple[nn.Conv2d, ...]:
        """The per-pixel maps after ``act(spatial(x))``, in order, a simple gate between each two: what the
        sparse executors pack (:mod:`m2ae_infer.packing`) next to ``spatial``."""
        return self.mix_in, self.mix_out
