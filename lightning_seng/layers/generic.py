"""The generic route: any module with parameters whose forward treats the samples of a batch independently.

At a refresh the module's own forward is run again on each captured sample alone (the batch axis kept, of
size one), as a function of the module's own parameters ``θ`` (its direct ones and those of its
``parametrize`` parametrizations; ``torch.func.functional_call``, children's parameters and buffers held
fixed), and pulled back with that sample's captured output gradients:

    J_n = Σ_k (∂y_k(x_n; θ)/∂θ)ᵀ G_k[n],    shape (d,),  d = numel of the module's own trainable parameters,

``y_k`` the module's tensor outputs and ``G_k[n]`` the gradient the hooks saw for sample ``n``. ``U`` is
explicit, ``(N, d)`` with rows ``√N·J_n`` (mean reduction) or ``J_n/√N`` (sum), coordinate-sketched for the
Gram above ``sketch_size``. The samples are mapped by ``torch.func.vmap`` (in chunks); a module that has no
batching rule (``nn.GRU``/``LSTM``/``RNN``) is run sample by sample instead. Cost per refresh: about one extra
forward and backward of the module, plus ``N²·d`` for the Gram.

The per-sample outputs are compared with what the batch forward returned (on up to ``CHECK_ELEMENTS``
entries per output): a forward that couples the samples (BatchNorm in training mode), draws random numbers
(dropout) or depends on more than its inputs and parameters fails the comparison or the mapping, and the
module falls back with the reason (:class:`~lightning_seng.layers.base.NotExact`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.nn.utils import parametrize
from torch.utils import _pytree as pytree

from .base import Call, Factors, LayerCurvature, Mask, NotExact, Pick, find_sample_axis, roundoff
from .routes import EXPLICIT_MAX_ELEMENTS, ExplicitRoute, Route, RouteSettings

# Entries of each captured output kept (copied) to compare with the per-sample recomputation.
CHECK_ELEMENTS = 1 << 12
# Elements one mapped chunk may hold in per-sample gradients, inputs and outputs; bounds peak memory.
CHUNK_ELEMENTS = 1 << 24
_GOLDEN = (math.sqrt(5) - 1) / 2


@dataclass
class Kept:
    """What a generic layer keeps of one forward call: its ``(args, kwargs)`` with tensors detached, the
    version counter of each input tensor (to see later in-place writes), the positions of the gradient
    outputs among the output's tensor leaves, per such output a sample of its entries (``coords``, one
    index tensor per axis, and their ``values``), and the unit roundoff of the coarsest precision the call
    computed in (:func:`~.base.roundoff`)."""

    inputs: Any
    versions: List[int]
    outputs: List[int]
    checks: List[Tuple[Tuple[Tensor, ...], Tensor]]
    roundoff: float


def own_parameter_names(module: nn.Module) -> List[str]:
    """The parameters the generic route gives ``module``: its direct ones and, for a module with
    ``torch.nn.utils.parametrize`` parametrizations, theirs (``parametrizations.weight.original``): the
    module's forward computes the parametrized tensor from them."""
    names, seen = [], set()
    for k, p in module._parameters.items():
        if p is not None and id(p) not in seen:  # a Parameter registered twice on the module is one parameter
            seen.add(id(p))
            names.append(k)
    if parametrize.is_parametrized(module):
        names += [f"parametrizations.{k}" for k, _ in module.parametrizations.named_parameters()]
    return names


def _grad_outputs(output: Any) -> List[Tuple[int, Tensor]]:
    """``(leaf position, tensor)`` of each distinct tensor leaf of ``output`` that requires grad."""
    seen, out = set(), []
    for i, leaf in enumerate(pytree.tree_leaves(output)):
        if isinstance(leaf, Tensor) and leaf.requires_grad and id(leaf) not in seen:
            seen.add(id(leaf))
            out.append((i, leaf))
    return out


def _sampled_entries(t: Tensor) -> Tuple[Tuple[Tensor, ...], Tensor]:
    """Up to ``CHECK_ELEMENTS`` entries of ``t``, spread over it by a golden-ratio (Weyl) sequence: their
    coordinates and a copy of their values (later in-place writes to ``t`` do not reach the copy)."""
    numel = t.numel()
    if numel <= CHECK_ELEMENTS:
        flat = torch.arange(numel, device=t.device)
    else:
        k = torch.arange(CHECK_ELEMENTS, dtype=torch.float64, device=t.device)
        flat = ((k * _GOLDEN) % 1.0 * numel).long()
    coords = torch.unravel_index(flat, t.shape)
    return coords, t.detach()[coords].clone()


def _short(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"


class GenericLayer(LayerCurvature):
    """The module's own (direct) parameters, per-sample gradients by ``torch.func`` (module docstring)."""

    kind = "generic"

    def __init__(self, name: str, module: nn.Module):
        super().__init__(name, module)
        self.param_names = own_parameter_names(module)
        self.per_sample_loop = False  # set once every sample of a refresh went through one by one
        self._output: Any = None

    def param_slots(self) -> Sequence[Optional[nn.Parameter]]:
        return [self._param(k) for k in self.param_names]

    def _param(self, name: str) -> Optional[nn.Parameter]:
        try:
            return self.module.get_parameter(name)
        except AttributeError:  # removed since attach
            return None

    # ----------------------------------------------------------------- capture
    def capture(self, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> List[Any]:
        self._output = output
        try:
            return super().capture(args, kwargs, output)
        finally:
            self._output = None

    def output_tensors(self, output: Any) -> List[Tensor]:
        return [t for _, t in _grad_outputs(output)]

    def keep(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Kept:
        inputs = pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, (args, kwargs))
        tensors = [t for t in pytree.tree_leaves(inputs) if isinstance(t, Tensor)]
        positions, outputs = zip(*_grad_outputs(self._output))
        return Kept(inputs, [t._version for t in tensors], list(positions), [_sampled_entries(t) for t in outputs],
                    roundoff(list(outputs) + tensors))

    # ----------------------------------------------------------------- factors
    def take_factors(self, loss_scale: float, dtype: torch.dtype, pick: Pick = None,
                     n: Optional[int] = None) -> Optional[Factors]:
        """``J (N, d)``: the per-sample gradients of the trainable own parameters, summed over the module's
        calls, in ``dtype``, divided by ``loss_scale``; rows (and output gradients times ``factor``) as
        ``pick(N)`` chooses. :class:`NotExact` names what prevents them."""
        taken = self.take_trainable_calls(n)
        if taken is None:
            return None
        calls, mask = taken
        names = [k for k, m in zip(self.param_names, mask) if m]
        d = sum(self._param(k).numel() for k in names)
        # every sample, also under curvature_samples: the runtime identity needs the whole batch's sum
        if n * d > EXPLICIT_MAX_ELEMENTS:
            raise NotExact(f"its per-sample gradients would hold {n} × {d} = {n * d:,} elements, above the "
                           f"explicit route's cap of {EXPLICIT_MAX_ELEMENTS:,}")
        J = 0
        for call in calls:
            J = J + self._per_sample(call, n, dtype, names)
        self._check_all_used(J, names)
        factors = Factors(J, None, mask)
        self.check_sums(factors, max(call.inputs.roundoff for call in calls), loss_scale)
        scale = loss_scale
        if self.sampled_fisher:  # U from the sampled loss (no loss scale), the identities checked on the backward's
            J = 0
            for call in self.sampled_calls(calls):
                J = J + self._per_sample(call, n, dtype, names)
            factors = Factors(J, None, mask, factors.identity, factors.eps, factors.direct)
            scale = 1.0
        chosen = pick(n) if pick is not None else None
        if chosen is not None:
            factors = factors.rows(*chosen)
        if scale != 1.0:
            factors = factors.unscaled(scale)
        return factors

    def _per_sample(self, call: Call, n: int, dtype: torch.dtype, names: List[str]) -> Tensor:
        """``(n, d)``: the per-sample gradients of one call, for every sample."""
        kept: Kept = call.inputs
        leaves, spec = pytree.tree_flatten(kept.inputs)
        slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
        if [leaves[i]._version for i in slots] != kept.versions:
            raise NotExact("an input of its forward was modified in place after the forward, so the "
                           "captured inputs are not those it ran on")
        in_axes = [self._input_axis(leaves[i], n) for i in slots]
        if all(a is None for a in in_axes):
            raise NotExact(f"none of its tensor inputs has an axis of the batch size {n}, so its outputs are "
                           "not per-sample functions of the batch")
        outputs = [(k, g, check) for k, g, check in zip(kept.outputs, call.grads, kept.checks) if g is not None]
        out_axes = [find_sample_axis(g.shape, n, range(g.dim()), "output", self.probed) for _, g, _ in outputs]
        device = outputs[0][1].device

        def cast(t: Tensor) -> Tensor:
            return t.to(dtype) if t.is_floating_point() else t

        xs = [cast(leaves[i]) for i in slots]
        cots = [cast(g) for _, g, _ in outputs]
        primals, params, buffers = self._state(names, dtype)
        one = self._sample_function(leaves, spec, slots, in_axes, [k for k, _, _ in outputs], out_axes,
                                    [g.shape for _, g, _ in outputs], params, buffers)
        m = n
        d = sum(p.numel() for p in primals.values())
        J = torch.empty(m, d, dtype=dtype, device=device)
        checks = [self._checked(coords, values, a) for (_, _, (coords, values)), a in zip(outputs, out_axes)]
        footprint = d + sum(t.numel() // m for t, a in zip(xs + cots, in_axes + out_axes) if a is not None)
        loop = self.per_sample_loop
        chunk = max(1, min(m, CHUNK_ELEMENTS // max(footprint, 1)))
        with torch.enable_grad(), torch.random.fork_rng(devices=self._cuda_devices()), warnings.catch_warnings():
            # torch.func's notes on ops it maps by a slower fallback (recurrent kernels, attention) are
            # about its internals, not the user's model
            warnings.filterwarnings("ignore", message="There is a performance drop")
            start = 0
            while start < m:
                stop = start + 1 if loop else min(m, start + chunk)
                try:
                    grads, ys = self._run(one, primals, xs, cots, in_axes, out_axes, start, stop, loop)
                except torch.cuda.OutOfMemoryError:
                    if stop - start == 1:
                        raise NotExact("its forward and backward on one sample alone ran out of memory") from None
                    chunk = (stop - start) // 2  # the chunk's activations did not fit: half as many samples
                    continue
                if grads is None:  # vmap cannot map this forward: sample by sample
                    loop = True
                    continue
                self._compare(ys, checks, start, stop, m, kept.roundoff)
                col = 0
                for k in names:
                    block = grads[k].reshape(stop - start, -1)
                    J[start:stop, col:col + block.shape[1]] = block
                    col += block.shape[1]
                start = stop
        self.per_sample_loop = loop  # only once every sample went through (a coupled forward may map later)
        return J

    def _input_axis(self, t: Tensor, n: int) -> Optional[int]:
        """The input's sample axis: where the structural probe saw the resized batch, ``None`` (shared by all
        samples) where it saw none; unprobed, its one axis of size ``n``, ``None`` if it has none."""
        if self.probed is not None and self.probed.shapes.get(tuple(t.shape), 0) is None:
            return None
        if self.probed is not None and tuple(t.shape) in self.probed.shapes:
            return find_sample_axis(t.shape, n, range(t.dim()), "input", self.probed)
        axes = [i for i, s in enumerate(t.shape) if s == n]
        if len(axes) > 1:
            find_sample_axis(t.shape, n, axes, "input")  # raises: ambiguous
        return axes[0] if axes else None

    def _state(self, names: List[str], dtype: torch.dtype) -> Tuple[Dict[str, Tensor], ...]:
        """What the forward reads, detached, floating tensors in ``dtype``: the differentiated parameters
        (own, trainable), the other parameters, and the buffers."""
        def cast(t: Tensor) -> Tensor:
            return t.detach().to(dtype) if t.is_floating_point() else t.detach()

        primals = {k: cast(self._param(k)) for k in names}
        params = {k: cast(p) for k, p in self.module.named_parameters() if k not in primals}
        return primals, params, {k: cast(b) for k, b in self.module.named_buffers()}

    def _sample_function(self, leaves: List[Any], spec, slots: List[int], in_axes: List[Optional[int]],
                         out_leaves: List[int], out_axes: List[int], out_shapes: List[torch.Size],
                         params: Dict[str, Tensor], buffers: Dict[str, Tensor]) -> Callable:
        """``one(primals, xs, cots) -> (J_n as {name: grad}, outputs)`` for one sample: its inputs ``xs`` and
        output gradients ``cots`` without the sample axis, which is put back with size one."""
        module = self.module

        def one(primals: Dict[str, Tensor], xs: List[Tensor], cots: List[Tensor]):
            full = list(leaves)
            for i, x, a in zip(slots, xs, in_axes):
                full[i] = x if a is None else x.unsqueeze(a)
            args, kwargs = pytree.tree_unflatten(full, spec)

            def forward(primals: Dict[str, Tensor]) -> Tuple[Tensor, ...]:
                # buffers copied inside the transform: an in-place update (running statistics) reaches
                # neither the module nor the next sample
                copies = {k: b.clone() for k, b in buffers.items()}
                out = pytree.tree_leaves(functional_call(module, (primals, params, copies), args, kwargs))
                if len(out) <= max(out_leaves) or not all(isinstance(out[k], Tensor) for k in out_leaves):
                    raise NotExact("its output on one sample has another structure than in the batch")
                return tuple(out[k] for k in out_leaves)

            ys, pullback = vjp(forward, primals)
            for y, a, shape in zip(ys, out_axes, out_shapes):
                expected = shape[:a] + (1,) + shape[a + 1:]
                if y.shape != expected:
                    raise NotExact(f"its output on one sample has shape {tuple(y.shape)}, not {tuple(expected)} "
                                   "(the batch's with the sample axis of size one)")
            (grads,) = pullback(tuple(c.unsqueeze(a).to(y.dtype) for c, a, y in zip(cots, out_axes, ys)))
            return grads, tuple(y.squeeze(a) for y, a in zip(ys, out_axes))

        return one

    def _run(self, one: Callable, primals, xs, cots, in_axes, out_axes, start: int, stop: int, loop: bool):
        """Samples ``start:stop`` (positions in the picked rows) mapped by vmap, or sample ``start`` alone
        (``loop``). Returns ``(None, None)`` when vmap fails for a reason other than randomness."""
        def part(ts, axes):
            return [t if a is None else t.narrow(a, start, stop - start) for t, a in zip(ts, axes)]

        try:
            if loop:
                grads, ys = one(primals, [t if a is None else t.select(a, start) for t, a in zip(xs, in_axes)],
                                [c.select(a, start) for c, a in zip(cots, out_axes)])
                return {k: g.unsqueeze(0) for k, g in grads.items()}, [y.unsqueeze(a) for y, a in zip(ys, out_axes)]
            mapped = vmap(one, in_dims=(None, list(in_axes), list(out_axes)), out_dims=(0, tuple(out_axes)))
            grads, ys = mapped(primals, part(xs, in_axes), part(cots, out_axes))
            return grads, list(ys)
        except (NotExact, torch.cuda.OutOfMemoryError):
            raise
        except Exception as err:  # noqa: BLE001: any failure of the module's code is a reason to fall back
            if "randomness" in str(err):
                raise NotExact("its forward draws random numbers (e.g. dropout in training mode), so its "
                               "per-sample gradients are not those of the batch") from None
            if loop:
                raise NotExact(f"its forward failed on one sample alone: {_short(err)}") from None
            return None, None

    @staticmethod
    def _checked(coords: Tuple[Tensor, ...], values: Tensor, axis: int):
        """The kept entries: their coordinates (the sample's on ``axis``), values in float64, and their largest
        magnitude."""
        want = values.double()
        return coords, want, axis, float(want.abs().max()) if want.numel() else 0.0

    def _compare(self, ys: List[Tensor], checks, start: int, stop: int, m: int, roundoff: float) -> None:
        """The recomputed outputs of samples ``start:stop`` (of ``m``) against the entries kept from the batch
        forward, to within ``√ε`` (relative, and of their largest magnitude) of the coarser of the two
        computations: rounding differences between a batched and a per-sample evaluation stay far below it,
        while coupling or randomness changes entries by far more."""
        for y, (at, want, a, scale) in zip(ys, checks):
            if start > 0 or stop < m:
                keep = (at[a] >= start) & (at[a] < stop)
                at = tuple((c - start if i == a else c)[keep] for i, c in enumerate(at))
                want = want[keep]
            got = y[at].double()
            tol = math.sqrt(max(roundoff, torch.finfo(y.dtype).eps))
            if not torch.allclose(got, want, rtol=tol, atol=tol * scale):
                raise NotExact("its outputs on each sample alone differ from its outputs in the batch (largest "
                               f"difference {float((got - want).abs().max()):.3g}): its forward couples the "
                               "samples of a batch or is not deterministic (e.g. BatchNorm in training mode, "
                               "dropout)")

    def _check_all_used(self, J: Tensor, names: List[str]) -> None:
        """A parameter with a non-zero gradient but no per-sample gradient through the forward is used outside
        of it (e.g. read directly by its parent): its curvature would be wrong."""
        start = 0
        for k in names:
            p = self._param(k)
            size = p.numel()
            if p.grad is not None and not bool(J[:, start:start + size].any()) and bool(p.grad.any()):
                raise NotExact(f"its parameter '{k}' has a gradient but none through the module's forward "
                               "(is it used outside the module's forward?)")
            start += size

    def _cuda_devices(self) -> List[int]:
        return sorted({p.device.index or 0 for p in self.module.parameters() if p.is_cuda})

    # ----------------------------------------------------------------- curvature and apply
    def _route(self, factors: Factors, scale: float, settings: RouteSettings, generator) -> Route:
        blocks = [p.numel() for p in self.trainable_params(factors.mask)]
        return ExplicitRoute.build(factors.grad_side * scale, blocks, settings.coordinates, generator)

    def estimated_cost(self, n: int, settings: RouteSettings) -> float:
        d = sum(0 if isinstance(p, nn.parameter.UninitializedParameter) else p.numel() for p in self.parameters())
        s = min(settings.coordinates or d, d)
        return (3 * n * d + n * n * s) / settings.update_freq + 2 * n * d

    def parts_of(self, tensors: List[Tensor], mask: Mask, dtype: torch.dtype) -> List[Tensor]:
        return [t.reshape(-1).to(dtype) for t in tensors]
