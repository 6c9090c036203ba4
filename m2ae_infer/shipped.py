"""Files shipped inside the package (``m2ae_infer/assets/``): the default checkpoint and the example photo.

Library modules (API, export, bench) read these paths from here, never from a CLI module.
"""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
DEFAULT_CHECKPOINT = ASSETS / "m2ae_default.safetensors"   # network v2.2, docs/model_card.md
V1_CHECKPOINT = ASSETS / "m2ae_v1.safetensors"             # the checkpoint v2 replaced, docs/model_card_v1.md
EXAMPLE_PHOTO = ASSETS / "example_blurry.png"              # a locally motion-blurred photo ...
EXAMPLE_MASK = ASSETS / "example_mask.png"                 # ... and the mask of its blur
# The longest side of the photos the shipped detector was trained on (m2ae-data fetch's --max-side): the API shows
# it larger photos averaged down to this (m2ae_infer.detector_scale).
DETECTOR_SIDE = 1024
