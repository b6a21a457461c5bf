"""Reliability-test helpers: the block-diagonal dense SENG direction, built per module from the
independent per-sample reference in ``tests/reference.py`` (``torch.func`` + a dense ``d × d`` solve)."""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from tests.reference import dense_direction, per_sample_gradients, rel_err  # noqa: F401  (re-exported)


def module_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else ""


def batch_gradient(model: nn.Module, loss_fn: Callable, x: Tensor, y: Tensor, names: Iterable[str],
                   reduction: str = "mean") -> Dict[str, Tensor]:
    """Gradient of the batch loss (mean, or ``N ×`` mean for ``"sum"``) for parameters ``names``."""
    params = dict(model.named_parameters())
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y) * (x.shape[0] if reduction == "sum" else 1)
    loss.backward()
    out = {k: params[k].grad.detach().clone() for k in names}
    model.zero_grad(set_to_none=True)
    return out


def seng_blocks(model: nn.Module, loss_fn: Callable, x: Tensor, y: Tensor, damping: float, blocks: List[List[str]],
                reduction: str = "mean", grads: Optional[Dict[str, Tensor]] = None) -> Dict[str, Tensor]:
    """``(UᵀU + λI)^{-1} g`` per block of parameter names, ``U`` rows ``∇ℓ_n/√N`` (mean-loss per-sample
    gradients); ``g`` is the batch gradient unless given."""
    names = [k for block in blocks for k in block]
    n = x.shape[0]
    ps = per_sample_gradients(model, loss_fn, x, y, names)
    if grads is None:
        grads = batch_gradient(model, loss_fn, x, y, names, reduction)
    out = {}
    for block in blocks:
        out.update(dense_direction({k: ps[k] for k in block}, {k: grads[k] for k in block}, damping, n ** -0.5))
    return out


def layer_blocks(model: nn.Module, names: Iterable[str]) -> List[List[str]]:
    """Group parameter names by owning module (SENG's blocks)."""
    blocks: Dict[str, List[str]] = {}
    for k in names:
        blocks.setdefault(module_of(k), []).append(k)
    return list(blocks.values())


ce = F.cross_entropy
