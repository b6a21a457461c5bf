"""The runtime identities that make a layer's SENG direction exact (DESIGN.md §6).

Pattern checks cannot foresee every usage: a hook on a weight, a second path to a parameter (the weight used
outside the module, attention weights or an input-gradient penalty in the loss), a recurrent cell whose calls
feed each other. So on every refresh step SENG checks, per layer, what exactness means:

1. **The per-sample gradients sum to the gradient the backward produced.** ``Σ_n J_n = g_prod``, where
   ``J_n`` is what the layer built from its captured calls and ``g_prod`` the gradient that reached each
   parameter's accumulator in this step's last backward (after any hook on the parameter; summed over the
   passes through one forward), within ``τ·M``: ``M`` bounds the magnitudes summed (the norms of the rank-one
   terms, or of the per-sample gradients) and ``τ`` follows the coarsest precision that took part
   (:func:`tolerance`).
2. **``.grad`` is that gradient** when ``.grad`` held nothing before the backward: ``.grad = c·g_prod/s`` (``s``
   the loss scale) with one ``c`` for all layers. A common ``c = 2^k`` (``k ≠ 0``) is a loss scale SENG was
   not told of (AMP's); another common ``c ≠ 1`` is a rescaling of the whole gradient (clipping by norm), which the direction ``(F + λI)^{-1}·.grad`` serves exactly (``F`` comes from the
   backward, whatever ``.grad`` is scaled by); a ``c`` of one layer alone, or a change that is no rescaling, is
   a change to that layer's gradient after the backward (a post-accumulate-grad hook, clipping by value).

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
    one's accumulator (a pre-hook on the ``AccumulateGrad`` node: after any hook registered on the parameter),
    copied (a later in-place change of ``.grad`` must not reach it) and summed over the passes through one
    forward (``retain_graph``); and whether ``.grad`` held nothing before the last of them.

    The nodes are held while watching, so that every graph built until the refresh feeds the same hooked node.
    """

    def __init__(self) -> None:
        self._handles: List[Tuple[nn.Parameter, object, object]] = []  # (parameter, node, hook handle)
        self.produced: Dict[int, Tensor] = {}
        self.into_empty: Dict[int, bool] = {}

    def __deepcopy__(self, memo: dict) -> "GradientWatch":
        return GradientWatch()  # a copy watches nothing: the hooks belong to this object's parameters

    def __getstate__(self) -> dict:
        return GradientWatch().__dict__

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def start(self, params: Sequence[nn.Parameter]) -> None:
        """Watch ``params`` (those that require grad) until :meth:`stop`; nothing if already watching."""
        if self._handles:
            return
        for p in params:
            if p.requires_grad and not isinstance(p, nn.parameter.UninitializedParameter):
                node = torch.autograd.graph.get_gradient_edge(p).node
                self._handles.append((p, node, node.register_prehook(self._keeper(p))))

    def _keeper(self, p: nn.Parameter) -> Callable:
        def keep(grads: Tuple[Optional[Tensor], ...]) -> None:
            grad = grads[0]
            if grad is None:
                return
            old = self.produced.get(id(p))
            self.produced[id(p)] = grad.detach().clone() if old is None else old + grad.detach()
            self.into_empty[id(p)] = p.grad is None
        return keep

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


def scale_terms(pairs: List[Tuple[Tensor, Tensor]], loss_scale: float) -> Tensor:
    """For one layer's ``(.grad, g_prod)`` pairs, with ``g = g_prod / loss_scale``: ``[<.grad, g>, <g, g>,
    <.grad, .grad>, ‖.grad − g‖²]``, float64 on the device, each taken in the gradient's own dtype."""
    rows = []
    for a, b in pairs:
        a, b = a.reshape(-1), b.reshape(-1).to(a.dtype)
        rows.append(torch.stack([torch.vdot(a, b) / loss_scale, (torch.linalg.vector_norm(b) / loss_scale) ** 2,
                                 torch.linalg.vector_norm(a) ** 2,
                                 torch.linalg.vector_norm(a - b / loss_scale) ** 2]).to(torch.float64))
    return torch.stack(rows).sum(0)


def judge_scales(terms: Dict[str, Sequence[float]], eps: float) -> Tuple[float, Dict[str, str]]:
    """Identity 2 over the layers whose ``.grad`` held nothing before the backward: ``terms`` maps each to
    :func:`scale_terms` read back. Returns the common scale ``c`` (1 when no layer tells) and, per failing
    layer, why. ``.grad − c·g`` is measured directly for ``c = 1``; for another ``c`` through
    ``‖.grad‖² − c<.grad, g>``, which resolves residuals down to about ``√ε``."""
    tol = tolerance(eps)
    scales: Dict[str, float] = {}
    failed: Dict[str, str] = {}
    for name, (dot, gg, aa, dd) in terms.items():
        if dd <= tol * tol * aa:
            scales[name] = 1.0
            continue
        c = dot / gg if gg > 0 else math.inf
        rest = math.sqrt(max(aa - c * dot, 0.0) / aa) if aa > 0 and math.isfinite(c) else 1.0
        if not math.isfinite(c) or c <= 0 or rest > max(tol, 8 * math.sqrt(eps)):
            failed[name] = ("its .grad is not the gradient its backward produced, nor a rescaling of it "
                            f"(residual {rest:.2g}): .grad was changed between backward and step (a "
                            "post-accumulate-grad hook, gradient clipping by value, an edit of .grad)")
        else:
            scales[name] = c
    if not scales:
        return 1.0, failed
    common = sorted(scales.values())[len(scales) // 2]
    for name, c in scales.items():
        if abs(c - common) > max(tol, 8 * math.sqrt(eps)) * abs(common):
            failed[name] = (f"its .grad is {c:.4g} times the gradient its backward produced while the other "
                            f"layers' are {common:.4g} times theirs: this parameter's gradient was rescaled alone "
                            "after the backward (a post-accumulate-grad hook, an edit of .grad)")
    k = round(math.log2(common)) if common > 0 else 0
    if k != 0 and abs(common / 2.0 ** k - 1) <= tol:
        for name in scales:
            failed.setdefault(name, f"every .grad is 2^{k} times the gradient its backward produced over the loss "
                                    "scale: an AMP loss scale (or another power-of-two factor on the loss) that did "
                                    "not reach SENG; pass it as seng.step(loss_scale=...)")
    return common, failed


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


def failures(layers: Dict[str, Any], factors: Dict[str, Any], loss_scale: float, one_process: bool,
             eps: float) -> Dict[str, str]:
    """Identities 1 and 2 over the layers with ``factors``, read back at once: each failing layer's name and why.
    Identity 2 is checked (``one_process``) where ``.grad`` held nothing before the backward; ``eps`` is the
    curvature dtype's roundoff (a floor under the layers' own)."""
    sums = {name: f for name, f in factors.items() if f is not None and f.identity is not None}
    scales = {}
    if one_process:
        for name, f in factors.items():
            if f is None:
                continue
            watch = layers[name].watch
            params = layers[name].trainable_params(f.mask)
            if params and all(watch.into_empty.get(id(p), False) and p.grad is not None and not p.grad.is_sparse
                              for p in params):
                scales[name] = scale_terms([(p.grad, watch.produced[id(p)]) for p in params], loss_scale)
    if not sums and not scales:
        return {}
    terms = [f.identity for f in sums.values()] + list(scales.values())
    values = torch.cat([t.to(terms[0].device) for t in terms]).tolist()  # one read
    split = 3 * len(sums)
    failed: Dict[str, str] = {}
    for i, (name, f) in enumerate(sums.items()):
        mismatch = sum_mismatch(values[3 * i:3 * i + 3], f.eps)
        if mismatch is not None:
            failed[name] = (f"its per-sample gradients do not sum to the gradient its backward produced "
                            f"(relative difference {mismatch:.2g}); likely {SUM_CAUSES}")
    rows = {name: values[split + 4 * i:split + 4 * i + 4] for i, name in enumerate(scales)}
    _, changed = judge_scales(rows, max([f.eps for f in sums.values()] + [eps]))
    for name, why in changed.items():
        failed.setdefault(name, why)
    return failed


def resolves(dtype: torch.dtype, trace: float, damping: float) -> bool:
    """Whether ``dtype`` resolves ``(K + λI)^{-1}``: ``ε·(tr K + λ)/λ ≤`` :data:`RESOLVABLE` (``tr K + λ`` bounds
    the largest eigenvalue; the solve, and the cancellation in ``g − Uᵀw``, lose ``ε·cond``). A non-finite trace
    passes: its factorisation fails and says so."""
    return not math.isfinite(trace) or torch.finfo(dtype).eps * (trace + damping) / damping <= RESOLVABLE
