"""Check SENG on a whole third-party model against an independent dense reference.

Per-sample gradients are those of each sample's loss in one batch forward, by a backward pass per sample
(no ``torch.func``, no SENG code; the same rounding as the batch, which matters for models that compute
parts in float32 even in a float64 model, e.g. LLaMA's RMSNorm);
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


def check(model: nn.Module, losses_of: Callable[[], Tensor], n: int, tol: float = 1e-8, **seng_kwargs) -> SENG:
    """``losses_of()``: the ``(n,)`` per-sample losses of one batch forward (the loss is their mean). Asserts
    the SENG direction of every module against the reference and returns the SENG object."""
    seng = SENG(model, damping=DAMPING, update_freq=1, **seng_kwargs)
    raw = _grads(model, losses_of().mean())
    model.zero_grad(set_to_none=True)
    losses_of().mean().backward()
    seng.step()
    got = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    seng.remove()

    losses = losses_of()
    per_sample: Dict[str, List[Tensor]] = {k: [] for k in raw}
    params = {k: p for k, p in model.named_parameters() if k in raw}
    for i in range(n):
        grads = torch.autograd.grad(losses[i], list(params.values()), retain_graph=True, allow_unused=True)
        for (k, p), g in zip(params.items(), grads):
            per_sample[k].append(torch.zeros_like(p) if g is None else g)
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
        # per block, as a key bias's gradient is zero up to rounding (softmax ignores it)
        err = rel_err(torch.cat([got[k].reshape(-1) for k in block]), torch.cat([ref[k].reshape(-1) for k in block]))
        if not err < tol:
            failures.append(f"{layer_name} ({type(layer.module).__name__}) {block}: {err:.2e}")
    for k, g in raw.items():
        if k not in covered and not torch.allclose(got[k], g / (1 + DAMPING), rtol=1e-12, atol=0):
            failures.append(f"{k}: not covered, yet not g / (1 + damping)")
    assert not failures, "\n".join(failures)
    return seng
