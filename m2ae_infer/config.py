"""Architecture configuration of M2AENet (frozen dataclass, serialisable into checkpoints)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

ACTIVATIONS = ("relu", "gelu", "silu")
# Blur-mask predictors: "stem" (v1, BlurMaskHead on the stem features, quarter resolution) or "multiscale"
# (v2, MultiScaleBlurDetector: its own directional features from the image, 1/8 resolution, wide context).
DETECTORS = ("stem", "multiscale")
# Upper bounds, far above every variant (``large``: 48 channels, 10 blocks) and low enough that a typo or a
# damaged checkpoint cannot ask for terabytes (channels=10**6) or a billion modules (num_blocks=10**9).
# mask_layers: the i-th mask conv is dilated 2**i, so the 8th is dilated 128 (quarter-resolution pixels).
LIMITS = dict(channels=1024, num_blocks=256, ffn_expand=16, mask_channels=1024, mask_layers=8,
              motion_channels=1024, motion_points=256)


@dataclass(frozen=True)
class M2AEConfig:
    """Size of the network. Every field is a plain int/str so the config fits in a
    ``weights_only`` checkpoint and in safetensors metadata.

    The network works at half resolution: ``channels`` is the width C of the feature map
    ``[N, C, H/2, W/2]`` that the body blocks update at the masked pixels only.
    Every int field is at least 1 (``motion_points`` at least 2) and at most its :data:`LIMITS` entry.
    """

    channels: int = 32          # C: body width
    num_blocks: int = 6         # N re-parameterizable body blocks
    ffn_expand: int = 1         # pointwise mixer: C -> 2*E, simple gate -> E, E -> C, with E = C*ffn_expand
    mask_channels: int = 16     # width of the blur-mask predictor (runs densely at H/4)
    mask_layers: int = 3        # 3x3 convs in the mask predictor (dilations 1, 2, 4, ...)
    motion_channels: int = 16   # width of the intra-frame motion analyzer
    motion_points: int = 15     # K points sampled along each pixel's predicted trajectory (reblur)
    act: str = "gelu"           # activation after each spatial conv: relu | gelu | silu
    detector: str = "stem"      # blur-mask predictor: stem (v1) | multiscale (v2); v1 checkpoints lack the key

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"M2AEConfig.{f.name} must be a positive int, got {value!r}")
            if f.name in LIMITS and value > LIMITS[f.name]:
                raise ValueError(f"M2AEConfig.{f.name} must be at most {LIMITS[f.name]}, got {value}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"M2AEConfig.act must be one of {ACTIVATIONS}, got {self.act!r}")
        if self.detector not in DETECTORS:
            raise ValueError(f"M2AEConfig.detector must be one of {DETECTORS}, got {self.detector!r}")
        if self.motion_points < 2:
            raise ValueError(f"M2AEConfig.motion_points must be >= 2, got {self.motion_points}")

    @property
    def ffn_channels(self) -> int:
        """E: width of the pointwise mixer after the simple gate."""
        return self.channels * self.ffn_expand

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "M2AEConfig":
        """Build a config from a mapping; unknown keys are an error, not silently dropped."""
        if not isinstance(data, Mapping):
            raise ValueError(f"architecture config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown architecture config keys {unknown}; known keys: {sorted(known)}")
        return cls(**dict(data))

    @classmethod
    def from_name(cls, name: str) -> "M2AEConfig":
        """Named variants (:data:`VARIANTS`): ``tiny`` and ``tiny_v2`` (tests), ``default`` (v1), ``large``, ``v2``."""
        try:
            return cls(**VARIANTS[name])
        except KeyError:
            raise ValueError(f"unknown config name {name!r}; choose one of {sorted(VARIANTS)}") from None

    @classmethod
    def from_spec(cls, spec: str) -> "M2AEConfig":
        """A named variant with field overrides: ``"default"``, ``"default,mask_channels=32,mask_layers=4"``."""
        name, *overrides = (part.strip() for part in spec.split(","))
        fields = cls.from_name(name).to_dict()
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"config override {item!r} is not KEY=VALUE (e.g. mask_channels=32)")
            fields[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
        return cls.from_dict(fields)


VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(channels=8, num_blocks=2, mask_channels=8, mask_layers=2, motion_channels=8, motion_points=5),
    "default": {},
    "large": dict(channels=48, num_blocks=10, mask_channels=24, motion_channels=24),
    "tiny_v2": dict(channels=8, num_blocks=2, mask_channels=8, mask_layers=2, motion_channels=8, motion_points=5,
                    detector="multiscale"),
    # v2: the default body with the multi-scale blur detector (48 channels at 1/8, dilations 1..16).
    "v2": dict(mask_channels=48, mask_layers=5, detector="multiscale"),
}
