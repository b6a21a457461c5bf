"""The step between curvature refreshes as a handful of multi-tensor operations.

Between refreshes each layer's direction is ``(g − Uᵀw)/λ`` with ``w = (K + λI)^{-1} U g``: per layer a few
small products, which dispatched one by one cost a kernel launch and a Python call each (six per parameter
tensor on a ResNet-50). A :class:`StepPlan`, built once per refresh and damping, gathers what the layers with a
plain route need, and :func:`step_tensors` does the whole step for them:

- whether the gradient is finite: one multi-tensor check per dtype (``_amp_foreach_non_finite_check_and_unscale_``,
  the kernel AMP's GradScaler uses), before anything is written;
- ``U g``: explicit routes' small column blocks of one shape stacked, one batched product per shape, the large
  ones in one ``_foreach_mm``, the parts of one layer added in one ``_foreach_add_``; plain Linear Gram routes
  ``rowsum((G W) ∘ X) + G b`` (or, eagerly, the batch's cheaper form,
  :meth:`~lightning_seng.layers.linear.LinearLayer.batch_u_dot`);
- ``g/λ`` for those layers and ``g/(1 + λ)`` for the parameters without curvature in the same pass as the check
  (one per distinct λ; float64 gradients by one ``_foreach_mul_`` after it, as that kernel's scale is float32), so
  that ``U g/λ`` and ``w/λ = (K + λI)^{-1} U g/λ`` (one batched product per ``N`` with the inverses formed after
  the refresh) come scaled;
- ``− Uᵀ(w/λ)``: per shape of small blocks one batched product and one ``_foreach_sub_``; one in-place ``addmm_``
  per large block, and ``addmm_`` and ``addmv_`` per large Linear: the only operations per tensor, where the
  arithmetic outweighs a launch;
- where the gradient was not finite, every gradient zeroed (``skip_nonfinite``) on the device by one multi-tensor
  product of its bits, seen as integers, with 0 or 1, nothing read back to the host.

A plain Linear Gram route with a small ``U`` (:data:`SMALL_U` elements) is applied as an explicit one: its ``U`` is
built from ``G`` and ``X`` once per plan. What the plan keeps besides the curvatures shows in
:meth:`SENG.kept_bytes` as ``"(step plan)"``.

:func:`step_tensors` takes tensors and lists of tensors only, has static shapes and reads nothing back to the
host, so ``torch.compile(fullgraph=True)`` traces it whole (``SENG(compile_step=True)``). It computes what the
per-layer path computes, in another order: ``g·(1/λ) − Uᵀ((K + λI)^{-1} U g·(1/λ))`` instead of ``(g − Uᵀw)·(1/λ)``
fused in one BLAS call, which moves float32 results by a few units in the last place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import sketch
from .layers.base import Curvature, LayerCurvature
from .layers.linear import LinearLayer
from .layers.routes import ExplicitRoute, GramRoute


# Blocks of U with at most this many elements (1 MiB in float32) are stacked with those of the same shape (a copy,
# kept by the plan) and applied by batched products, through a temporary; larger ones, whose arithmetic outweighs a
# launch, by one product each way (U g in one ``_foreach_mm``, Uᵀw by their own in-place ``addmm_``, which reads the
# gradient once). A plain Linear Gram route whose U is that small is applied as an explicit one between refreshes
# (U built once from G and X for the plan).
SMALL_U = 1 << 18

# Devices whose tensors live in host memory: reading the non-finite flag there waits for no queued work, so the
# eager step reads it and zeroes the gradients only when it is set, instead of a pass over every gradient on every
# step (about 0.1 ms, 2 % of SGD's step, on the autoencoder of ``benchmarks/overhead.py``). On any other device the
# guard stays on the device (no host read: CUDA graphs, no stall of the launch queue).
HOST_READ_DEVICES = ("cpu",)


@dataclass
class StepPlan:
    """What :func:`step_tensors` needs besides the gradients, for one refresh; the damping it holds is changed in
    place by :meth:`set_damping` (no new plan, no new compilation).

    ``params``: the parameters whose ``.grad`` it reads and writes, in this order: those of the explicit layers
    (their blocks' order), those of the Linear layers, then the parameters without curvature (``g/(1 + λ)``).
    Every other layer (a route that is not plain, a gradient that is no view of its part) keeps its own path:
    ``rest``; the gradients :func:`step_tensors` takes are ``params``' then ``rest_params``' (it checks them all
    for finiteness and writes only the former).

    The plan layers that share ``N`` (and dtype and device) form a solve group: their ``(U g)ᵀ`` rows are gathered
    in one ``(L, 1, N)`` tensor, solved by one batched product with their stacked inverses ``(K + λI)^{-1}``, formed
    from the Cholesky factor at the refresh's ``λ``, or, under a damping schedule (an eigendecomposition at hand),
    by ``Q diag(1/(e + λ)) Qᵀ`` as two batched products, for whatever ``λ`` the step has. Blocks of U of one shape
    (up to :data:`SMALL_U` elements) are stacked, ``(L, N, d)``: one batched product each way for all of them."""

    params: List[nn.Parameter]
    block_grad: List[int]  # per block of U (one per part of an explicit layer): the index of its gradient
    shape_groups: List[List[int]]  # blocks of one shape, ...
    stacks: List[Tensor]  # ... stacked: (L, N, d)
    shape_rows: List[Tensor]  # ... their layers' rows in their solve group (int64), ...
    shape_whole: List[bool]  # ... (those rows being the whole solve group in order, ...)
    shape_solve: List[int]  # ... and that group
    large: List[int]  # the blocks applied one by one, ...
    large_blocks: List[Tensor]  # ... (N, d) each, ...
    large_rows: List[int]  # ... their layer's row ...
    large_solve: List[int]  # ... in this solve group
    linears: List[Tuple[Tensor, Tensor, int, int]]  # (G (N, d_out), X (N, d_in), weight index or -1, bias or -1)
    linear_rows: List[int]  # the Linear layers' rows ...
    linear_solve: List[int]  # ... in these solve groups
    single_rows: List[Tensor]  # per solve group, the rows of its large blocks then its Linear layers (int64), ...
    single_whole: List[bool]  # ... those rows being the whole group in order (no stacked block in it)
    inverse_stacks: List[Tensor]  # per solve group, (K + λI)^{-1} of its layers, or their eigenvectors Q, (L, N, N)
    solve_diagonals: List[Optional[Tensor]]  # per solve group of eigenvectors, 1/(e + λ_l), (L, 1, N); else None
    eigenvalues: List[Optional[Tensor]]  # ... e, (L, 1, N), and ...
    solve_scales: List[Optional[Tensor]]  # ... the layers' λ_l / λ (their curvature's scale), (L, 1, 1)
    linear_inv_damping: List[Tensor]  # 1/λ per Linear layer, 0-dim (for a U g computed by the caller)
    linear_kinds: List[float]  # ... their curvature's scale
    groups: List[List[int]]  # indices in params + rest_params by device, dtype and kind: one check each, ...
    group_scales: List[Tensor]  # ... which also multiplies them by this (float32, one element): 1/λ_l, 1/(1 + λ), 1
    group_kinds: List[object]  # ... per group: the layers' scale (1/λ_l), "without" (1/(1 + λ)) or "rest" (1)
    post: List[int]  # indices of float64 parameters, scaled after the check (a float32 scale would round)
    post_scales: List[Tensor]  # their scales, 0-dim float64, ...
    post_kinds: List[object]  # ... of these kinds
    unstacked: List[int]  # the gradients no stack holds (guarded one by one)
    layers: List[Tuple[str, LayerCurvature]]  # the plan layers: explicit first (built U included), then Linear
    rest: List[Tuple[str, LayerCurvature]]  # the other layers with curvature: their own path
    rest_params: List[nn.Parameter]  # their parameters with a gradient: checked and guarded with the others
    built_bytes: int = 0  # what the plan holds besides the curvatures' own tensors (stacks, U built from G and X,
    # the stacked inverses or eigenvectors)
    host_readable: bool = False  # every gradient on a device in :data:`HOST_READ_DEVICES`
    damping: float = 0.0  # the λ its scales and solves hold now (:meth:`set_damping`)
    fixed_damping: Optional[float] = None  # a λ it cannot leave (inverses from a Cholesky factor; which layers are
    # in the plan depends on it): another needs a new plan
    key: tuple = ()
    curvatures: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.linear_layers: List[LinearLayer] = [layer for _, layer in self.layers[len(self.layers) - len(self.linears):]]

    def set_damping(self, damping: float) -> None:
        """Hold ``damping`` from now on: the scales of the gradients' pass and the solves' diagonals, written in
        place (a few small operations, no host read)."""
        if damping == self.damping:
            return
        for t, kind in zip(self.group_scales + self.post_scales + self.linear_inv_damping,
                           self.group_kinds + self.post_kinds + self.linear_kinds):
            t.fill_(_scale(kind, damping))
        for d, e, scale in zip(self.solve_diagonals, self.eigenvalues, self.solve_scales):
            if d is not None:
                torch.add(e, scale, alpha=damping, out=d).reciprocal_()
        self.damping = damping

    def arguments(self, grads: List[Tensor], us: Optional[List[Optional[Tensor]]] = None) -> tuple:
        """The arguments of :func:`step_tensors` for these gradients (``us``: Linear layers' ``U g`` computed
        by the caller, ``None`` where :func:`step_tensors` computes it from the gradient)."""
        us = [None] * len(self.linears) if us is None else us
        return (grads, self.block_grad, self.shape_groups, self.stacks, self.shape_rows, self.shape_whole,
                self.shape_solve, self.large, self.large_blocks, self.large_rows, self.large_solve, self.linears, us,
                self.linear_rows, self.linear_solve, self.single_rows, self.single_whole, self.inverse_stacks,
                self.solve_diagonals, self.linear_inv_damping, self.groups, self.group_scales, self.post,
                self.post_scales, self.unstacked)


def step_tensors(grads: List[Tensor], block_grad: List[int], shape_groups: List[List[int]], stacks: List[Tensor],
                 shape_rows: List[Tensor], shape_whole: List[bool], shape_solve: List[int], large: List[int],
                 large_blocks: List[Tensor], large_rows: List[int], large_solve: List[int],
                 linears: List[Tuple[Tensor, Tensor, int, int]], us: List[Optional[Tensor]], linear_rows: List[int],
                 linear_solve: List[int], single_rows: List[Tensor], single_whole: List[bool],
                 inverse_stacks: List[Tensor], solve_diagonals: List[Optional[Tensor]],
                 linear_inv_damping: List[Tensor],
                 groups: List[List[int]], group_scales: List[Tensor], post: List[int], post_scales: List[Tensor],
                 unstacked: List[int], guard: bool = True) -> Tensor:
    """Write the directions of a :class:`StepPlan` into ``grads`` (its parameters' gradients, in its order);
    returns a 1-element float32 tensor, nonzero where a gradient held NaN or ±Inf before the step. With ``guard``
    every gradient is then zeroed on the device where it did; without, the caller decides.

    The gradients are first scaled, ``g' = g/λ`` (``g/(1 + λ)`` without curvature), in the pass that checks them;
    then ``w' = (K + λI)^{-1} U g'`` and ``g' − Uᵀw'`` is the direction. Everything is a row: ``g'ᵀ`` ``(1, d)``,
    ``(U g')ᵀ = g'ᵀ Uᵀ`` and ``w'ᵀ`` ``(1, N)`` (``K`` is symmetric), ``(Uᵀw')ᵀ = w'ᵀ U``."""
    found = grads[0].new_zeros(1, dtype=torch.float32)
    for group, scale in zip(groups, group_scales):
        torch._amp_foreach_non_finite_check_and_unscale_([grads[i] for i in group], found, scale)
    if post:
        torch._foreach_mul_([grads[i] for i in post], post_scales)
    rows = [grads[i].view(1, -1) for i in block_grad]
    u: List[Optional[Tensor]] = [None] * len(inverse_stacks)  # (U g')ᵀ per layer, (L, 1, N) per solve group

    def gather(j: int, at: Tensor, whole: bool, part: Tensor) -> None:
        """``part`` into the rows ``at`` of solve group ``j`` (``whole``: all of them, in order)."""
        if u[j] is None and whole:
            u[j] = part
        elif whole:
            u[j].add_(part)
        else:
            if u[j] is None:
                inverse = inverse_stacks[j]
                u[j] = inverse.new_zeros(inverse.shape[0], 1, inverse.shape[1])
            u[j].index_add_(0, at, part)
    stacked = []
    for members, stack, at, whole, j in zip(shape_groups, stacks, shape_rows, shape_whole, shape_solve):
        g = torch.stack([rows[i] for i in members])  # (L, 1, d)
        stacked.append(g)
        gather(j, at, whole, torch.bmm(g, stack.transpose(1, 2)))
    singles: List[List[Tensor]] = [[] for _ in inverse_stacks]  # per solve group, (N,) each, in single_rows' order
    if large:
        for part, j in zip(torch.ops.aten._foreach_mm([rows[i] for i in large], [b.T for b in large_blocks]),
                           large_solve):
            singles[j].append(part.view(-1))
    for (G, X, wi, bi), given, j, inv in zip(linears, us, linear_solve, linear_inv_damping):
        if given is None:
            given = sketch.linear_u_dot(G, X, None if wi < 0 else grads[wi], None if bi < 0 else grads[bi])
        else:  # U g from the unscaled gradient
            given = given * inv
        singles[j].append(given)
    for j, parts in enumerate(singles):
        if parts:
            gather(j, single_rows[j], single_whole[j], torch.stack(parts).unsqueeze(1))
    # (w')ᵀ per layer (every solve group has a layer, and every plan layer a block or a Linear entry: u is full)
    w = [torch.bmm(uj, inverse) if d is None else torch.bmm(torch.bmm(uj, inverse) * d, inverse.transpose(1, 2))
         for uj, inverse, d in zip(u, inverse_stacks, solve_diagonals)]
    keep = (found[0] == 0) if guard else None
    for members, stack, g, at, whole, j in zip(shape_groups, stacks, stacked, shape_rows, shape_whole, shape_solve):
        g.baddbmm_(w[j] if whole else w[j].index_select(0, at), stack, alpha=-1)
        if keep is not None:  # zeroed here, before it is copied back, where the gradient was not finite
            bits = _BITS[g.element_size()]
            g.view(bits).mul_(keep.to(bits))
        torch._foreach_copy_([rows[i] for i in members], g.unbind(0))
    for i, block, at, j in zip(large, large_blocks, large_rows, large_solve):
        rows[i].addmm_(w[j][at], block, alpha=-1)
    w_rows: Dict[int, Sequence[Tensor]] = {}  # per solve group with Linear layers: (w')ᵀ's rows, (N,) each
    for (G, X, wi, bi), at, j in zip(linears, linear_rows, linear_solve):
        if j not in w_rows:
            w_rows[j] = w[j].view(w[j].shape[0], -1).unbind(0)
        # g' − Uᵀw': the per-layer path's in-place apply with λ = 1 (g' and w' already carry 1/λ)
        sketch.linear_apply(G, X, w_rows[j][at], None if wi < 0 else grads[wi], None if bi < 0 else grads[bi],
                            1.0, inplace=True)
    if keep is not None and unstacked:
        _keep_bits_([grads[i] for i in unstacked], keep)
    return found


_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def clear_nonfinite_(grads: List[Tensor], found: Tensor) -> None:
    """Every gradient zeroed where ``found`` is nonzero, left bit for bit as it is otherwise, on the device: the
    gradients' bits, seen as integers, times ``1 − found`` (one multi-tensor product per element size; integers
    have no NaN, and all-zero bits are +0.0)."""
    _keep_bits_(grads, found[0] == 0)


def _keep_bits_(tensors: List[Tensor], keep: Tensor) -> None:
    """``tensors`` times ``keep`` (a 0-dim bool tensor) bit for bit: their bits as integers times 1 or 0."""
    by_size: Dict[int, List[Tensor]] = {}
    for t in tensors:
        by_size.setdefault(t.element_size(), []).append(t)
    for size, group in by_size.items():
        torch._foreach_mul_([t.view(_BITS[size]) for t in group], keep.to(_BITS[size]))


def _solver(cur: Curvature, damping: float) -> Optional[Tuple[Tensor, Optional[Tensor]]]:
    """How the plan solves with a committed curvature at the layer's ``λ``: ``(Q, e)`` of its eigendecomposition
    under a damping schedule (any ``λ``), or ``((K + λI)^{-1}, None)``, the inverse formed from the Cholesky factor
    (kept on the curvature) at the refresh's ``λ``; ``None`` where neither serves (a new factorisation is due: the
    layer's own path does it)."""
    if cur.eigen is not None:
        return cur.eigen
    if damping == cur.damping:
        if cur.inverse is None:
            cur.inverse = torch.cholesky_inverse(cur.chol)
        return cur.inverse, None
    return None


def _scale(kind: object, damping: float) -> float:
    """The factor a gradient of this kind takes in the checking pass: ``1/λ_l`` for a layer whose curvature's scale
    is ``kind``, ``1/(1 + λ)`` without curvature, 1 for the layers on their own path."""
    if kind == "without":
        return 1.0 / (1.0 + damping)
    if kind == "rest":
        return 1.0
    return 1.0 / (damping * kind)


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


def build_plan(layers: Sequence[Tuple[str, LayerCurvature]], without: List[nn.Parameter],
               damping: float) -> Optional[StepPlan]:
    """The plan for ``layers`` (those with usable curvature this step, with their gradients in place) and the
    parameters ``without`` curvature (``g / (1 + λ)``) at ``damping``; ``None`` when no layer has a plain route."""
    explicit, linear, rest = [], [], []
    for name, layer in layers:
        cur = layer.curvature
        lam = damping * cur.scale
        route = cur.route
        solver = _solver(cur, lam)
        parts = None if solver is None else _views(layer, cur)
        if parts is not None and type(route) is ExplicitRoute and "index" not in route.tensors:
            explicit.append((name, layer, cur, lam, solver, _explicit_blocks(route)))
        elif (parts is not None and type(route) is GramRoute and isinstance(layer, LinearLayer)
              and route.plain() is not None):
            G, X = route.plain()
            # (not while its U g' comes from the batch: the layer is watched only where that saves much more)
            if (G.shape[0] * (G.shape[1] * (X.shape[1] * cur.mask[0] + route.options["bias"])) <= SMALL_U
                    and layer.batch is None):
                explicit.append((name, layer, cur, lam, solver, _built_blocks(G, X, cur.mask[0],
                                                                              route.options["bias"])))
            else:
                linear.append((name, layer, cur, lam, solver))
        else:
            rest.append((name, layer))
    if not explicit and not linear:
        return None
    params: List[nn.Parameter] = []
    blocks, block_grad, block_layer, linears = [], [], [], []
    built = 0
    for k, (_, layer, cur, _, _, layer_blocks) in enumerate(explicit):
        built += sum(b.numel() * b.element_size() for b in layer_blocks) if type(cur.route) is GramRoute else 0
        for block, p in zip(layer_blocks, layer.trainable_params(cur.mask)):
            blocks.append(block)
            block_grad.append(len(params))
            block_layer.append(k)
            params.append(p)
    for _, layer, cur, _, _ in linear:
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
    solvers, kinds, curs = [], [], []
    for _, layer, cur, lam, solver, *_ in explicit + linear:
        solvers.append(solver)
        curs.append(cur)
        kinds += [cur.scale] * len(layer.trainable_params(cur.mask))
    by_n: Dict[tuple, List[int]] = {}
    for k, (matrix, eigenvalues) in enumerate(solvers):
        by_n.setdefault((matrix.shape[0], matrix.dtype, matrix.device, eigenvalues is None), []).append(k)
    solve_of, row_of = {}, {}  # plan layer -> its solve group and row there
    for j, members in enumerate(by_n.values()):
        for r, k in enumerate(members):
            solve_of[k], row_of[k] = j, r
    inverse_stacks = [torch.stack([solvers[k][0] for k in members]) for members in by_n.values()]
    eigenvalues = [None if inverse else torch.stack([solvers[k][1] for k in members]).unsqueeze(1)
                   for (*_, inverse), members in by_n.items()]
    solve_scales = [None if e is None else torch.tensor([curs[k].scale for k in members], dtype=e.dtype,
                                                        device=e.device).view(-1, 1, 1)
                    for e, members in zip(eigenvalues, by_n.values())]
    solve_diagonals = [None if e is None else torch.empty_like(e) for e in eigenvalues]

    def rows_tensor(layer_ids: List[int], device) -> Tensor:
        return torch.tensor([row_of[k] for k in layer_ids], dtype=torch.long, device=device)

    by_shape: Dict[tuple, List[int]] = {}
    for i, b in enumerate(blocks):
        key = (tuple(b.shape), b.dtype, b.device, solve_of[block_layer[i]]) if b.numel() <= SMALL_U else i
        by_shape.setdefault(key, []).append(i)
    # a block alone in its shape gains nothing from a stack: one by one, with the large ones
    shape_groups = [members for key, members in by_shape.items() if isinstance(key, tuple) and len(members) > 1]
    large = sorted(members[0] for key, members in by_shape.items() if not isinstance(key, tuple) or len(members) == 1)
    stacks = [torch.stack([blocks[i] for i in members]) for members in shape_groups]
    built += sum(t.numel() * t.element_size() for t in stacks)
    shape_rows = [rows_tensor([block_layer[i] for i in members], blocks[members[0]].device) for members in shape_groups]
    shape_solve = [solve_of[block_layer[members[0]]] for members in shape_groups]
    sizes = [len(members) for members in by_n.values()]
    shape_whole = [[row_of[block_layer[i]] for i in members] == list(range(sizes[j]))
                   for members, j in zip(shape_groups, shape_solve)]
    large_rows = [row_of[block_layer[i]] for i in large]
    first = len(explicit)
    linear_rows = [row_of[first + k] for k in range(len(linears))]
    linear_solve = [solve_of[first + k] for k in range(len(linears))]
    linear_inv_damping = [torch.zeros((), dtype=cur.gram.dtype, device=cur.gram.device) for _, _, cur, *_ in linear]
    linear_kinds = [cur.scale for _, _, cur, *_ in linear]
    single_rows, single_whole = [], []  # per solve group: its large blocks' rows, then its Linear layers'
    for j, size in enumerate(sizes):
        at = ([row_of[block_layer[i]] for i in large if solve_of[block_layer[i]] == j]
              + [row for row, solve in zip(linear_rows, linear_solve) if solve == j])
        single_rows.append(torch.tensor(at, dtype=torch.long, device=inverse_stacks[j].device))
        single_whole.append(at == list(range(size)))
    params += without
    kinds += ["without"] * len(without)
    rest_params = [p for _, layer in rest for p in layer.trainable_params(layer.curvature.mask) if p.grad is not None]
    kinds += ["rest"] * len(rest_params)
    by_key: Dict[tuple, List[int]] = {}
    post, post_kinds = [], []
    for i, (p, kind) in enumerate(zip(params + rest_params, kinds)):
        if p.dtype == torch.float64 and kind != "rest":
            post.append(i)
            post_kinds.append(kind)
            kind = "rest"
        by_key.setdefault((p.device, p.dtype, kind), []).append(i)
    group_scales = [torch.ones(1, dtype=torch.float32, device=device) for device, _, _ in by_key]
    post_scales = [torch.ones((), dtype=torch.float64, device=params[i].device) for i in post]
    in_stacks = {block_grad[i] for members in shape_groups for i in members}
    unstacked = [i for i in range(len(params) + len(rest_params)) if i not in in_stacks]
    host = all(p.device.type in HOST_READ_DEVICES for p in params + rest_params)
    built += sum(t.numel() * t.element_size() for t in inverse_stacks)  # copies of the inverses or eigenvectors
    plan = StepPlan(params, block_grad, shape_groups, stacks, shape_rows, shape_whole, shape_solve, large,
                    [blocks[i] for i in large], large_rows, [solve_of[block_layer[i]] for i in large], linears,
                    linear_rows, linear_solve, single_rows, single_whole, inverse_stacks, solve_diagonals, eigenvalues,
                    solve_scales, linear_inv_damping, linear_kinds, list(by_key.values()), group_scales,
                    [kind for _, _, kind in by_key], post, post_scales, post_kinds, unstacked,
                    [(n, layer) for n, layer, *_ in explicit + linear], rest, rest_params, built, host, damping=math.nan,
                    fixed_damping=damping if any(layer.curvature.eigen is None for _, layer in layers) else None)
    plan.set_damping(damping)
    return plan


def _explicit_blocks(route: ExplicitRoute) -> List[Tensor]:
    U = route.tensors["U"]
    return [U[:, cols] for cols in route._blocks()]


def _built_blocks(G: Tensor, X: Tensor, weight: bool, bias: bool) -> List[Tensor]:
    """U's blocks of a plain Linear from its Gram factors: ``G[n] ⊗ X[n]`` flattened as the weight is (row-major
    ``(d_out, d_in)``), and ``G`` for the bias."""
    blocks = [(G[:, :, None] * X[:, None, :]).reshape(G.shape[0], -1)] if weight else []
    return blocks + ([G] if bias else [])


def runner(compile_mode: Optional[str]) -> Callable[..., Tensor]:
    """:func:`step_tensors`, compiled whole (``fullgraph=True``) in ``compile_mode`` (``"default"``,
    ``"reduce-overhead"``: CUDA graphs, ...), or as it is for ``None``."""
    if compile_mode is None:
        return step_tensors
    return torch.compile(step_tensors, fullgraph=True, mode=compile_mode)
