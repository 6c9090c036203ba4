"""Standard dense restoration networks, rebuilt from their papers, to place our numbers.

NAFNet (Chen, Chu, Zhang and Sun, "Simple Baselines for Image Restoration", ECCV 2022): a U-Net of NAFBlocks
(LayerNorm -> 1x1 expand -> 3x3 depthwise -> SimpleGate -> simplified channel attention -> 1x1, then a
LayerNorm -> 1x1 -> SimpleGate -> 1x1 feed-forward; both residual with learned scales), 2x2 stride-2 convs
down, 1x1 conv + pixel shuffle up, additive skips, a global residual. Built here from the paper's description
and its published block layout; widths and depths are chosen to match our network's size (see
:data:`BASELINES`). Random weights: FLOPs and latency do not depend on their values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of ``[B, C, H, W]`` at every pixel."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        return (x - mu) / (var + self.eps).sqrt() * self.weight[:, None, None] + self.bias[:, None, None]


def simple_gate(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=1)
    return a * b


class NAFBlock(nn.Module):
    def __init__(self, c: int, dw_expand: int = 2, ffn_expand: int = 2):
        super().__init__()
        dw = c * dw_expand
        self.norm1, self.norm2 = LayerNorm2d(c), LayerNorm2d(c)
        self.conv1 = nn.Conv2d(c, dw, 1)
        self.conv2 = nn.Conv2d(dw, dw, 3, padding=1, groups=dw)
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dw // 2, dw // 2, 1))
        self.conv3 = nn.Conv2d(dw // 2, c, 1)
        self.conv4 = nn.Conv2d(c, ffn_expand * c, 1)
        self.conv5 = nn.Conv2d(ffn_expand * c // 2, c, 1)
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x = simple_gate(self.conv2(self.conv1(self.norm1(inp))))
        y = inp + self.conv3(x * self.sca(x)) * self.beta
        x = self.conv5(simple_gate(self.conv4(self.norm2(y))))
        return y + x * self.gamma


class NAFNet(nn.Module):
    """NAFNet U-Net: ``width`` channels at full resolution, doubled at each of ``len(enc_blocks)`` levels."""

    def __init__(self, width: int = 16, enc_blocks=(1, 1, 1, 1), middle_blocks: int = 1, dec_blocks=(1, 1, 1, 1)):
        super().__init__()
        if len(enc_blocks) != len(dec_blocks):
            raise ValueError("NAFNet needs as many decoder levels as encoder levels")
        self.intro = nn.Conv2d(3, width, 3, padding=1)
        self.ending = nn.Conv2d(width, 3, 3, padding=1)
        self.encoders, self.downs, self.ups, self.decoders = (nn.ModuleList() for _ in range(4))
        chan = width
        for n in enc_blocks:
            self.encoders.append(nn.Sequential(*[NAFBlock(chan) for _ in range(n)]))
            self.downs.append(nn.Conv2d(chan, 2 * chan, 2, stride=2))
            chan *= 2
        self.middle = nn.Sequential(*[NAFBlock(chan) for _ in range(middle_blocks)])
        for n in dec_blocks:
            self.ups.append(nn.Sequential(nn.Conv2d(chan, chan * 2, 1, bias=False), nn.PixelShuffle(2)))
            chan //= 2
            self.decoders.append(nn.Sequential(*[NAFBlock(chan) for _ in range(n)]))
        self.multiple = 2 ** len(enc_blocks)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        h, w = inp.shape[-2:]
        x = F.pad(inp, (0, -w % self.multiple, 0, -h % self.multiple))
        x = self.intro(x)
        skips = []
        for encoder, down in zip(self.encoders, self.downs):
            x = encoder(x)
            skips.append(x)
            x = down(x)
        x = self.middle(x)
        for decoder, up, skip in zip(self.decoders, self.ups, reversed(skips)):
            x = decoder(up(x) + skip)
        return (self.ending(x) + F.pad(inp, (0, -w % self.multiple, 0, -h % self.multiple)))[..., :h, :w]


# name -> constructor. The first two are sized near our default network (92.8k parameters in deploy form);
# "NAFNet-w32-GoPro" is the paper's GoPro deblurring layout (width 32, 36 blocks, 17.1M parameters).
BASELINES = {
    "NAFNet-w16-d2": lambda: NAFNet(16, (1, 1), 1, (1, 1)),
    "NAFNet-w16-d3": lambda: NAFNet(16, (1, 1, 1), 1, (1, 1, 1)),
    "NAFNet-w32-GoPro": lambda: NAFNet(32, (1, 1, 1, 28), 1, (1, 1, 1, 1)),
}
DEFAULT_BASELINES = ("NAFNet-w16-d2", "NAFNet-w16-d3")


def build_baseline(name: str) -> nn.Module:
    """A baseline network by name, in eval mode, channels-last (oneDNN's fast layout on CPU)."""
    try:
        net = BASELINES[name]()
    except KeyError:
        raise ValueError(f"unknown baseline {name!r}; choose from {sorted(BASELINES)}") from None
    return net.eval().to(memory_format=torch.channels_last)


def parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
