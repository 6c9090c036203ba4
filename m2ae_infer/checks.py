"""Argument checks shared by the API, the export graphs and the CLIs, in one place (no torch: a CLI checks its
options before it imports the network)."""
from __future__ import annotations

from .errors import InvalidArgument


def check_mask_settings(threshold, dilation) -> tuple[float, int]:
    """The one check of what :func:`binarize` accepts: ``threshold`` a probability strictly inside (0, 1),
    ``dilation`` an int >= 0. Returns them as (float, int); raises InvalidArgument (one line) naming the
    parameter (a CLI words it as its flag)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
        raise InvalidArgument("threshold", f"threshold must be a probability strictly between 0 and 1, "
                              f"got {threshold!r}")
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 0:
        raise InvalidArgument("dilation", f"dilation must be an int >= 0, got {dilation!r}")
    return float(threshold), int(dilation)


MIN_DETECTOR_SIDE = 64    # smaller and the v2 detector's 1/8 trunk sees a handful of cells


def check_detector_side(side) -> int | None:
    """``detector_side`` (:mod:`m2ae_infer.detector_scale`): None or 0 (the image's own size, returned as None) or an
    int of at least :data:`MIN_DETECTOR_SIDE` pixels; raises InvalidArgument (one line) naming the parameter."""
    if side is not None and (isinstance(side, bool) or not isinstance(side, int) or side < 0
                             or 0 < side < MIN_DETECTOR_SIDE):
        raise InvalidArgument("detector_side", f"detector_side must be at least {MIN_DETECTOR_SIDE} pixels, "
                              f"or 0 for the image's own size; got {side!r}")
    return side or None
