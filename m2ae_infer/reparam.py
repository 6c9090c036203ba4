"""Structural reparameterization: training-form network -> deploy form (exact in eval mode)."""
from __future__ import annotations

import copy

from torch import nn


def reparameterize_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return the deploy form of ``model``: BatchNorm folded, RepVGG branches merged into one 3x3 conv,
    the motion analyzer's two linear maps merged into one.

    Every submodule that has a ``reparameterize()`` method is switched in place (each is idempotent,
    so an already-deployed model passes through unchanged). The result is in eval mode: the merge uses
    BatchNorm running statistics, which is what eval mode computes.

    Args:
        model: a training-form (or already deploy-form) network.
        inplace: modify ``model`` itself instead of a deep copy.
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    for module in model.modules():
        if module is not model and hasattr(module, "reparameterize"):
            module.reparameterize()
    return model
