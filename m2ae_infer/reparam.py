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


def expand_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return a training form of a deploy-form ``model`` that computes exactly the same in eval mode: the
    inverse of :func:`reparameterize_model`, for fine-tuning a shipped checkpoint (``m2ae-train --train body``).

    Every submodule with an ``expand()`` method (RepVGG blocks, the motion analyzer) grows its training
    branches back, starting at zero where the deploy form has no counterpart. Its BatchNorms carry no batch
    statistics, so the result stays exact only while they run in eval mode (training with frozen norms);
    ``reparameterize_model(expand_model(m))`` gives ``m``'s weights back. The result is in eval mode.
    """
    if not inplace:
        model = copy.deepcopy(model)
    for module in list(model.modules()):
        if module is not model and hasattr(module, "expand"):
            module.expand()
    config = getattr(model, "config", None)
    if config is not None:   # the canonical module order of a freshly built training form: the optimizer state
        fresh = type(model)(config)   # of a resumed run is matched to parameters by their order
        fresh.load_state_dict(model.state_dict())
        model = fresh
    return model.eval()   # after expanding: the new branches are built in train mode
