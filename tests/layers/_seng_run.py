"""One SENG refresh-and-step on a batch: the direction the package computes, for the layer tests."""

import torch.nn.functional as F

from lightning_seng import SENG

DAMPING = 0.3


def seng_direction(model, x, y, reduction="mean", **kwargs):
    """``({name: direction}, seng)`` after one step with ``update_freq=1`` on a cross-entropy loss."""
    seng = SENG(model, damping=DAMPING, update_freq=1, loss_reduction=reduction, **kwargs)
    model.zero_grad()
    F.cross_entropy(model(x), y, reduction=reduction).backward()
    seng.step()
    seng.remove()
    return {k: p.grad.clone() for k, p in model.named_parameters()}, seng
