"""What every layer kind shares: hook capture, the damped solve and the committed curvature.

A layer kind supplies three things (STYLE.md): how to turn captured calls into per-sample factors
(``_factors``), how to build a route from scaled factors (``_route``), and how its parameter
gradients map to and from the route's shapes (``grad_parts`` / ``to_params``). This base class does the
SENG direction for all of them:

    d = (1/λ) · ( g − Uᵀ (λI_N + UUᵀ)^{-1} U g ),

with the ``N×N`` system solved by a Cholesky factor that is refreshed with the curvature.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .. import sketch
from ..axes import ProbedAxes
from .identity import GradientWatch, direct_terms, sum_terms
from .routes import Route, RouteSettings, build_route, route_costs, route_from_state

Mask = Tuple[bool, ...]
Pick = Optional[Callable[[int], Optional[Tuple[Tensor, float]]]]
_UNSEEN = object()  # the probe saw no tensor of this shape


class NotExact(Exception):
    """This layer's curvature cannot be computed exactly from this batch (the message says why). SENG
    announces it at WARNING level and gives the layer's parameters ``g / (1 + λ)`` until a refresh succeeds."""


def find_sample_axis(shape: Sequence[int], n: int, candidates: Sequence[int], what: str,
                     probed: Optional[ProbedAxes] = None) -> int:
    """The sample axis among ``candidates`` of a tensor of ``shape`` in a batch of ``n`` samples.

    Where the structural probe (:mod:`lightning_seng.axes`) saw a tensor of this shape, its answer: the axis
    that held the resized batch, whatever the sizes of the others (batch 8 into ``(8, 8, d)`` is exact). Else
    the size rule: the one axis among ``candidates`` of size ``n``. :class:`NotExact` if the probe found no
    sample axis, several or a flattened one, or one outside ``candidates``; by the size rule, if there is no
    axis of size ``n`` (the layer saw flattened or partial batches) or several (the layout is ambiguous).
    """
    found = probed.shapes.get(tuple(shape), _UNSEEN) if probed is not None else _UNSEEN
    if isinstance(found, int) and found in candidates:
        return found
    if found is not _UNSEEN:
        where = {None: "no axis", "ambiguous": "several axes", "merged": "no axis of its own"}.get(found)
        raise NotExact(f"its {what} of shape {tuple(shape)} holds the samples on " +
                       (f"axis {found}, where its layout has none" if where is None else
                        f"{where} (found by resizing the batch in a shape-only forward of the model)") +
                       ", so its per-sample gradients are unknown")
    axes = [i for i in candidates if shape[i] == n]
    if len(axes) == 1:
        return axes[0]
    unprobed = f" ({probed.why_not})" if probed is not None and probed.why_not else ""
    if not axes:
        raise NotExact(f"its {what} of shape {tuple(shape)} has no axis of the batch size {n} (a flattened, "
                       "partial or unbatched input, or a batch size read from the wrong axis of the model's "
                       f"input: see batch_axis), so its per-sample gradients are unknown{unprobed}")
    raise NotExact(f"its {what} of shape {tuple(shape)} has several axes of the batch size {n} (axes {axes}), "
                   "so the sample axis is ambiguous, and the structural probe of the sample axes gave no "
                   f"answer{unprobed or ' for this shape'}")


def roundoff(tensors: List[Tensor]) -> float:
    """ε of the coarsest precision a forward on ``tensors`` (its inputs and outputs) may have computed in:
    their floating dtypes, autocast's, and on CUDA TF32 (10 mantissa bits) or bf16 products of float32
    operands as torch's matmul precision and cuDNN's TF32 switch allow."""
    floating = [t for t in tensors if t.is_floating_point()]
    eps = max((torch.finfo(t.dtype).eps for t in floating), default=torch.finfo(torch.float64).eps)
    device = floating[0].device.type if floating else "cpu"
    if hasattr(torch, "get_autocast_dtype") and torch.is_autocast_enabled(device):  # torch >= 2.4
        eps = max(eps, torch.finfo(torch.get_autocast_dtype(device)).eps)
    if device == "cuda" and any(t.dtype == torch.float32 for t in floating):
        precision = torch.get_float32_matmul_precision()
        if precision == "medium":
            eps = max(eps, torch.finfo(torch.bfloat16).eps)
        elif precision == "high" or torch.backends.cudnn.allow_tf32:
            eps = max(eps, 2.0 ** -10)
    return eps


@dataclass
class Call:
    """One captured forward call: what the layer keeps of its inputs, and the gradient of the loss with
    respect to each tensor output (summed over backward passes; ``None`` until one arrives). With
    ``fisher="mc"``, ``sampled`` holds the gradient of the sampled loss with respect to each output (its own
    backward, to the outputs only), ``None`` until it arrives (and for an output it does not reach)."""

    inputs: Any
    grads: List[Optional[Tensor]]
    sampled: Optional[List[Optional[Tensor]]] = None

    @property
    def done(self) -> bool:
        return any(g is not None for g in self.grads)


class GradKeeper:
    """Hook on one output tensor of a captured call: keeps the gradient that reaches it in ``call.grads[index]``.

    It is the only strong reference to a call that has no gradient yet: autograd holds it (through the output
    tensor and its graph node) exactly as long as the graph that could still deliver that gradient. A call
    whose graph is freed without a backward (a forward whose loss was dropped, a metric computed with grad
    enabled) therefore disappears with it. The first gradient moves the call into the layer's strong list of
    calls to take; a layer cleared since the capture (``generation`` moved on) ignores it.
    """

    __slots__ = ("layer", "call", "index", "generation")

    def __init__(self, layer: "LayerCurvature", call: Call, index: int):
        self.layer, self.call, self.index, self.generation = layer, call, index, layer._generation

    def __call__(self, grad: Tensor) -> None:
        call, layer = self.call, self.layer
        if layer.sampling:  # the backward of the sampled loss (fisher="mc"): its own slot, the call stays pending
            if call.sampled is None:
                call.sampled = [None] * len(call.grads)
            old = call.sampled[self.index]
            call.sampled[self.index] = grad.detach() if old is None else old + grad.detach()
            return
        fresh = not call.done
        # Several backward passes through one forward (retain_graph) add up, as .grad does.
        old = call.grads[self.index]
        call.grads[self.index] = grad.detach() if old is None else old + grad.detach()
        if fresh and layer._generation == self.generation:
            layer._held.append(call)


@dataclass
class Factors:
    """Per-sample factors of one layer for one refresh, batch first.

    ``grad_side`` is the output-grad side (already divided by the loss scale); the per-sample gradient
    is bilinear in ``(grad_side[n], input_side[n])``, so rescaling ``grad_side`` rescales it. Norm layers
    keep the per-sample gradient itself in ``grad_side`` (``(N, d)``) and have no ``input_side``.
    """

    grad_side: Tensor
    input_side: Optional[Tensor]
    mask: Mask = field(default=())
    # the runtime identity Σ_n J_n = g_prod (layers/identity.py): sum_terms on the device, and the unit roundoff
    # of the coarsest precision that took part; None where the layer checks its own uses (Embedding)
    identity: Optional[Tensor] = None
    eps: float = 0.0
    direct: bool = False  # identity terms against .grad (both identities at once), else against g_prod
    # ``(grad_side, J)``: the per-sample gradients ``J (N, d)`` a layer built from ``grad_side`` for the identity's
    # ``Σ_n J_n``, which its explicit route may take over (scaled in place) instead of building them again; valid
    # only while ``grad_side`` is still that tensor
    per_sample: Optional[Tuple[Tensor, Tensor]] = None

    def to(self, dtype: torch.dtype) -> "Factors":
        """The factors in ``dtype`` (floating tensors only)."""
        input_side = self.input_side
        if input_side is not None and input_side.is_floating_point():
            input_side = input_side.to(dtype)
        return Factors(self.grad_side.to(dtype), input_side, self.mask, self.identity, self.eps, self.direct)

    def _kept_rows(self) -> Optional[Tensor]:
        """``J`` of :attr:`per_sample` while it belongs to ``grad_side``, else ``None``."""
        kept = self.per_sample
        return kept[1] if kept is not None and kept[0] is self.grad_side else None

    def rows(self, rows: Tensor, factor: float) -> "Factors":
        """Samples ``rows`` only, the output-gradient side times ``factor`` (the per-sample gradient is linear in it)."""
        rows = rows.to(self.grad_side.device)
        input_side = None if self.input_side is None else self.input_side.index_select(0, rows)
        grad_side, J = self.grad_side.index_select(0, rows) * factor, self._kept_rows()
        return Factors(grad_side, input_side, self.mask, self.identity, self.eps, self.direct,
                       None if J is None else (grad_side, J.index_select(0, rows).mul_(factor)))

    def unscaled(self, loss_scale: float) -> "Factors":
        """The factors of the loss before it was scaled by ``loss_scale``: the output-gradient side over it."""
        grad_side, J = self.grad_side / loss_scale, self._kept_rows()
        return Factors(grad_side, self.input_side, self.mask, self.identity, self.eps, self.direct,
                       None if J is None else (grad_side, J.div_(loss_scale)))

    @property
    def n(self) -> int:
        return self.grad_side.shape[0]


@dataclass
class Curvature:
    """A committed refresh: the route, ``K = UUᵀ``, the Cholesky factor of ``K + λI`` and ``λ``; under a damping
    schedule also ``K = Q diag(e) Qᵀ`` (``eigen = (Q, e)``), so that a step with another ``λ`` solves
    ``(K + λI)^{-1} b = Q (Qᵀ b / (e + λ))`` without a new factorisation (or a host read)."""

    route: Route
    gram: Tensor
    chol: Tensor
    damping: float
    mask: Mask
    eigen: Optional[Tuple[Tensor, Tensor]] = None

    scale: float = 1.0  # the layer's λ is the preconditioner's times this (relative damping: tr(K)/N)
    inverse: Optional[Tensor] = None  # (K + λI)^{-1}, formed from ``chol`` on the first step after the refresh
    fresh: bool = True  # built on this step (not saved: a restored curvature is never fresh)

    @property
    def nbytes(self) -> int:
        """Bytes this curvature keeps between refreshes: the route's tensors (and any cache), ``K``, its
        Cholesky factor and inverse and, under a damping schedule, its eigendecomposition."""
        extra = [] if self.eigen is None else list(self.eigen)
        if self.inverse is not None:
            extra.append(self.inverse)
        return self.route.nbytes + self.gram.nbytes + self.chol.nbytes + sum(t.nbytes for t in extra)

    def solve(self, u: Tensor, damping: float) -> Optional[Tensor]:
        """``(K + λI)^{-1} u``, ``(N,)``: on the refresh step, triangular solves with the Cholesky factor; on
        the steps after it, one matrix-vector product with the inverse, formed once from that factor (with
        ``update_freq=1`` it never is); the eigendecomposition for another ``λ`` (damping schedules); else a new
        factorisation (``None`` if it fails)."""
        if damping != self.damping:
            if self.eigen is not None:
                return sketch.eigen_solve_vec(*self.eigen, damping, u)
            chol = sketch.damped_cholesky(self.gram, damping)
            if chol is None:
                return None
            self.chol, self.damping, self.inverse = chol, damping, None
        if self.inverse is None:
            if self.fresh:
                return sketch.cholesky_solve_vec(self.chol, u)
            self.inverse = torch.cholesky_inverse(self.chol)
        return self.inverse @ u

    def state_dict(self) -> dict:
        state = {"route": self.route.state_dict(), "gram": self.gram, "chol": self.chol,
                 "damping": self.damping, "mask": list(self.mask), "scale": self.scale}
        if self.eigen is not None:
            state["eigen"] = {"vectors": self.eigen[0], "values": self.eigen[1]}
        return state

    @classmethod
    def from_state(cls, state: dict) -> "Curvature":
        eigen = state.get("eigen")
        return cls(route_from_state(state["route"]), state["gram"], state["chol"], float(state["damping"]),
                   tuple(bool(m) for m in state["mask"]),
                   None if eigen is None else (eigen["vectors"], eigen["values"]),
                   scale=float(state.get("scale", 1.0)), fresh=False)


def not_reached() -> NotExact:
    """Why a layer has no Monte-Carlo rows: the sampled loss's backward did not reach its calls."""
    return NotExact("its output did not reach the sampled loss (fisher='mc'): it is computed after the output "
                    "module or outside what that module's output depends on, or the output module did not run on "
                    "this refresh step")


def sampled_grads(call: Call) -> List[Optional[Tensor]]:
    """The sampled loss's gradient for each output of ``call`` (zeros where it did not reach an output the
    backward reached); :class:`NotExact` if it reached none (see :meth:`LayerCurvature.sampled_calls`)."""
    if call.sampled is None or all(s is None for s in call.sampled):
        raise not_reached()
    return [s if s is not None or g is None else torch.zeros_like(g) for s, g in zip(call.sampled, call.grads)]


def sample_scale(n: int, loss_reduction: str) -> float:
    """Factor from a hook's per-sample gradient ``J_n`` to the row of ``U``: ``√N`` for a mean-reduced
    loss (``J_n = ∇ℓ_n / N``), ``1/√N`` for a sum-reduced one (``J_n = ∇ℓ_n``)."""
    return math.sqrt(n) if loss_reduction == "mean" else 1.0 / math.sqrt(n)


class LayerCurvature:
    """One supported module: capture by hooks, curvature refresh, preconditioned direction."""

    kind = ""
    # the sample axes the preconditioner's structural probe found for this refresh (None: not probed)
    probed: Optional[ProbedAxes] = None
    # fisher="mc": U from the sampled loss's output gradients (Call.sampled), the runtime identities on the user's
    sampled_fisher = False
    # while the sampled loss's backward runs: the output gradients that reach the calls go to Call.sampled
    sampling = False
    # the runtime identity is checked on the captured calls themselves, not on the factors (factor_sums is None)
    checks_own_uses = False
    # the preconditioner's route settings where this layer builds its curvature from the factors it checks (one
    # process, or DDP's local mode): then it may build an explicit route's per-sample gradients once, for the
    # identity's sum and the route (Factors.per_sample); None: never
    route_settings: Optional[RouteSettings] = None

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module
        self.curvature: Optional[Curvature] = None
        self.excluded: set = set()  # ids of parameters left to the fallback (e.g. shared with other modules)
        # Layers of submodules whose forward never runs but whose calls this layer's capture computes
        # (MultiheadAttention's out_proj); build_layers gives them these layers and keeps only those admitted.
        self.feeds: List["LayerCurvature"] = []
        # Captured calls in capture order, held weakly: a call's strong references are its GradKeepers until a
        # gradient reaches it, then ``_held`` (see GradKeeper). ``_generation`` counts clears.
        self._refs: List["weakref.ref[Call]"] = []
        self._held: List[Call] = []
        self._generation = 0
        self.captured = False  # whether a forward call was ever captured (its hooks fire)
        self.watch = GradientWatch()  # what the backward of a refresh step produces for the parameters
        # the parameter in each slot when SENG was attached (weakly); None until note_attached
        self._attached_slots: Optional[List[Optional["weakref.ref[nn.Parameter]"]]] = None
        self._attached_shared: List[tuple] = []

    # ----------------------------------------------------------------- parameters
    def param_slots(self) -> Sequence[Optional[nn.Parameter]]:
        """The layer's parameters in matrix order (e.g. ``(weight, bias)``); ``None`` where absent."""
        return (getattr(self.module, "weight", None), getattr(self.module, "bias", None))

    # A slot whose parameter is not the one it held when SENG was attached (``module.weight = nn.Parameter(...)``,
    # a bias added later) is no longer this layer's: SENG gives that parameter g / (1 + λ), as any parameter
    # added after attach. With ``keeps_others_when_replaced`` the layer goes on with its other slots exactly as
    # with a frozen parameter (a new mask, so curvature from its next refresh on); otherwise it falls back whole.
    keeps_others_when_replaced = True

    def note_attached(self) -> None:
        """Remember the parameter in each slot now (SENG calls this when it attaches); for a layer over several
        modules sharing a weight (and bias), each module's ``weight`` and ``bias`` too: the slots read one of them."""
        self._attached_slots = [None if p is None else weakref.ref(p) for p in self.param_slots()]
        modules = self.modules()
        self._attached_shared = [] if len(modules) == 1 else [
            (m, key, None if getattr(m, key, None) is None else weakref.ref(getattr(m, key)))
            for m in modules for key in ("weight", "bias")]

    def replaced_slots(self) -> List[int]:
        """Indices of the slots holding a parameter other than the one noted at attach (none before that); for
        shared modules, slot 0 (1) when any module's weight (bias) changed."""
        refs = self._attached_slots
        if refs is None:
            return []
        out = [i for i, (p, ref) in enumerate(zip(self.param_slots(), refs))
               if p is not None and (ref is None or ref() is not p)]
        for m, key, ref in self._attached_shared:
            now = getattr(m, key, None)
            index = 0 if key == "weight" else 1
            if (now is not (None if ref is None else ref())) and index not in out:
                out.append(index)
        return sorted(out)

    def falls_back_whole(self) -> bool:
        """Whether a replaced parameter leaves this layer without exact curvature for its others."""
        return not self.keeps_others_when_replaced and bool(self.replaced_slots())

    def _is_attached(self, index: int, p: nn.Parameter) -> bool:
        refs = self._attached_slots
        return refs is None or (refs[index] is not None and refs[index]() is p)

    def trainable(self) -> Mask:
        return tuple(p is not None and p.requires_grad and id(p) not in self.excluded and self._is_attached(i, p)
                     for i, p in enumerate(self.param_slots()))

    def parameters(self) -> List[nn.Parameter]:
        """The parameters this layer preconditions (those of its slots not excluded nor replaced since attach)."""
        return [p for i, p in enumerate(self.param_slots())
                if p is not None and id(p) not in self.excluded and self._is_attached(i, p)]

    def modules(self) -> List[nn.Module]:
        """The modules whose calls this layer captures (forward hooks go on them)."""
        return [self.module]

    # ----------------------------------------------------------------- capture
    def before_call(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        """Forward pre-hook body, registered only for layers that override it: note what a call's result
        depends on beyond its inputs (the random state its dropout draws from)."""

    def keep(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        """What to keep of a call's inputs (detached); ``None`` skips the call. Default: the first argument."""
        return args[0].detach() if args and isinstance(args[0], Tensor) else None

    def output_tensors(self, output: Any) -> List[Tensor]:
        """The outputs whose gradients the layer needs. Default: the output, which must be one tensor."""
        return [output] if isinstance(output, Tensor) else []

    def capture(self, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> List[Any]:
        """Forward hook body: keep the inputs, and hook the outputs for their gradients. Returns the gradient
        edges of the hooked outputs (empty when nothing was captured): where the sampled loss's backward must
        reach (``fisher="mc"``), taken now, before any in-place operation on an output moves its edge.

        Calls before any backward accumulate (a module used twice in one forward); a forward after a
        completed backward (the next micro-batch) starts afresh, so the last micro-batch wins. Output
        gradients of several backward passes through one forward (``retain_graph=True``) are summed.
        A call is held only as long as its autograd graph can still send it a gradient (:class:`GradKeeper`).
        """
        outputs = [t for t in self.output_tensors(output) if t.requires_grad]
        if not outputs:
            return []
        inputs = self.keep(args, kwargs)
        if inputs is None:
            return []
        self.captured = True
        live = self._calls
        if live and all(c.done for c in live):
            self.clear()
            for layer in [self] + self.feeds:
                layer.watch.reset()
        else:  # forget the calls whose graphs are gone
            self._refs = [weakref.ref(c) for c in live]
        call = Call(inputs, [None] * len(outputs))
        self._refs.append(weakref.ref(call))
        for index, out in enumerate(outputs):
            out.register_hook(GradKeeper(self, call, index))
        return [torch.autograd.graph.get_gradient_edge(out) for out in outputs] if self.sampled_fisher else []

    @property
    def _calls(self) -> List[Call]:
        """The captured calls still alive (with a gradient, or whose graph can still send one), in capture order."""
        return [c for c in (ref() for ref in self._refs) if c is not None]

    def clear(self) -> None:
        self._refs, self._held = [], []
        self._generation += 1

    def take_calls(self) -> List[Call]:
        """The captured calls that received a gradient; clears the capture."""
        calls = [c for c in self._calls if c.done]
        self.clear()
        return calls

    def watch_gradients(self, direct: bool) -> None:
        """Refresh step, from the first captured call: watch what the backward produces for the trainable
        parameters (:class:`~lightning_seng.layers.identity.GradientWatch`; ``direct``: compare with ``.grad`` where
        it held nothing, as in one process), and for the layers it feeds."""
        self.watch.start(self.trainable_params(self.trainable()), direct)
        for sub in self.feeds:
            sub.watch_gradients(direct)

    def take_trainable_calls(self, n: Optional[int]) -> Optional[Tuple[List[Call], Mask]]:
        """The captured calls that received a gradient and the trainable mask (clears the capture); ``None``
        when there is nothing to refresh; :class:`NotExact` when the batch size ``n`` is unknown."""
        calls = self.take_calls()
        mask = self.trainable()
        if calls and self.falls_back_whole():
            raise NotExact("a parameter it shares between modules was replaced after SENG was attached "
                           f"(slot(s) {self.replaced_slots()}), so its other parameters have no exact curvature")
        if not calls or not any(mask):
            return None
        if n is None:
            raise NotExact("the batch size of this step is unknown (the model's forward was not called; "
                           "see SENG's batch_axis setting)")
        return calls, mask

    def take_factors(self, loss_scale: float, dtype: torch.dtype, pick: Pick = None,
                     n: Optional[int] = None) -> Optional[Factors]:
        """Per-sample factors of the captured calls (in ``dtype``, batch first); clears the capture.

        ``n`` is the batch size of this refresh (learnt from the model's input); each call's sample axis
        is the one axis of that size where the layer's layout allows it, else :class:`NotExact`.
        ``pick(N)`` may return ``(rows, factor)``: keep those samples only, output gradients times ``factor``.
        Returns ``None`` when the layer took no part in this step's loss or has nothing trainable.
        """
        taken = self.take_trainable_calls(n)
        if taken is None:
            return None
        calls, mask = taken
        eps = roundoff([t for call in calls for t in pytree.tree_leaves((call.inputs, call.grads))
                        if isinstance(t, Tensor)] + [torch.empty(0, dtype=dtype)])
        if self.sampled_fisher:
            # the runtime identities on the factors of the user's backward (they check that the per-sample
            # decomposition is exact for this usage); U from the sampled loss's output gradients, through the same
            # decomposition. The sampled loss carried no loss scale.
            checked = Factors(torch.empty(0), None)
            if not self.checks_own_uses:
                checked = self._factors([self.sample_first(call, n, dtype) for call in calls], mask)
                checked.mask = mask
                self.check_sums(checked, eps, loss_scale)
            factors = self._factors([self.sample_first(call, n, dtype) for call in self.sampled_calls(calls)], mask)
            factors.mask, factors.identity, factors.eps, factors.direct = mask, checked.identity, checked.eps, checked.direct
            scale = 1.0
        else:
            pairs = [self.sample_first(call, n, dtype) for call in calls]
            factors = self._factors(pairs, mask)
            factors.mask = mask
            self.check_sums(factors, eps, loss_scale)  # on all samples: the identity holds for the whole batch
            scale = loss_scale
        chosen = pick(n) if pick is not None else None
        if chosen is not None:
            factors = factors.rows(*chosen)
        if scale != 1.0:
            factors = factors.unscaled(scale)
        return factors

    def sampled_calls(self, calls: List[Call]) -> List[Call]:
        """``fisher="mc"``: the calls with the sampled loss's output gradients in place of the backward's (zero for an
        output the sampled loss did not reach while others of the call it did); :class:`NotExact` for a call the
        sampled loss did not reach at all."""
        return [type(call)(call.inputs, sampled_grads(call)) for call in calls]

    def check_sums(self, factors: Factors, eps: float, loss_scale: float) -> None:
        """Put on ``factors`` the terms of the runtime identities (:mod:`.identity`) for the preconditioner to read
        with the other layers': against ``.grad`` where it held nothing before the backward, else against the
        copied ``g_prod``; :class:`NotExact` if a trainable parameter received no gradient."""
        sums = self.factor_sums(factors)
        if sums is None:
            return
        parts, magnitude = sums
        params = self.trainable_params(factors.mask)
        targets = [self.watch.target(p) for p in params]
        if any(t is None for t in targets):
            raise NotExact(f"{sum(t is None for t in targets)} of its trainable parameters received no gradient from "
                           "the backward its calls took part in (is the module's output used without its parameters, "
                           "or were they replaced after SENG was attached?)")
        direct = [bool(self.watch.into_empty.get(id(p))) for p in params]
        targets = [t.to_dense() if t.is_sparse else t for t in targets]
        eps = max(eps, roundoff(targets))  # the backward computed in the parameters' precision
        # (reshaped: a layer may lay out its parts by the committed route, e.g. attention's q, k, v groups)
        targets = [t.reshape(s.shape) for t, s in zip(self.parts_of(targets, factors.mask, parts[0].dtype), parts)]
        if all(direct):
            factors.identity = direct_terms([s / loss_scale for s in parts], targets, magnitude / loss_scale)
        else:  # .grad over the loss scale where it is this forward's gradient, g_prod where it was copied
            targets = [t * loss_scale if d else t for t, d in zip(targets, direct)]
            factors.identity = sum_terms(parts, targets, magnitude)
        factors.eps, factors.direct = eps, all(direct)

    def factor_sums(self, factors: Factors) -> Optional[Tuple[List[Tensor], Tensor]]:
        """``(Σ_n J_n in the route's parts, M)`` of the factors (before any sample is dropped, unscaled), ``M`` a
        bound on the magnitudes summed; ``None`` where the layer checks its own uses. Default: ``J`` explicit,
        ``grad_side (N, d)`` with the trainable parameters' blocks in order, ``M = Σ_n ‖J_n‖``."""
        J = factors.grad_side
        sums = J.sum(0).split([p.numel() for p in self.trainable_params(factors.mask)])
        return list(sums), J.norm(dim=1).sum()

    def sample_axes(self, x: Tensor) -> Sequence[int]:
        """The axes of the input that may hold the samples (the layer's layout decides)."""
        return (0,)

    def sample_first(self, call: Call, n: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """``(input, output grad)`` of one call with the sample axis first, in ``dtype``."""
        x, g = call.inputs, call.grads[0]
        axis = find_sample_axis(x.shape, n, self.sample_axes(x), "input", self.probed)
        return x.movedim(axis, 0).to(dtype), g.movedim(axis, 0).to(dtype)

    def _factors(self, calls: List[Tuple[Tensor, Tensor]], mask: Mask) -> Factors:
        raise NotImplementedError

    # ----------------------------------------------------------------- curvature
    def _route(self, factors: Factors, scale: float, settings: RouteSettings, generator) -> Route:
        raise NotImplementedError

    def prepare(self, factors: Factors, loss_reduction: str, settings: RouteSettings,
                generator: Optional[torch.Generator]) -> Tuple[Route, Tensor]:
        """The route built from ``factors`` and its ``UUᵀ`` ``(N, N)``, not yet factorised: the preconditioner
        factorises the Gram matrices of all layers together (:func:`~lightning_seng.sketch.damped_cholesky_batch`)."""
        route = self._route(factors, sample_scale(factors.n, loss_reduction), settings, generator)
        return route, route.gram(generator)

    def build(self, factors: Factors, damping: float, loss_reduction: str, settings: RouteSettings,
              generator: Optional[torch.Generator]) -> Optional[Curvature]:
        """A new curvature from ``factors`` (not yet committed); ``None`` if ``UUᵀ`` is not finite (a NaN or
        Inf anywhere in the factors reaches it) or cannot be factorised."""
        route, gram = self.prepare(factors, loss_reduction, settings, generator)
        chol = sketch.damped_cholesky(gram, damping)
        if chol is None:
            return None
        return Curvature(route, gram, chol, damping, factors.mask)

    def estimated_cost(self, n: int, settings: RouteSettings) -> float:
        """Multiply-adds of a refresh (amortised) plus one apply for ``n`` samples."""
        raise NotImplementedError

    # ----------------------------------------------------------------- apply
    def grad_parts(self, mask: Mask, dtype: torch.dtype) -> Optional[List[Tensor]]:
        """The trainable parameters' gradients in the route's shapes (views where possible), in ``dtype``;
        ``None`` if one is missing."""
        grads = [p.grad for p in self.trainable_params(mask)]
        return None if any(g is None for g in grads) else self.parts_of(grads, mask, dtype)

    def parts_of(self, tensors: List[Tensor], mask: Mask, dtype: torch.dtype) -> List[Tensor]:
        """Tensors shaped like the trainable parameters (a gradient, a step) in the route's shapes, in ``dtype``."""
        raise NotImplementedError

    def curvature_norm(self, tensors: List[Tensor]) -> Optional[Tensor]:
        """``‖U t‖²`` = ``tᵀ F t`` for ``t`` shaped like the trainable parameters (the committed curvature's
        ``F = UᵀU``; sketched where its route is), a 0-dim tensor; ``None`` without usable curvature."""
        cur = self.curvature
        if cur is None or self.trainable() != cur.mask or self.falls_back_whole():
            return None
        return cur.route.u_dot(self.parts_of(tensors, cur.mask, cur.gram.dtype)).square().sum()

    def to_params(self, parts: List[Tensor], mask: Mask) -> List[Tensor]:
        """Route-shaped parts back to the trainable parameters' shapes."""
        return [part.reshape(p.shape) for part, p in zip(parts, self.trainable_params(mask))]

    def direction(self, damping: float) -> Optional[List[Tensor]]:
        """``(F + λI)^{-1} g`` for the trainable parameters, in their order, as new tensors; ``None`` when this
        layer has no usable curvature (never refreshed, trainable set changed, no gradients)."""
        solved = self._solve(damping)
        if solved is None:
            return None
        cur, parts, w, damping = solved
        return self.to_params(cur.route.apply(parts, w, damping), cur.mask)

    def direction_(self, damping: float) -> bool:
        """Write ``(F + λI)^{-1} g`` into the trainable parameters' ``.grad`` in place (one fused update per
        part where the gradient is a contiguous tensor of the curvature's dtype, else through a copy);
        ``False``, leaving the gradients alone, when this layer has no usable curvature."""
        solved = self._solve(damping)
        if solved is None:
            return False
        cur, parts, w, damping = solved
        grads = [p.grad for p in self.trainable_params(cur.mask)]
        if all(part.dtype == g.dtype and g.is_contiguous() and part.data_ptr() == g.data_ptr()
               for part, g in zip(parts, grads)):
            cur.route.apply_(parts, w, damping)
        else:
            for g, d in zip(grads, self.to_params(cur.route.apply(parts, w, damping), cur.mask)):
                g.copy_(d)
        return True

    def _solve(self, damping: float) -> Optional[Tuple[Curvature, List[Tensor], Tensor, float]]:
        """``(curvature, gradient parts, w = (K + λI)^{-1} U g, λ)``, or ``None`` without usable curvature; ``λ`` is
        the layer's own: ``damping`` times the curvature's ``scale`` (1 unless damping is relative)."""
        cur = self.curvature
        if cur is None or self.trainable() != cur.mask or self.falls_back_whole():
            return None
        parts = self.grad_parts(cur.mask, cur.gram.dtype)
        if parts is None:
            return None
        damping = damping * cur.scale
        w = cur.solve(self._u_dot(cur, parts), damping)
        if w is None:
            return None
        return cur, parts, w, damping

    def _u_dot(self, cur: Curvature, parts: List[Tensor]) -> Tensor:
        """``U g`` ``(N,)``; by default from the gradient through the route."""
        return cur.route.u_dot(parts)

    # ----------------------------------------------------------------- the batch of this step
    def remove_hooks(self) -> None:
        """Remove the hooks the layer put on its parameters by itself (:meth:`observe`); none by default."""

    def observe(self, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> None:
        """Forward hook body on every step (references only, never copies); nothing by default."""

    def watchable(self) -> bool:
        """Whether :meth:`observe` may keep something of a call with the current curvature; never by default."""
        return False

    def release(self) -> None:
        """End of a step: drop what :meth:`observe` and its hooks kept; the curvature is no
        longer fresh."""
        if self.curvature is not None:
            self.curvature.fresh = False

    def refreshed_from_batch(self, scale: float) -> None:
        """The curvature was just rebuilt from all samples of this step's batch, ``U``'s rows scaled by ``scale``
        (:func:`sample_scale`); nothing by default."""

    def trainable_params(self, mask: Mask) -> List[nn.Parameter]:
        return [p for p, m in zip(self.param_slots(), mask) if m]


class MatrixLayer(LayerCurvature):
    """Layers whose gradient is a matrix ``[W | b]`` per group: Linear and Conv.

    Parts: the weight gradient as ``(groups, d_out/groups, d_in_g)`` and the bias gradient as
    ``(groups, d_out/groups)`` (each only while trainable). The bias's row of ones in the input factors
    is never materialised.
    """

    groups = 1
    positions = 1  # P of the last refresh, for cost estimates

    def _matrix_dims(self) -> Tuple[int, int]:
        w = self.module.weight
        return w.shape[0] // self.groups, w[0].numel()

    def parts_of(self, tensors: List[Tensor], mask: Mask, dtype: torch.dtype) -> List[Tensor]:
        d_out, d_in = self._matrix_dims()
        parts = []
        if mask[0]:
            parts.append(tensors[0].reshape(self.groups, d_out, d_in))
        if mask[1]:
            parts.append(tensors[-1].reshape(self.groups, d_out))
        return [part if part.dtype == dtype else part.to(dtype) for part in parts]

    def _assemble(self, G: Tensor, X: Tensor, mask: Mask) -> Factors:
        """Factors from ``G (N, groups, d_out, P)`` and inputs ``X (N, groups, d_in, P)``. The bias's row of
        ones stays implicit (``mask[1]``); with a frozen weight ``X`` keeps no rows."""
        return Factors(G, X if mask[0] else X[:, :, :0])

    def _route(self, factors: Factors, scale: float, settings: RouteSettings, generator) -> Route:
        self.positions = factors.grad_side.shape[3]
        return build_route(factors.grad_side * scale, factors.input_side, self.bias_row(factors.mask), settings,
                           generator)

    def bias_row(self, mask: Mask) -> bool:
        """Whether the bias's row of ones is implicit in the factors (it is, while the bias is trainable)."""
        return mask[1]

    def factor_sums(self, factors: Factors) -> Optional[Tuple[List[Tensor], Tensor]]:
        """``Σ_{n,p} G[n,g,:,p] X̃[n,g,:,p]ᵀ`` as parts, and ``M = Σ_{n,g,p} ‖G[n,g,:,p]‖ ‖X̃[n,g,:,p]‖`` (the norms
        of the rank-one terms; ``X̃`` has the bias's 1)."""
        return sketch.patch_sums(factors.grad_side, factors.input_side, self.bias_row(factors.mask))

    def estimated_cost(self, n: int, settings: RouteSettings) -> float:
        d_out, d_in = self._matrix_dims()
        return min(route_costs(n, self.groups, d_out, d_in + 1, self.positions, settings).values())
