"""Standard dense restoration networks, rebuilt from their papers, to place our numbers.

NAFNet (Chen, Chu, Zhang and Sun, "Simple Baselines for Image Restoration", ECCV 2022): a U-Net of NAFBlocks
(LayerNorm -> 1x1 expand -> 3x3 depthwise -> SimpleGate -> simplified channel attention -> 1x1, then a
LayerNorm -> 1x1 -> SimpleGate -> 1x1 feed-forward; both residual with learned scales), 2x2 stride-2 convs
down, 1x1 conv + pixel shuffle up, additive skips, a global residual. Built here from the paper's description
and its published block layout; widths and depths are chosen to match our network's size (see
:data:`BASELINES`). Random weights: FLOPs and latency do not depend on their values.

Also the dense engines our own network is timed in (:data:`DENSE_ENGINES`: torch eager, ``torch.compile``,
OpenVINO f32/bf16, ONNX Runtime): the dense rows each sparse cell of ``m2ae-bench`` is compared with.
"""
from __future__ import annotations

import time

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


# ------------------------------------------------------------------------------------ our network, dense elsewhere
# The dense rows of m2ae-bench: our network run densely by other engines, so that a sparse cell is measured
# against the fastest dense execution of the same precision, not only against torch eager.
# name -> (registry backend, precision); "compile" is torch.compile of the dense forward, no registry engine.
DENSE_ENGINES = {"eager": ("torch", "fp32"), "eager-bf16": ("torch", "bf16"), "compile": (None, "fp32"),
                 "openvino-f32": ("openvino", "fp32"), "openvino-bf16": ("openvino", "bf16"),
                 "onnxruntime": ("onnxruntime", "fp32")}
_NEEDS = {"onnxruntime": ("onnx", "onnxscript", "onnxruntime"), "openvino-f32": ("onnx", "onnxscript", "openvino"),
          "openvino-bf16": ("onnx", "onnxscript", "openvino")}


def dense_engine_name(backend: str, precision: str) -> str:
    """The dense-row name of registry engine ``backend`` at ``precision`` (its own name if not listed)."""
    return next((n for n, spec in DENSE_ENGINES.items() if spec == (backend, precision)),
                backend if precision == "fp32" else f"{backend}-{precision}")


def default_dense_baselines() -> tuple[str, ...]:
    """The dense rows run when none are asked for: every one installed here, except ``compile`` (it costs
    20-70 s of compilation per image size on 2 cores) and bf16 where the CPU lacks it."""
    from importlib.util import find_spec

    names = [n for n in DENSE_ENGINES if n != "compile" and all(find_spec(m) for m in _NEEDS.get(n, ()))]
    if "openvino-bf16" in names:
        from ..export.openvino import cpu_precisions
        if "bf16" not in cpu_precisions():
            names.remove("openvino-bf16")
    from ..precision import bf16_unavailable
    if bf16_unavailable("cpu"):
        names.remove("eager-bf16")
    return tuple(names)


def fastest_dense(rows: list[dict], precision: str) -> dict | None:
    """The row of ``rows`` (dense rows of one case: ``precision``, ``ms``) with the smallest median at
    ``precision``; None when none has that precision."""
    candidates = [r for r in rows if r["precision"] == precision]
    return min(candidates, key=lambda r: r["ms"]) if candidates else None


class CompiledDense:
    """Our network's dense forward ``net(image, mask)`` compiled by ``torch.compile`` (inductor, static
    shapes): the ``compile`` dense row. ``compile_seconds``: first-call seconds per (shape, predicted mask),
    i.e. compilation plus one run; later calls of that signature reuse the compiled graph."""

    name, precision = "compile", "fp32"

    def __init__(self, net: nn.Module, threshold: float = 0.5, dilation: int = 0):
        self.threshold, self.dilation = threshold, dilation
        self.compiled = torch.compile(net, dynamic=False)
        self.compile_seconds: dict[tuple, float] = {}

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        key = (tuple(image.shape), mask is None)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.compiled(image, mask, self.threshold, self.dilation)
        if key not in self.compile_seconds:
            self.compile_seconds[key] = time.perf_counter() - start
        return out
