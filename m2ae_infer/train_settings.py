"""The settings that define an ``m2ae-train`` run: :class:`RunSettings`, validated in one place.

A run stores its settings in ``last_state.pt`` as a plain dict (:meth:`RunSettings.to_dict`, so
``torch.load(..., weights_only=True)`` reads it); ``--resume`` rebuilds them with :meth:`RunSettings.from_args`,
which refuses to change any but ``steps`` and gives a setting the run predates its default.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping

from .config import M2AEConfig

# --train: the whole network; the blur-mask head alone (everything else frozen); or everything but the mask head
# (the body learns to restore and to leave alone what a fixed, already trained detector flags)
TRAINABLE = ("all", "mask", "body")
REBLUR_SOURCES = ("sharp", "restored")
GATES = ("annotated", "union")
# lower bounds of the numeric settings: (bound, strict), worded "--lr must be > 0" / "--steps must be >= 1"
_BOUNDS = {"steps": (1, False), "batch": (1, False), "pool": (1, False), "warmup": (0, False), "lr": (0, True),
           "clip": (0, True), "pos_weight": (0, True), "w_reblur": (0, False), "w_mask": (0, False),
           "weight_decay": (0, False), "blur_weight": (0, True)}
# the annotations (strings under ``from __future__ import annotations``) -> accepted types, and how a message says so
_KINDS = {"int": ((int,), "an integer"), "float": ((int, float), "a number"), "str": ((str,), "a string"),
          "bool": ((bool,), "true or false"), "str | None": ((str, type(None)), "a path or None")}


class UsageError(ValueError):
    """A bad option: one line on stderr, exit code 2."""


def require(ok: bool, message: str) -> None:
    """Raise :class:`UsageError` (``message``, one line) unless ``ok``."""
    if not ok:
        raise UsageError(message)


def flag(name: str) -> str:
    """The option that sets a field: ``weight_decay`` -> ``--weight-decay``."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class RunSettings:
    """What defines a run (the option of each field: :func:`flag`). Every value is checked on construction:
    a bad one raises :class:`UsageError` with one line naming the option, as ``m2ae-train`` prints it."""

    config: str = "default"          # architecture: M2AEConfig.from_spec ("tiny", "default,mask_channels=32")
    steps: int = 8000                # total optimizer steps; sets the schedule (the one setting --resume may change)
    batch: int = 8
    crop: int = 128                  # training crop in pixels, even
    lr: float = 1e-3                 # peak AdamW learning rate
    weight_decay: float = 1e-4       # AdamW decay of conv weights (never biases or norms)
    warmup: int = 100                # linear warm-up steps
    clip: float = 1.0                # global gradient-norm clip
    seed: int = 0                    # seed of the weights and of the data stream
    pool: int = 3072                 # distinct synthetic samples, cached
    w_reblur: float = 0.1
    w_mask: float = 0.1
    pos_weight: float = 2.0          # BCE weight of blurred pixels
    reblur_source: str = "sharp"     # REBLUR_SOURCES: re-blur the ground truth or the restored image
    gate: str = "annotated"          # GATES: gate the body with the annotated mask or its union with the predicted
    blur_weight: float = 1.0         # reconstruction-loss weight of the annotated blur's pixels (others: 1)
    init: str | None = None          # start from these weights (fine-tuning)
    defocus: float = 0.0             # share of local/sharp samples with a defocused background region
    train: str = "all"               # TRAINABLE
    fresh_head: bool = False         # with train="mask": the mask head starts from random weights
    exclude_photos: str = ""         # "A,B": training photos kept out as dev photos
    data: str = ""                   # a photo corpus folder (m2ae-data fetch DIR); "": the scikit-image photos
    video: str = ""                  # a static-camera video whose first frames (video.TRAIN_FRAMES) also train
    video_share: float = 0.0         # share of the samples cut from --video's windows (needs --data)
    ghost_share: float = 0.0         # share of the --data scenes' local samples with frame-averaged movers

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            types, noun = _KINDS[f.type]
            require(isinstance(value, types) and (f.type == "bool" or not isinstance(value, bool)),
                    f"{flag(f.name)} must be {noun}, got {value!r}")
        try:
            M2AEConfig.from_spec(self.config)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        for name, allowed in (("train", TRAINABLE), ("reblur_source", REBLUR_SOURCES), ("gate", GATES)):
            value = getattr(self, name)
            require(value in allowed, f"{flag(name)} must be one of {', '.join(allowed)}, got {value}")
        require(self.train == "mask" or not self.fresh_head, "--fresh-head needs --train mask")
        from .data.synth import photo_names, training_photos
        try:
            training_photos(photo_names(self.exclude_photos))
        except ValueError as exc:
            raise UsageError(f"--exclude-photos: {exc}") from None
        require(not self.data or Path(self.data, "manifest.json").is_file(),
                f"--data {self.data} holds no manifest.json: build the corpus with m2ae-data fetch {self.data}")
        require(0.0 <= self.defocus <= 1.0, f"--defocus must lie in [0, 1], got {self.defocus}")
        require(0.0 <= self.video_share <= 1.0, f"--video-share must lie in [0, 1], got {self.video_share}")
        require((self.video_share > 0) == bool(self.video), "--video and --video-share > 0 go together: the "
                "share of samples cut from the video's training windows")
        require(not self.video or bool(self.data), "--video needs --data: its windows are mixed into the corpus scenes")
        require(0.0 <= self.ghost_share <= 1.0, f"--ghost-share must lie in [0, 1], got {self.ghost_share}")
        require(not self.ghost_share or bool(self.data), "--ghost-share needs --data: the corpus scenes "
                "(m2ae_infer.data.scenes) make the frame-averaged movers")
        require(not self.video or Path(self.video).is_file(), f"--video {self.video}: no such file")
        require(0 <= self.seed < 2**32, f"--seed must lie in 0..{2**32 - 1} (torch and numpy seeds), got {self.seed}")
        for name, (low, strict) in _BOUNDS.items():
            value = getattr(self, name)
            ok = math.isfinite(value) and (value > low if strict else value >= low)
            require(ok, f"{flag(name)} must be {'>' if strict else '>='} {low}, got {value}")
        require(self.crop >= 16 and self.crop % 2 == 0, f"--crop must be even and >= 16, got {self.crop}")

    def to_dict(self) -> dict:
        """Plain ``{name: value}``: what ``last_state.pt`` and the checkpoints' meta store."""
        return dataclasses.asdict(self)

    @classmethod
    def from_args(cls, args: argparse.Namespace, stored: Mapping | None = None) -> RunSettings:
        """The options given in ``args`` (an attribute per field; ``None``: not given) over ``stored``, the
        settings of a resumed run, or over the defaults. A resumed run keeps its settings: a given option that
        differs is refused, except ``steps``; a setting the run predates takes its default, one it has that no
        longer exists is dropped."""
        names = [f.name for f in fields(cls)]
        given = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
        if stored is not None:
            for k, v in given.items():
                old = stored.get(k, RUN_DEFAULTS[k])
                require(k == "steps" or v == old, f"{flag(k)} {v} differs from the resumed run's {old}")
        kept = {k: v for k, v in (stored or {}).items() if k in names}
        return cls(**{**kept, **given})


# the defaults as a plain dict, read off the fields (building RunSettings() would check them, importing the data)
RUN_DEFAULTS = {f.name: f.default for f in fields(RunSettings)}
