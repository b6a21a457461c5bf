"""The runtime identities that make a layer's SENG direction exact (DESIGN.md §6).

Pattern checks cannot foresee every usage: a hook on a weight, a second path to a parameter (the weight used
outside the module, attention weights or an input-gradient penalty in the loss), a recurrent cell whose calls
feed each other. So on every refresh step SENG checks, per layer, what exactness means:

1. **The per-sample gradients sum to the gradient the backward produced.** ``Σ_n J_n = g_prod``, where
   ``J_n`` is what the layer built from its captured calls and ``g_prod`` the gradient that reached each
   parameter's accumulator in this step's last backward (after any hook on the parameter; summed over the
   passes through one forward), within ``τ·(M + ‖g_prod‖)``: ``M`` bounds the magnitudes summed (the norms of the
   rank-one terms, or of the per-sample gradients) and ``τ`` follows the coarsest precision that took part
   (:func:`tolerance`).
2. **``.grad`` is that gradient** over the loss scale ``s``, where ``.grad`` held nothing before the backward (in
   one process): then ``g_prod`` is not copied at all, ``.grad`` itself is compared with ``Σ_n J_n / s``, and both
   identities hold at once when they agree. Up to one ``c`` common to all layers: a common ``c = 2^k`` (``k ≠ 0``)
   is a loss scale SENG was not told of (AMP's); another common ``c`` is a rescaling of the whole gradient
   (clipping by norm), which the direction ``(F + λI)^{-1}·.grad`` serves exactly (``F`` comes from the backward,
   whatever ``.grad`` is scaled by); a ``c`` of one layer alone, or a difference that is no rescaling, fails.
   Under gradient accumulation (``.grad`` held the earlier micro-batches) and across processes (``.grad`` is
   averaged), ``g_prod`` is copied as it arrives and identity 1 alone is checked.

A layer that fails gets ``g / (1 + λ)`` and one WARNING that names the identity and the likely cause.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

SUM_CAUSES = ("a hook on a parameter that changes its gradient, or a second path to a parameter that the "
              "module's captured calls do not see (the weight used outside the module's forward, a penalty on it "
              "in the loss (weight decay belongs in the optimizer), attention weights or an input-gradient "
              "penalty in the loss, a recurrent cell unrolled so that its calls feed each other)")


# Relative error a damped solve may reach (unit roundoff times the bound (tr UUᵀ + λ)/λ on its condition number)
# before a float32 layer is kept in float64, or a float64 one falls back.
RESOLVABLE = 1e-2


def tolerance(eps: float) -> float:
    """``τ`` for a sum of products computed with unit roundoff ``eps``, relative to the sum of the terms'
    magnitudes: ``1024·ε`` in float32/float64 (sums of up to millions of terms, accumulated in blocks), ``16·ε``
    in half precision, TF32 or bf16 products (where ``1024·ε`` would exceed 1)."""
    return 1024 * eps if eps < 1e-6 else 16 * eps


class GradientWatch:
    """The gradient the backward passes of a refresh step produce for some parameters, as it reaches each
    one's accumulator (a pre-hook on the ``AccumulateGrad`` node: after any hook registered on the parameter).

    Where ``.grad`` held nothing before the first pass of the current forward and ``direct`` (one process), the
    parameter is only marked (``into_empty``): ``.grad`` will hold that gradient (up to later edits, which
    identity 2 sees). Otherwise the gradient is copied (a later in-place change of ``.grad`` must not reach it)
    and summed over the passes through one forward (``retain_graph``) into ``produced``. The nodes are held while
    watching, so that every graph built until the refresh feeds the same hooked node.
    """

    def __init__(self) -> None:
        self._handles: List[Tuple[nn.Parameter, object, object]] = []  # (parameter, node, hook handle)
        self.produced: Dict[int, Tensor] = {}
        self.into_empty: Dict[int, bool] = {}
        self.direct = True

    def __deepcopy__(self, memo: dict) -> "GradientWatch":
        return GradientWatch()  # a copy watches nothing: the hooks belong to this object's parameters

    def __getstate__(self) -> dict:
        return GradientWatch().__dict__

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def start(self, params: Sequence[nn.Parameter], direct: bool) -> None:
        """Watch ``params`` (those that require grad) until :meth:`stop`; nothing if already watching."""
        if self._handles:
            return
        self.direct = direct
        for p in params:
            if p.requires_grad and not isinstance(p, nn.parameter.UninitializedParameter):
                node = torch.autograd.graph.get_gradient_edge(p).node
                self._handles.append((p, node, node.register_prehook(self._keeper(p))))

    def _keeper(self, p: nn.Parameter) -> Callable:
        def keep(grads: Tuple[Optional[Tensor], ...]) -> None:
            grad = grads[0]
            if grad is None:
                return
            key = id(p)
            if key not in self.into_empty:  # the first pass of this forward
                self.into_empty[key] = self.direct and p.grad is None
            if self.into_empty[key]:
                return  # .grad is this forward's gradient: compared as it is at the step
            old = self.produced.get(key)
            self.produced[key] = grad.detach().clone() if old is None else old + grad.detach()
        return keep

    def target(self, p: nn.Parameter) -> Optional[Tensor]:
        """What ``Σ_n J_n`` of ``p`` is compared with: ``.grad`` where it held nothing before (compared over the
        loss scale), else the copied ``g_prod``; ``None`` if no gradient arrived."""
        if self.into_empty.get(id(p)):
            return p.grad
        return self.produced.get(id(p))

    def reset(self) -> None:
        """A new forward after a completed backward (the next micro-batch): forget what the last one produced."""
        self.produced, self.into_empty = {}, {}

    def stop(self) -> None:
        for _, _, handle in self._handles:
            handle.remove()
        self._handles = []
        self.reset()


def sum_terms(sums: List[Tensor], produced: List[Tensor], magnitude: Tensor) -> Tensor:
    """``[‖Σ_n J_n − g_prod‖, ‖g_prod‖, M]``, float64 on the device (read with the other layers' at once); the
    norms are taken in the tensors' own dtype (a float64 copy of each gradient would cost more than the sum)."""
    diff = torch.stack([torch.linalg.vector_norm(s - g.to(s.dtype)) for s, g in zip(sums, produced)])
    norm = torch.stack([torch.linalg.vector_norm(g) for g in produced])
    return torch.stack([torch.linalg.vector_norm(diff.to(torch.float64)), torch.linalg.vector_norm(norm.to(torch.float64)),
                        magnitude.to(torch.float64).reshape(())])


def sum_mismatch(terms: Sequence[float], eps: float) -> Optional[float]:
    """From :func:`sum_terms` read back: ``‖Σ_n J_n − g_prod‖ / ‖g_prod‖`` where it exceeds
    ``τ·(M + ‖g_prod‖)`` (``τ`` = :func:`tolerance` of ``eps``), else ``None``."""
    diff, norm, magnitude = terms
    if math.isfinite(diff) and diff <= tolerance(eps) * (magnitude + norm):
        return None
    return diff / norm if norm > 0 else math.inf


def direct_terms(sums: List[Tensor], grads: List[Tensor], magnitude: Tensor) -> Tensor:
    """For one layer's ``Σ_n J_n / s`` (``sums``) and ``.grad`` (``grads``): ``[<a, b>, ‖b‖², ‖a‖², ‖a − b‖², M]`` with
    ``a = .grad``, ``b = Σ_n J_n / s``, ``M`` the summed magnitudes over ``s``; float64 on the device, each taken in
    the tensors' own dtype."""
    rows = []
    for b, a in zip(sums, grads):
        a, b = a.reshape(-1), b.reshape(-1).to(a.dtype)
        rows.append(torch.stack([torch.vdot(a, b), torch.linalg.vector_norm(b) ** 2, torch.linalg.vector_norm(a) ** 2,
                                 torch.linalg.vector_norm(a - b) ** 2]).to(torch.float64))
    return torch.cat([torch.stack(rows).sum(0), magnitude.to(torch.float64).reshape(1)])


def judge_direct(rows: Dict[str, Sequence[float]], eps: Dict[str, float]) -> Dict[str, str]:
    """Identities 1 and 2 at once over the layers compared with their ``.grad`` (:func:`direct_terms` read back,
    ``eps`` each layer's roundoff): per failing layer, why. A layer passes where ``‖.grad − Σ_n J_n/s‖`` is within
    ``τ·(M + ‖Σ_n J_n/s‖)``; otherwise where ``.grad`` is ``c`` times the sum (the residual ``‖.grad‖² − c<.grad, Σ>``
    resolves down to about ``√ε``) with ``c`` common to all such layers and no power of two."""
    failed: Dict[str, str] = {}
    scales: Dict[str, float] = {}
    for name, (dot, bb, aa, dd, magnitude) in rows.items():
        tol = tolerance(eps[name])
        if math.isfinite(dd) and math.sqrt(dd) <= tol * (magnitude + math.sqrt(bb)):
            scales[name] = 1.0
            continue
        c = dot / bb if bb > 0 else math.inf
        rest = math.sqrt(max(aa - c * dot, 0.0)) if math.isfinite(c) else math.inf
        floor = tol * abs(c) * (magnitude + math.sqrt(bb)) + 8 * math.sqrt(eps[name]) * math.sqrt(aa)
        if not math.isfinite(c) or c <= 0 or not rest <= floor:
            relative = math.sqrt(dd / aa) if aa > 0 else math.inf
            failed[name] = (f"its per-sample gradients do not sum to its .grad, nor does .grad rescale them (relative "
                            f"difference {relative:.2g}): likely {SUM_CAUSES}; or .grad was changed between backward "
                            "and step (a post-accumulate-grad hook, clipping by value, an edit of .grad)")
        else:
            scales[name] = c
    if not scales:
        return failed
    common = sorted(scales.values())[len(scales) // 2]
    tol = max(tolerance(eps[name]) + 8 * math.sqrt(eps[name]) for name in scales)
    for name, c in scales.items():
        if abs(c - common) > tol * abs(common):
            failed[name] = (f"its .grad is {c:.4g} times its per-sample gradients' sum over the loss scale while the "
                            f"other layers' are {common:.4g} times theirs: this layer's gradient was rescaled alone "
                            "(a hook on its parameters, an edit of its .grad)")
    k = round(math.log2(common)) if common > 0 else 0
    if k != 0 and abs(common / 2.0 ** k - 1) <= tol:
        for name in scales:
            failed.setdefault(name, f"every .grad is 2^{k} times the gradient its backward produced over the loss "
                                    "scale: an AMP loss scale (or another power-of-two factor on the loss) that did "
                                    "not reach SENG; pass it as seng.step(loss_scale=...)")
    return failed


def batch_weights(loss: Tensor, n: int) -> Optional[List[float]]:
    """The weight ``w`` of each sample's loss in each term ``w·Σ_n ℓ_n`` of ``loss``, read from its autograd graph:
    a term's reduction over the batch (the leading axis of size ``n``: ``1`` for a sum, ``1/n`` for a mean; a mean
    over the other axes too is a per-sample mean) times the constant factors on the way (a loss scale, ``1/k``
    for accumulation, a weight). A reduction of a tensor without the batch axis (a penalty on the parameters) is
    no such term. ``None`` where the graph does not tell (another node on the way)."""
    found: List[float] = []

    def walk(node, factor: float, depth: int) -> bool:
        if node is None or depth > 12:
            return False
        kind = type(node).__name__
        nxt = [f for f, _ in node.next_functions]
        if kind in ("MulBackward0", "DivBackward0"):
            const = [i for i, f in enumerate(nxt) if f is None]
            if kind == "DivBackward0" and const == [1]:
                other = node._saved_other
                return other.numel() == 1 and walk(nxt[0], factor / float(other), depth + 1)
            if kind == "MulBackward0" and len(const) == 1:
                other = node._saved_other if const == [1] else node._saved_self
                return other.numel() == 1 and walk(nxt[1 - const[0]], factor * float(other), depth + 1)
            return False
        if kind == "NegBackward0":
            return walk(nxt[0], -factor, depth + 1)
        if kind in ("AddBackward0", "SubBackward0"):
            alpha = float(getattr(node, "_saved_alpha", 1))
            second = alpha if kind == "AddBackward0" else -alpha
            return all(f is None or walk(f, w, depth + 1) for f, w in zip(nxt, (factor, factor * second)))
        reduction = getattr(node, "_saved_reduction", None)
        if reduction is not None:  # a loss function's own reduction: 1 mean, 2 sum (over all its elements)
            first = getattr(node, "_saved_self", None)
            if reduction not in (1, 2) or first is None:
                return False
            if first.dim() > 0 and first.shape[0] == n:
                found.append(factor / n if reduction == 1 else factor)
            return True
        if kind in ("MeanBackward0", "MeanBackward1", "SumBackward0", "SumBackward1"):
            sizes = tuple(node._saved_self_sym_sizes)
            dims = getattr(node, "_saved_dim", None)
            if not sizes or sizes[0] != n:
                return True  # no batch axis here: a term of another kind (a penalty on the parameters)
            if dims is not None and 0 not in [d % len(sizes) for d in dims]:
                return False  # a per-sample reduction first: the batch is reduced further up, unseen
            found.append(factor / n if kind.startswith("Mean") else factor)
            return True
        return False

    if loss.grad_fn is None or loss.numel() != 1 or not walk(loss.grad_fn, 1.0, 0):
        return None
    return found


def reduction_mismatch(weights: Sequence[float], loss_scale: float, n: int, loss_reduction: str) -> Optional[str]:
    """Why ``loss_reduction`` does not describe a loss whose batch terms weigh each sample by ``weights``
    (:func:`batch_weights`), carried into backward with ``loss_scale``: no term weighs it as the setting says
    (``1/n`` under ``"mean"``, 1 under ``"sum"``) while one weighs it exactly as the other reduction would; ``None``
    otherwise (other weights are a per-sample loss's scale)."""
    if n < 2 or not weights:
        return None
    ws = [w / loss_scale for w in weights]
    mean = any(abs(w * n - 1) <= 1e-6 for w in ws)
    total = any(abs(w - 1) <= 1e-6 for w in ws)
    if loss_reduction == "mean" and total and not mean:
        return (f"the loss sums the per-sample losses over the batch (each weighs 1, N = {n}) while "
                "loss_reduction='mean': set loss_reduction='sum'")
    if loss_reduction == "sum" and mean and not total:
        return (f"the loss averages the per-sample losses over the batch (each weighs 1/N, N = {n}) while "
                "loss_reduction='sum': set loss_reduction='mean'")
    return None


def failures(factors: Dict[str, Any]) -> Dict[str, str]:
    """Identities 1 and 2 over the layers with ``factors`` (their ``identity`` terms, :meth:`LayerCurvature.check_sums`),
    read back at once: each failing layer's name and why."""
    named = {name: f for name, f in factors.items() if f is not None and f.identity is not None}
    if not named:
        return {}
    terms = [f.identity for f in named.values()]
    flat = torch.cat([t.to(terms[0].device) for t in terms]).tolist()  # one read
    rows, start = {}, 0
    for name, t in zip(named, terms):
        rows[name], start = flat[start:start + t.numel()], start + t.numel()
    failed: Dict[str, str] = {}
    for name, f in named.items():
        if not f.direct:
            mismatch = sum_mismatch(rows[name], f.eps)
            if mismatch is not None:
                failed[name] = (f"its per-sample gradients do not sum to the gradient its backward produced "
                                f"(relative difference {mismatch:.2g}); likely {SUM_CAUSES}")
    direct = {name: rows[name] for name, f in named.items() if f.direct}
    failed.update(judge_direct(direct, {name: named[name].eps for name in direct}))
    return failed


def resolves(dtype: torch.dtype, trace: float, damping: float) -> bool:
    """Whether ``dtype`` resolves ``(K + λI)^{-1}``: ``ε·(tr K + λ)/λ ≤`` :data:`RESOLVABLE` (``tr K + λ`` bounds
    the largest eigenvalue; the solve, and the cancellation in ``g − Uᵀw``, lose ``ε·cond``). A non-finite trace
    passes: its factorisation fails and says so."""
    return not math.isfinite(trace) or torch.finfo(dtype).eps * (trace + damping) / damping <= RESOLVABLE
