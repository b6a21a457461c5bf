"""Check SENG on a whole third-party model against an independent dense reference.

Per-sample gradients come from a loop of single-sample backward passes (no ``torch.func``, no SENG code);
for each layer SENG reports with curvature, the direction of its parameter block is solved densely,
``(UᵀU + λI)^{-1} g`` with ``U`` rows ``∇ℓ_n/√N``; every other trainable parameter must get ``g / (1 + λ)``.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
from torch import Tensor, nn

from lightning_seng import SENG
from tests.reference import dense_direction, rel_err

DAMPING = 0.3


def _grads(model: nn.Module, loss: Tensor) -> Dict[str, Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {k: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for k, p in model.named_parameters() if p.requires_grad}


def check(model: nn.Module, loss_of: Callable[[slice], Tensor], n: int, tol: float = 1e-8,
          **seng_kwargs) -> SENG:
    """``loss_of(rows)``: the mean loss of the samples ``rows`` (a slice of the batch of ``n``). Asserts the
    SENG direction of every module against the reference and returns the SENG object (its ``coverage()``)."""
    seng = SENG(model, damping=DAMPING, update_freq=1, **seng_kwargs)
    raw = _grads(model, loss_of(slice(0, n)))
    model.zero_grad(set_to_none=True)
    loss_of(slice(0, n)).backward()
    seng.step()
    got = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    seng.remove()

    per_sample: Dict[str, List[Tensor]] = {k: [] for k in raw}
    for i in range(n):
        for k, g in _grads(model, loss_of(slice(i, i + 1))).items():
            per_sample[k].append(g)
    stacked = {k: torch.stack(v) for k, v in per_sample.items()}

    names = {id(p): k for k, p in model.named_parameters()}
    covered: set = set()
    failures = []
    for layer_name, layer in seng.layers.items():
        if layer.curvature is None:
            continue
        block = [names[id(p)] for p in layer.trainable_params(layer.trainable())]
        covered |= set(block)
        ref = dense_direction({k: stacked[k] for k in block}, {k: raw[k] for k in block}, DAMPING, n ** -0.5)
        for k in block:
            err = rel_err(got[k], ref[k])
            if not err < tol:
                failures.append(f"{layer_name} ({type(layer.module).__name__}) {k}: {err:.2e}")
    for k, g in raw.items():
        if k not in covered and not torch.allclose(got[k], g / (1 + DAMPING), rtol=1e-12, atol=0):
            failures.append(f"{k}: not covered, yet not g / (1 + damping)")
    assert not failures, "\n".join(failures)
    return seng
