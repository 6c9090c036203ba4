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
