"""Independent dense reference for SENG: per-sample gradients from ``torch.func`` and an explicit
``d × d`` solve. Nothing here shares code with the package."""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap


def per_sample_gradients(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor,
                         names: List[str]) -> Dict[str, Tensor]:
    """``∇_θ ℓ_n`` for every sample ``n`` (the loss of one sample alone), for parameters ``names``:
    ``{name: (N, *param.shape)}``. Only valid for models without cross-sample coupling (no BatchNorm)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p_sub, xi, yi):
        full = dict(params)
        full.update(p_sub)
        out = functional_call(model, full, (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    sub = {k: params[k] for k in names}
    return vmap(grad(one), in_dims=(None, 0, 0))(sub, x, y)


def per_sample_jacobian(model: nn.Module, per_sample_losses: Callable[[Tensor], Tensor], x: Tensor,
                        names: List[str]) -> Dict[str, Tensor]:
    """``∂ℓ_n/∂θ`` of the vector of per-sample losses computed on the whole batch (for BatchNorm's own
    affine parameters, where the batch couples samples): ``{name: (N, *param.shape)}``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def losses(p_sub):
        full = dict(params)
        full.update(p_sub)
        return per_sample_losses(functional_call(model, full, (x,)))

    sub = {k: params[k] for k in names}
    return torch.func.jacrev(losses)(sub)


def dense_direction(per_sample: Dict[str, Tensor], g: Dict[str, Tensor], damping: float,
                    n_scale: float) -> Dict[str, Tensor]:
    """``(UᵀU + λI)^{-1} g`` with ``U = n_scale · [per-sample gradients]``, solved densely in ``d × d``."""
    names = list(per_sample)
    n = per_sample[names[0]].shape[0]
    U = torch.cat([per_sample[k].reshape(n, -1) for k in names], dim=1) * n_scale
    gv = torch.cat([g[k].reshape(-1) for k in names])
    F = U.T @ U + damping * torch.eye(U.shape[1], dtype=U.dtype)
    d = torch.linalg.solve(F, gv)
    out, start = {}, 0
    for k in names:
        size = g[k].numel()
        out[k] = d[start:start + size].reshape(g[k].shape)
        start += size
    return out


def rel_err(a: Tensor, b: Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` (0 when both are zero)."""
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def layerwise_dense_directions(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor,
                               y: Tensor, damping: float, names: List[str], reduction: str = "mean",
                               grads: Dict[str, Tensor] = None) -> Dict[str, Tensor]:
    """SENG's block-diagonal direction built densely: for each module owning some of ``names``,
    ``(UᵀU + λI)^{-1} g`` over that module's parameters, ``U`` rows ``∇ℓ_n/√N`` (the empirical Fisher,
    whatever the reduction). ``g`` defaults to the batch gradient of the mean loss (``reduction="mean"``)
    or of the summed loss (``"sum"``); ``loss_fn`` must reduce by the mean.
    """
    n = x.shape[0]
    ps = per_sample_gradients(model, lambda out, t: loss_fn(out, t), x, y, names)
    if grads is None:
        params = dict(model.named_parameters())
        model.zero_grad()
        loss = loss_fn(model(x), y) * (n if reduction == "sum" else 1)
        loss.backward()
        grads = {k: params[k].grad.detach().clone() for k in names}
        model.zero_grad()
    out = {}
    for module in sorted({k.rsplit(".", 1)[0] for k in names}):
        keys = [k for k in names if k.rsplit(".", 1)[0] == module]
        out.update(dense_direction({k: ps[k] for k in keys}, {k: grads[k] for k in keys}, damping, n ** -0.5))
    return out
