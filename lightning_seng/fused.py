"""The step between curvature refreshes as a handful of multi-tensor operations.

Between refreshes each layer's direction is ``(g − Uᵀw)/λ`` with ``w = (K + λI)^{-1} U g``: per layer a few
small products, which dispatched one by one cost a kernel launch and a Python call each (six per parameter
tensor on a ResNet-50). A :class:`StepPlan`, built once per refresh and damping, gathers what the layers with a
plain route need, and :func:`step_tensors` does the whole step for them:

- whether the gradient is finite: one multi-tensor check per dtype (``_amp_foreach_non_finite_check_and_unscale_``,
  the kernel AMP's GradScaler uses), before anything is written;
- ``U g``: explicit routes' column blocks in one ``_foreach_mm``, the parts of one layer added in one
  ``_foreach_add_``; plain Linear Gram routes ``rowsum((G W) ∘ X) + G b`` (or, eagerly, the batch's cheaper
  form, :meth:`~lightning_seng.layers.linear.LinearLayer._u_dot`);
- ``w/λ = (K + λI)^{-1} U g / λ``: one ``_foreach_mm`` with the inverses formed after the refresh, one
  ``_foreach_mul_``;
- ``g/λ`` for those layers and ``g/(1 + λ)`` for the parameters without curvature: one ``_foreach_mul_``;
- ``− Uᵀ(w/λ)``: one in-place ``addmv_`` per explicit block (``addmm_`` and ``addmv_`` per Linear), the only
  operations per tensor;
- where the gradient was not finite, every gradient zeroed (``skip_nonfinite``) by two multi-tensor operations
  on the device (``g ← g^f · f`` with ``f`` 1 or 0: ``x¹ = x`` exactly, ``x⁰ = 1`` for NaN and ±Inf too), nothing
  read back to the host.

:func:`step_tensors` takes tensors and lists of tensors only, has static shapes and reads nothing back to the
host, so ``torch.compile(fullgraph=True)`` traces it whole (``SENG(compile_step=True)``). It computes what the
per-layer path computes, in another order: ``g·(1/λ) − Uᵀ(w·(1/λ))`` instead of ``(g − Uᵀw)·(1/λ)`` fused in
one BLAS call, which moves float32 results by a few units in the last place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .layers.base import Curvature, LayerCurvature
from .layers.linear import LinearLayer
from .layers.routes import ExplicitRoute, GramRoute


@dataclass
class StepPlan:
    """What :func:`step_tensors` needs besides the gradients, for one refresh and one damping.

    ``params``: the parameters whose ``.grad`` it reads and writes, in this order: those of the explicit layers
    (their blocks' order), those of the Linear layers, then the parameters without curvature (``g/(1 + λ)``).
    Every other layer (a route that is not plain, a gradient that is no view of its part) keeps its own path:
    ``rest``; the gradients :func:`step_tensors` takes are ``params``' then ``rest_params``' (it checks them all
    for finiteness and writes only the former)."""

    params: List[nn.Parameter]
    blocks: List[Tensor]  # explicit routes: U's column block of each part, (N, d_p)
    block_grad: List[int]  # the index in params of each block's gradient
    block_layer: List[int]  # the plan layer of each block
    firsts: List[int]  # per extra part of a layer: the index of the layer's first block, ...
    seconds: List[int]  # ... and of the extra block (their U g parts are added)
    linears: List[Tuple[Tensor, Tensor, int, int]]  # (G (N, d_out), X (N, d_in), weight index or -1, bias or -1)
    inverses: List[Tensor]  # (K + λI)^{-1} per plan layer (explicit ones first, then Linear), (N, N)
    inv_damping: List[Tensor]  # 1/λ_l per plan layer, 0-dim
    grad_scales: List[Tensor]  # per parameter: 1/λ_l of its layer, or 1/(1 + λ)
    groups: List[List[int]]  # indices in params by dtype and device (one finiteness check each)
    layers: List[Tuple[str, LayerCurvature]]  # the plan layers, explicit first, then Linear
    rest: List[Tuple[str, LayerCurvature]]  # the other layers with curvature: their own path
    rest_params: List[nn.Parameter]  # their parameters with a gradient: checked and guarded with the others
    key: tuple = ()
    curvatures: list = field(default_factory=list)

    def arguments(self, grads: List[Tensor], us: Optional[List[Optional[Tensor]]] = None) -> tuple:
        """The arguments of :func:`step_tensors` for these gradients (``us``: Linear layers' ``U g`` computed
        by the caller, ``None`` where :func:`step_tensors` computes it from the gradient)."""
        us = [None] * len(self.linears) if us is None else us
        return (grads, self.blocks, self.block_grad, self.block_layer, self.firsts, self.seconds, self.linears, us,
                self.inverses, self.inv_damping, self.grad_scales, self.groups)


def step_tensors(grads: List[Tensor], blocks: List[Tensor], block_grad: List[int], block_layer: List[int],
                 firsts: List[int], seconds: List[int], linears: List[Tuple[Tensor, Tensor, int, int]],
                 us: List[Optional[Tensor]], inverses: List[Tensor], inv_damping: List[Tensor],
                 grad_scales: List[Tensor], groups: List[List[int]], guard: bool = True) -> Tensor:
    """Write the directions of a :class:`StepPlan` into ``grads`` (its parameters' gradients, in its order);
    returns a 1-element float32 tensor, nonzero where a gradient held NaN or ±Inf before the step. With ``guard``
    every gradient is then zeroed on the device where it did; without, the caller decides."""
    found = grads[0].new_zeros(1, dtype=torch.float32)
    one = grads[0].new_ones(1, dtype=torch.float32)
    for group in groups:
        torch._amp_foreach_non_finite_check_and_unscale_([grads[i] for i in group], found, one)
    u_all = torch.ops.aten._foreach_mm(blocks, [grads[i].view(-1, 1) for i in block_grad]) if blocks else []
    if firsts:
        torch._foreach_add_([u_all[i] for i in firsts], [u_all[i] for i in seconds])
    u_layers: List[Tensor] = []
    last = -1
    for i, layer in enumerate(block_layer):
        if layer != last:
            u_layers.append(u_all[i])
            last = layer
    for (G, X, wi, bi), u in zip(linears, us):
        if u is None:
            u = _linear_u_dot(G, X, None if wi < 0 else grads[wi], None if bi < 0 else grads[bi])
        u_layers.append(u.view(-1, 1))
    ws = torch.ops.aten._foreach_mm(inverses, u_layers) if u_layers else []
    if ws:
        torch._foreach_mul_(ws, inv_damping)
    if grad_scales:
        torch._foreach_mul_(grads[:len(grad_scales)], grad_scales)
    for block, i, layer in zip(blocks, block_grad, block_layer):
        grads[i].view(-1).addmv_(block.T, ws[layer].view(-1), alpha=-1)
    first = len(inverses) - len(linears)
    for k, (G, X, wi, bi) in enumerate(linears):
        w = ws[first + k].view(-1)
        if wi >= 0:
            left, right = (G * w[:, None], X) if G.shape[1] <= X.shape[1] else (G, X * w[:, None])
            grads[wi].addmm_(left.T, right, alpha=-1)
        if bi >= 0:
            grads[bi].addmv_(G.T, w, alpha=-1)
    if guard:
        clear_nonfinite_(grads, found)
    return found


def clear_nonfinite_(grads: List[Tensor], found: Tensor) -> None:
    """Every gradient zeroed where ``found`` is nonzero, left as it is otherwise, on the device: ``g ← g^f · f``,
    ``f = 1 − found`` (two multi-tensor operations per dtype; ``x¹ = x`` and ``x⁰ = 1`` exactly, NaN and ±Inf
    included)."""
    by_dtype: Dict[torch.dtype, List[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for dtype, group in by_dtype.items():
        f = (1 - found[0]).to(dtype)
        # as a list of views: a single 0-dim exponent would be read back to the host as a number
        torch._foreach_pow_(group, [f.expand(g.shape) for g in group])
        torch._foreach_mul_(group, f)


def _linear_u_dot(G: Tensor, X: Tensor, Ww: Optional[Tensor], Wb: Optional[Tensor]) -> Tensor:
    u = None if Ww is None else torch.linalg.vecdot(G @ Ww, X)
    if Wb is not None:
        u = G @ Wb if u is None else torch.addmv(u, G, Wb)
    return u


def _inverse(cur: Curvature, damping: float) -> Optional[Tensor]:
    """``(K + λI)^{-1}`` of a committed curvature at the layer's ``λ``, as :meth:`Curvature.solve` would apply it
    between refreshes: the inverse formed from the Cholesky factor (kept on the curvature), or from the
    eigendecomposition under a damping schedule; ``None`` where neither is at hand (a new factorisation is due:
    the layer's own path does it)."""
    if damping == cur.damping:
        if cur.inverse is None:
            cur.inverse = torch.cholesky_inverse(cur.chol)
        return cur.inverse
    if cur.eigen is not None:
        Q, e = cur.eigen
        return (Q / (e + damping)) @ Q.T
    return None


def _views(layer: LayerCurvature, cur: Curvature) -> Optional[List[Tensor]]:
    """The layer's gradient parts, when each is a view of its parameter's whole ``.grad`` in the curvature's dtype
    (so that writing the part writes the gradient), else ``None``."""
    params = layer.trainable_params(cur.mask)
    grads = [p.grad for p in params]
    if any(g is None or g.is_sparse or not g.is_contiguous() or g.dtype != cur.gram.dtype for g in grads):
        return None
    parts = layer.parts_of(grads, cur.mask, cur.gram.dtype)
    if len(parts) != len(grads) or any(part.data_ptr() != g.data_ptr() or part.numel() != g.numel()
                                       for part, g in zip(parts, grads)):
        return None
    return parts


def build_plan(layers: Sequence[Tuple[str, LayerCurvature]], without: List[nn.Parameter], damping: float,
               one_plus: float) -> Optional[StepPlan]:
    """The plan for ``layers`` (those with usable curvature this step, with their gradients in place) and the
    parameters ``without`` curvature (``g / one_plus``); ``None`` when no layer has a plain route."""
    explicit, linear, rest = [], [], []
    for name, layer in layers:
        cur = layer.curvature
        lam = damping * cur.scale
        route = cur.route
        inverse = _inverse(cur, lam)
        parts = None if inverse is None else _views(layer, cur)
        if parts is not None and type(route) is ExplicitRoute and "index" not in route.tensors:
            explicit.append((name, layer, cur, lam, inverse))
        elif (parts is not None and type(route) is GramRoute and isinstance(layer, LinearLayer)
              and route.plain() is not None):
            linear.append((name, layer, cur, lam, inverse))
        else:
            rest.append((name, layer))
    if not explicit and not linear:
        return None
    params: List[nn.Parameter] = []
    blocks, block_grad, block_layer, firsts, seconds, linears = [], [], [], [], [], []
    inverses, inv_damping, grad_scales = [], [], []
    for k, (_, layer, cur, lam, inverse) in enumerate(explicit):
        U = cur.route.tensors["U"]
        first = len(blocks)
        for j, (cols, p) in enumerate(zip(cur.route._blocks(), layer.trainable_params(cur.mask))):
            if j:
                firsts.append(first)
                seconds.append(len(blocks))
            blocks.append(U[:, cols])
            block_grad.append(len(params))
            block_layer.append(k)
            params.append(p)
    for _, layer, cur, lam, inverse in linear:
        G, X = cur.route.plain()
        trainable = layer.trainable_params(cur.mask)
        wi = bi = -1
        if cur.mask[0]:
            wi = len(params)
            params.append(trainable[0])
        if cur.route.options["bias"]:
            bi = len(params)
            params.append(trainable[-1])
        linears.append((G, X, wi, bi))
    for _, layer, cur, lam, inverse in explicit + linear:
        inverses.append(inverse)
        inv_damping.append(torch.tensor(1.0 / lam, dtype=inverse.dtype, device=inverse.device))
        scale = inv_damping[-1]
        grad_scales += [scale] * len(layer.trainable_params(cur.mask))
    for p in without:
        params.append(p)
        grad_scales.append(torch.tensor(1.0 / one_plus, dtype=p.dtype, device=p.device))
    rest_params = [p for _, layer in rest for p in layer.trainable_params(layer.curvature.mask) if p.grad is not None]
    groups: Dict[tuple, List[int]] = {}
    for i, p in enumerate(params + rest_params):
        groups.setdefault((p.device, p.dtype), []).append(i)
    return StepPlan(params, blocks, block_grad, block_layer, firsts, seconds, linears, inverses, inv_damping,
                    grad_scales, list(groups.values()), [(n, layer) for n, layer, *_ in explicit + linear], rest,
                    rest_params)


def runner(compile_mode: Optional[str]) -> Callable[..., Tensor]:
    """:func:`step_tensors`, compiled whole (``fullgraph=True``) in ``compile_mode`` (``"default"``,
    ``"reduce-overhead"``: CUDA graphs, ...), or as it is for ``None``."""
    if compile_mode is None:
        return step_tensors
    return torch.compile(step_tensors, fullgraph=True, mode=compile_mode)
