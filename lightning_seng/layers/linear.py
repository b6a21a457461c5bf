"""``nn.Linear`` on inputs ``(N, d_in)`` or sequences ``(N, ..., d_in)``.

Per sample, the gradient is ``J_n = Σ_t G[n, :, t] ⊗ x̃[n, :, t]`` (``x̃`` = input with a 1 appended
for the bias): rank one for 2-D inputs, where ``UUᵀ = (G Gᵀ) ∘ (X̃ X̃ᵀ)`` and no per-sample tensor is
built; rank ≤ T for sequences. A layer called several times in one forward (weight sharing) adds the
calls as further positions.

Between refreshes (DESIGN.md §4), a plain Linear called once on a 2-D input keeps references (never
copies) to that call's input ``xb (B, d_in)`` and output gradient ``gb (B, d_out)``, which autograd holds
anyway, and releases them at the end of the step. When the weight's gradient ``g'_w`` is exactly that call's
``gbᵀ xb``, its share of ``U g'`` is ``rowsum((G gbᵀ) ∘ (X xbᵀ))``: ``N·B·(d_in + d_out)`` instead of
``N·d_out·d_in``; on a refresh step whose curvature was built from all of that call's samples, ``g'_w`` is
``U_wᵀ1`` over the row scale and its share is ``(UUᵀ)1`` over it, less the bias's part, for almost nothing.
The bias's share ``G g'_b`` (``N·d_out``) always comes from ``.grad``.

"Exactly" is decided from the autograd graph, not from values: the gradient that reached the weight's
accumulator must be the very tensor that this call's backward produced for it (so no other use of the weight
added a term: an L2 penalty in the loss, a second call, a tied use), it must have reached a ``.grad`` that was
``None`` (no accumulation over micro-batches or backward passes), and ``.grad`` must be unmodified since (its
version counter: no weight decay added into it, no clipping). Otherwise ``U g'`` is computed from ``.grad``
itself; so it is under a loss scale (AMP's unscaling changes ``.grad`` without a version bump) and under
``torch.distributed`` with several processes (``.grad`` may be averaged across them), which the
preconditioner rules out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import sketch
from .base import Curvature, Factors, Mask, MatrixLayer


@dataclass(slots=True)
class Arrival:
    """How one parameter's gradient was formed this step."""

    expected: Optional[Tensor] = None  # what this call's backward produced for it, until it reaches the accumulator
    count: int = 0  # gradients that reached the accumulator
    was_none: bool = True  # ``.grad`` was None before each of them
    sole: bool = False  # the one that reached it was ``expected`` itself (no other term was added)
    grad: Optional[Tensor] = None  # ``.grad`` after accumulation, and its version counter then
    version: int = -1


@dataclass(slots=True)
class BatchCall:
    """References to this step's first forward call of the layer: its 2-D input and its output's gradient."""

    x: Optional[Tensor]
    grad: Optional[Tensor] = None
    calls: int = 1
    backwards: int = 0
    traced: bool = True  # the weight has exactly one edge from this call's backward
    row_scale: Optional[float] = None  # U's rows are this call's samples times 1/row_scale (a refresh from it)


_ACCUMULATOR = torch._C._functions.AccumulateGrad

# Multiply-adds a step must save for a layer to take part. Watching a call costs a few Python hooks in the
# forward and backward, about 0.15 ms a layer on one core of the development CPU (benchmarks/overhead.py's MLP:
# at N = B = 128 the 784-512-512 layers, saving 2^24.8 and 2^24, break even; at N = 32, saving 2^22.8 and 2^22,
# they lose; 2048-wide layers win 8 % of a step). On an accelerator the same hooks cost the same host time
# while the products run about a thousand times faster (not measured here).
MIN_SAVING = 1 << 24
ACCELERATOR_FACTOR = 1 << 10


def sole_edges(root: Any, params: Sequence[Tensor], skip: Any = None,
               depth: int = 3) -> Optional[List[Tuple[Any, int]]]:
    """For each of ``params``, the one edge ``(node, index)`` of the autograd graph below ``root`` (searched
    ``depth`` nodes deep, not through ``skip``: the call's input, whose history is the rest of the network) that
    feeds its gradient accumulator (through a transpose, a dtype cast under autocast, ...); ``None`` if a
    parameter has none or several."""
    found: Dict[int, List[Tuple[Any, int]]] = {id(p): [] for p in params}
    frontier, seen = [root], {skip}
    for _ in range(depth):
        below = []
        for node in frontier:
            for index, (nxt, _) in enumerate(node.next_functions):
                if nxt is None or nxt in seen:
                    continue
                if type(nxt) is _ACCUMULATOR:
                    edges = found.get(id(nxt.variable))
                    if edges is not None:
                        edges.append((node, index))
                else:
                    seen.add(nxt)
                    below.append(nxt)
        frontier = below
    if any(len(edges) != 1 for edges in found.values()):
        return None
    return [found[id(p)][0] for p in params]


class LinearLayer(MatrixLayer):
    kind = "linear"

    def __init__(self, name, module):
        super().__init__(name, module)
        self.batch: Optional[BatchCall] = None
        self._arrivals: Dict[int, Arrival] = {}  # id(param) -> how its gradient was formed this step
        self._leaf_hooks: List[Any] = []  # [weight, its hook handles] once a call was watched
        self._worth: Optional[tuple] = None  # (curvature, batch, gate, whether to watch), decided once for them

    def sample_axes(self, x: Tensor) -> Sequence[int]:
        return range(x.dim() - 1)  # any leading axis: (N, d), (N, T, d), (T, N, d), ...

    def _factors(self, calls: List[Tuple[Tensor, Tensor]], mask: Mask) -> Factors:
        xs, gs = [], []
        for x, g in calls:
            n = x.shape[0]
            xs.append(x.reshape(n, -1, x.shape[-1]))  # (N, T, d_in)
            gs.append(g.reshape(n, -1, g.shape[-1]))  # (N, T, d_out)
        X = (xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)).transpose(1, 2).unsqueeze(1)  # (N, 1, d_in, P)
        G = (gs[0] if len(gs) == 1 else torch.cat(gs, dim=1)).transpose(1, 2).unsqueeze(1)  # (N, 1, d_out, P)
        return self._assemble(G, X, mask)

    # ----------------------------------------------------------------- the batch between refreshes
    def _watch_weight(self, weight: nn.Parameter) -> None:
        """Hooks on the weight that record how its gradient was formed (:class:`Arrival`), registered when a call
        is watched and kept while calls are (a layer not watched pays nothing)."""
        if self._leaf_hooks and self._leaf_hooks[0] is weight:
            return
        self.remove_hooks()
        self._leaf_hooks = [weight, weight.register_hook(self._arrived(weight)),
                            weight.register_post_accumulate_grad_hook(self._accumulated)]

    def remove_hooks(self) -> None:
        for handle in self._leaf_hooks[1:]:
            handle.remove()
        self._leaf_hooks = []

    def _arrival(self, p: Tensor) -> Arrival:
        arrival = self._arrivals.get(id(p))
        if arrival is None:
            arrival = self._arrivals[id(p)] = Arrival()
        return arrival

    def _arrived(self, p: nn.Parameter):
        def arrived(grad: Tensor) -> None:
            a = self._arrival(p)
            a.count += 1
            a.was_none = a.was_none and p.grad is None
            a.sole = a.expected is not None and grad is a.expected
            a.expected = None  # held no longer than needed: the accumulator may then take the tensor as .grad
        return arrived

    def _accumulated(self, p: nn.Parameter) -> None:
        a = self._arrival(p)
        a.grad, a.version = p.grad, p.grad._version

    def observe(self, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> None:
        """Forward hook body (every step, beside :meth:`capture` on refresh steps): keep references to the
        call's input and output gradient, and hook the graph edge that carries the weight's gradient."""
        if type(self) is not LinearLayer or not isinstance(output, Tensor) or output.grad_fn is None:
            return
        if self.batch is not None:
            self.batch.calls += 1
            return
        x = args[0] if args and isinstance(args[0], Tensor) and args[0].dim() == 2 else None
        weight = self.module.weight
        # a second call, should there be one, shows as a second term at the weight's accumulator; a hook of the
        # user's on the weight may change its gradient where no version counter shows it
        if (x is None or not weight.requires_grad or id(weight) in self.excluded
                or not self._worth_watching(x.shape[0], x.device.type == "cpu") or self._foreign_hooks(weight)):
            if self._leaf_hooks:  # not worth it (any more): the weight's hooks would cost every backward
                self.remove_hooks()
            return
        batch = self.batch = BatchCall(x.detach())
        edges = sole_edges(output.grad_fn, [weight], x.grad_fn)
        if edges is None:
            batch.traced = False
            return
        self._watch_weight(weight)
        node, index = edges[0]
        node.register_hook(self._produced(self._arrival(weight), index))

        def keep(grad: Tensor) -> None:
            batch.grad, batch.backwards = grad.detach(), batch.backwards + 1
        output.register_hook(keep)

    def _foreign_hooks(self, weight: nn.Parameter) -> bool:
        """Whether the weight carries a gradient hook or a post-accumulate-grad hook that is not this layer's."""
        hooks = getattr(weight, "_backward_hooks", None) or {}
        after = getattr(weight, "_post_accumulate_grad_hooks", None) or {}
        own = self._leaf_hooks
        if own and own[0] is weight:  # the hooks there less this layer's two
            return len(hooks) + len(after) != (own[1].id in hooks) + (own[2].id in after)
        return bool(hooks) or bool(after)

    def watchable(self) -> bool:
        """Whether a call may be worth watching with the current curvature: at a batch of one on the CPU's gate,
        the most a call can save (always before the first refresh); where not, the hooks on the weight go."""
        cur = self.curvature
        if type(self) is not LinearLayer:
            return False
        if cur is not None:
            d_out, d_in = self.module.weight.shape
            if cur.gram.shape[0] * (d_in * d_out - d_in - d_out) < MIN_SAVING:
                if self._leaf_hooks:
                    self.remove_hooks()
                return False
        return True

    def _worth_watching(self, batch: int, cpu: bool) -> bool:
        """Whether ``U g'`` from a batch of ``batch`` saves at least :data:`MIN_SAVING` multiply-adds (times
        :data:`ACCELERATOR_FACTOR` off the CPU) over ``U g'`` from the gradient, for the current curvature's ``N``
        rows (``batch`` before the first refresh)."""
        gate = MIN_SAVING if cpu else MIN_SAVING * ACCELERATOR_FACTOR
        cur, known = self.curvature, self._worth
        if known is None or known[0] is not cur or known[1] != batch or known[2] != gate:
            d_out, d_in = self.module.weight.shape
            n = batch if cur is None else cur.gram.shape[0]
            known = self._worth = cur, batch, gate, n * (d_in * d_out - batch * (d_in + d_out)) >= gate
        return known[3]

    @staticmethod
    def _produced(arrival: Arrival, index: int):
        def produced(grad_inputs, grad_outputs) -> None:
            arrival.expected = grad_inputs[index]
        return produced

    def release(self) -> None:
        super().release()
        self.batch = None
        self._arrivals = {}

    def refreshed_from_batch(self, scale: float) -> None:
        if self.batch is not None and self.batch.calls == 1:
            self.batch.row_scale = 1.0 / scale

    def batch_factors(self, cur: Curvature) -> Optional[Tuple[Tensor, Tensor]]:
        """``(gb, xb)`` in the curvature's dtype when ``g'`` is exactly this step's ``gbᵀ x̃b`` (see the module
        docstring) and the shortcut is the cheaper ``U g'``; else ``None``."""
        b = self.batch
        if (b is None or b.x is None or b.grad is None or not b.traced or b.calls != 1 or b.backwards != 1
                or cur.route.name != "gram" or not cur.mask[0]):
            return None
        p = self.module.weight
        a = self._arrivals.get(id(p))
        if (a is None or a.count != 1 or not a.was_none or not a.sole or p.grad is not a.grad
                or p.grad._version != a.version):
            return None
        views = cur.route.plain()
        if views is None:
            return None
        d_out, d_in = views[0].shape[1], views[1].shape[1]
        if b.x.shape[0] * (d_in + d_out) >= d_in * d_out:
            return None
        dtype = cur.gram.dtype
        return b.grad.to(dtype), b.x.to(dtype)

    def _u_dot(self, cur: Curvature, parts: List[Tensor]) -> Tensor:
        u = self.batch_u_dot(cur, parts)
        return super()._u_dot(cur, parts) if u is None else u

    def batch_u_dot(self, cur: Curvature, parts: List[Tensor]) -> Optional[Tensor]:
        """``U g'`` from this step's batch where :meth:`batch_factors` allows it, else ``None``."""
        batch = self.batch_factors(cur)
        if batch is None:
            return None
        G, X = cur.route.plain()
        bias = cur.route.options["bias"]
        if self.batch.row_scale is not None:
            # g'_w = U_wᵀ1 / scale, so U_w g'_w = (UUᵀ)1 / scale less the bias's share (G Gᵀ)1 = G (Gᵀ1)
            u = cur.gram.sum(1)
            if bias:
                u = torch.addmv(u, G, G.sum(0), alpha=-1)
            u = u * self.batch.row_scale
        else:
            u = sketch.batch_u_dot(G, X, *batch, False)
        # the bias's share from .grad itself: N·d_out, no need to know how it was formed
        return torch.addmv(u, G, parts[-1][0]) if bias else u
