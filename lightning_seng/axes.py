"""Where the samples are: the batch size ``N`` from several sources, cross-checked, and each layer's sample
axis found structurally.

**The batch size.** On a refresh step ``N`` is read from every source that knows it: the batch SENG is told
about (:meth:`~lightning_seng.SENG.observe_batch`, e.g. the Lightning batch), the model's first input on
``batch_axis``, and the modules that declare their layout (``nn.MultiheadAttention``, ``nn.Transformer``,
``nn.TransformerEncoder/Decoder(Layer)``, ``nn.RNN/GRU/LSTM``: axis 0 of their input if ``batch_first``,
else axis 1). :class:`BatchSources` keeps what each said; if they disagree, nothing is built from that
refresh.

**The sample axes.** One forward of the model runs again under ``FakeTensorMode`` (shapes only, no compute;
parameters and buffers are fake copies, so no real state changes), with the batch axis of the inputs resized
to a probe size ``P``: a prime above twice every dimension of the inputs, parameters and buffers, so that no
other dimension, product or sum of two of them equals it. A layer's sample axis is the axis of its input whose
size became ``P`` (:class:`AxisProbe`); an input with no such axis is shared by all samples, one with several
(or with ``P`` merged into another axis, ``(P·T, d)``) has no per-sample split. Where the probe cannot run,
the layers keep the size rule (:func:`~lightning_seng.layers.base.find_sample_axis`) where it is unambiguous.

Pure torch.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

# What a probed shape says about a tensor's sample axis besides an axis number.
SHARED = None  # no axis of the probe size: the tensor is the same for every sample
AMBIGUOUS = "ambiguous"  # several axes of the probe size, or calls of one shape that put the samples elsewhere
MERGED = "merged"  # the probe size is a factor of an axis: the samples are flattened into another axis

_TRANSFORMERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder, nn.TransformerDecoder)


def declared_axis(module: nn.Module) -> Optional[int]:
    """The batch axis a torch module declares for its sequence inputs: 0 if ``batch_first``, else 1; ``None``
    for modules that declare none."""
    if isinstance(module, (nn.MultiheadAttention, nn.RNNBase, nn.Transformer)):
        return 0 if module.batch_first else 1
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return 0 if module.self_attn.batch_first else 1
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)) and len(module.layers):
        return declared_axis(module.layers[0])
    return None


def declared_inputs(module: nn.Module, args: tuple, kwargs: dict) -> List[Tensor]:
    """The batched sequence inputs of a module that declares its layout: ``(L, N, E)`` or ``(N, L, E)``
    tensors (an unbatched 2-D input or a ``PackedSequence`` has no batch axis)."""
    if isinstance(module, nn.Transformer):
        names = ("src", "tgt")
    elif isinstance(module, nn.MultiheadAttention):
        names = ("query",)
    elif isinstance(module, (nn.TransformerDecoderLayer, nn.TransformerDecoder)):
        names = ("tgt",)
    elif isinstance(module, _TRANSFORMERS):
        names = ("src",)
    else:
        names = ("input",)
    found = [args[i] if i < len(args) else kwargs.get(k) for i, k in enumerate(names)]
    return [t for t in found if isinstance(t, Tensor) and t.dim() == 3]


def declaring_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """The outermost modules of ``model`` that declare their layout (:func:`declared_axis`), by name: the
    attention inside a ``TransformerEncoderLayer`` takes its layout from that layer, and naming both in a
    disagreement would say one thing twice."""
    found: Dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if declared_axis(m) is not None and not any(name.startswith(outer + ".") or outer == ""
                                                    for outer in found):
            found[name] = m
    return found


def _eager():
    """``torch.compiler.set_stance("force_eager")`` (torch >= 2.6): compiled submodules run eagerly in the probe."""
    if not hasattr(torch, "compiler") or not hasattr(torch.compiler, "set_stance"):
        return nullcontext()
    return torch.compiler.set_stance("force_eager")


class BatchSources:
    """What each source said the batch size is since the last refresh.

    ``source -> (values, how it was read)``; the batch told to SENG is replaced by each new one, the model's
    input and the declared modules start afresh with each forward of the model (the last forward is the one
    whose calls the layers keep)."""

    BATCH = "the batch passed to observe_batch (the Lightning batch)"
    INPUT = "the model's first input"

    def __init__(self) -> None:
        self.said: Dict[str, Tuple[set, str]] = {}

    def note(self, source: str, n: int, how: str) -> None:
        values, first = self.said.get(source, (set(), how))
        values.add(int(n))
        self.said[source] = (values, first)

    def new_batch(self, n: int, how: str) -> None:
        self.said[self.BATCH] = ({int(n)}, how)

    def new_forward(self, n: Optional[int], how: str) -> None:
        self.said = {k: v for k, v in self.said.items() if k == self.BATCH}
        if n is not None:
            self.note(self.INPUT, n, how)

    def current(self) -> Optional[int]:
        """The batch size the sources said so far where they agree, else ``None`` (nothing is forgotten)."""
        values = {v for vs, _ in self.said.values() for v in vs}
        return next(iter(values)) if len(values) == 1 else None

    def take(self) -> Tuple[Optional[int], Optional[str]]:
        """``(N, None)`` where the sources agree (``N`` ``None`` when none spoke), else ``(None, why)`` naming
        each source, what it said and how it was read. Forgets them all."""
        said, self.said = self.said, {}
        values = {v for vs, _ in said.values() for v in vs}
        if len(values) <= 1:
            return (next(iter(values)) if values else None), None
        return None, "; ".join(f"{source} ({how}): {', '.join(map(str, sorted(vs)))}"
                               for source, (vs, how) in said.items())


def _is_prime(k: int) -> bool:
    return k >= 2 and all(k % d for d in range(2, int(k ** 0.5) + 1))


def probe_size(tensors: Sequence[Tensor]) -> int:
    """The smallest prime above twice every dimension of ``tensors`` (and above 2): no dimension, no product of
    dimensions and no sum of two of them equals it."""
    k = 2 * max([2] + [s for t in tensors for s in t.shape]) + 1
    while not _is_prime(k):
        k += 1
    return k


Axis = Union[int, None, str]


@dataclass
class ProbedAxes:
    """One layer's sample axes as the probe saw them: real shape -> axis, :data:`SHARED`, :data:`AMBIGUOUS` or
    :data:`MERGED`; ``why_not`` says why the probe has nothing (empty when it ran)."""

    shapes: Dict[Tuple[int, ...], Axis] = field(default_factory=dict)
    why_not: str = ""

    def add(self, probed: Sequence[int], size: int, n: int) -> None:
        axes = [i for i, s in enumerate(probed) if s == size]
        merged = [i for i, s in enumerate(probed) if s > size and s % size == 0]
        real = tuple(n * (s // size) if i in axes or i in merged else s for i, s in enumerate(probed))
        found: Axis = MERGED if merged else (axes[0] if len(axes) == 1 else (AMBIGUOUS if axes else SHARED))
        if real in self.shapes and self.shapes[real] != found:
            found = AMBIGUOUS  # two calls whose inputs look alike but hold the samples on different axes
        self.shapes[real] = found


def _describe(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def _leaves(tree: Any) -> List[Tensor]:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, Tensor)]


@dataclass
class ProbeResult:
    """What one fake forward found: per module, its tensors' sample axes; the declared modules whose
    declared axis did not hold the probe size; and whether the model's output holds it at all."""

    axes: Dict[int, ProbedAxes]
    contradicted: List[str]
    output_lost: Optional[str]


class AxisProbe:
    """Each layer's sample axis, from one forward of ``model`` on fake tensors with the batch axis resized.

    ``watched``: modules whose calls are recorded, by name (the layers' modules and the declaring ones).
    Results are cached for the last ``(input shapes, N, resized axes)``.
    """

    def __init__(self, model: nn.Module, watched: Dict[str, nn.Module], declared: Dict[str, nn.Module]):
        self.model = model
        self.watched = watched
        self.declared = declared
        self._cache: Optional[tuple] = None
        # why the fake forward fails even unresized: the model cannot be probed, whatever the shapes (not retried)
        self._unable: Optional[str] = None

    def plans(self, args: tuple, kwargs: dict, n: int, batch_axis: Union[int, Callable]) -> List[Dict[int, int]]:
        """Which axis of which input leaf to resize, in the order to try: the first input's ``batch_axis``
        together with every other input that has an axis of size ``N`` where the convention puts the batch (the
        model's declared axis if it declares one; else ``batch_axis``, or axis 0, as a key padding mask
        ``(N, S)`` has it); then the first input's alone. With a callable ``batch_axis`` the first input is one
        of the others, on axis 0."""
        leaves = pytree.tree_leaves((args, kwargs))
        slots = [i for i, t in enumerate(leaves) if isinstance(t, Tensor)]
        if not slots:
            return []
        own = declared_axis(self.model)
        usual = 0 if callable(batch_axis) else batch_axis
        first: Dict[int, int] = {}
        if not callable(batch_axis) and leaves[slots[0]].dim() > batch_axis \
                and leaves[slots[0]].shape[batch_axis] == n:
            first = {slots[0]: batch_axis}
        full = dict(first)
        for i in slots:
            t = leaves[i]
            axes = [own] if own is not None and t.dim() == 3 else [usual, 0]
            axis = next((a for a in axes if t.dim() > a and t.shape[a] == n), None)
            if i not in full and axis is not None:
                full[i] = axis
        return [p for p in ([full] + ([first] if first and first != full else [])) if p]

    def run(self, args: tuple, kwargs: dict, n: int, batch_axis: Union[int, Callable]) -> Union[ProbeResult, str]:
        """The probe's findings, or why it could not run (the exception of the fake forward, or the inputs).

        The plans of :meth:`plans` are tried in turn. If every one fails but the fake forward runs with the
        inputs as they are, the model itself refuses the resized axes (a ``(T, T)`` mask read as the batch):
        that is a finding, the batch axis contradicted (``ProbeResult.contradicted``)."""
        if self._unable is not None:
            return self._unable
        plans = self.plans(args, kwargs, n, batch_axis)
        if not plans:
            return f"no input of the model's forward has an axis of the batch size {n} to resize"
        key = (tuple((tuple(t.shape), t.dtype) for t in _leaves((args, kwargs))), n,
               tuple(tuple(sorted(p.items())) for p in plans))
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        failures = []
        result: Union[ProbeResult, str, None] = None
        for plan in plans:
            try:
                result = self._forward(args, kwargs, n, plan)
                break
            except Exception as error:  # any failure of the fake forward means: no structural answer
                failures.append(_describe(error))
        if result is None:
            leaves = pytree.tree_leaves((args, kwargs))
            resized = "; then ".join(", ".join(f"axis {a} of the input of shape {tuple(leaves[i].shape)}"
                                               for i, a in plan.items()) + f" ({why})"
                                     for plan, why in zip(plans, failures))
            try:
                self._forward(args, kwargs, n, {})
                result = ProbeResult({}, [f"the model's forward runs on its inputs as they are but fails with "
                                          f"the batch resized on {resized}"], None)
            except Exception as error:
                result = self._unable = f"its forward on fake inputs fails even unresized ({_describe(error)})"
        self._cache = (key, result)
        return result

    def _forward(self, args: tuple, kwargs: dict, n: int, plan: Dict[int, int]) -> ProbeResult:
        from torch._subclasses.fake_tensor import FakeTensorMode

        modules = list(self.model.modules())
        state = {id(t): t for m in modules for t in list(m._parameters.values()) + list(m._buffers.values())
                 if t is not None}
        leaves, spec = pytree.tree_flatten((args, kwargs))
        size = probe_size(list(state.values()) + [t for t in leaves if isinstance(t, Tensor)] + [torch.empty(n)])
        records: Dict[int, List[tuple]] = {id(m): [] for m in self.watched.values()}

        def record(module: nn.Module, a: tuple, k: dict, out: Any) -> None:
            records[id(module)].append((_leaves((a, k)), _leaves(out), a, k))

        # tensors the forward reads that are neither parameters nor buffers (a positional table kept as a plain
        # attribute) are converted to fake copies when an op meets them
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        handles = [m.register_forward_hook(record, with_kwargs=True) for m in
                   {id(m): m for m in self.watched.values()}.values()]
        # parameters and buffers swapped for fake copies in place, module by module, and put back: the swap of
        # torch.func.functional_call does not restore a module registered under two names
        swapped = [(m._parameters, k, v) for m in modules for k, v in m._parameters.items() if v is not None]
        swapped += [(m._buffers, k, v) for m in modules for k, v in m._buffers.items() if v is not None]
        try:
            fake_state = {i: mode.from_tensor(t) for i, t in state.items()}
            for table, k, v in swapped:
                table[k] = fake_state[id(v)]
            fake = []
            for i, t in enumerate(leaves):
                if not isinstance(t, Tensor):
                    fake.append(t)
                elif i in plan:
                    shape = list(t.shape)
                    shape[plan[i]] = size
                    with mode:
                        fake.append(torch.empty(shape, dtype=t.dtype, device=t.device).requires_grad_(t.requires_grad))
                else:
                    fake.append(mode.from_tensor(t))
            fake_args, fake_kwargs = pytree.tree_unflatten(fake, spec)
            # compiled submodules run eagerly here: shape-only tensors would make Dynamo compile them again
            with mode, torch.random.fork_rng(devices=[]), torch.enable_grad(), _eager():
                output = self.model(*fake_args, **fake_kwargs)
        finally:
            for table, k, v in swapped:
                table[k] = v
            for h in handles:
                h.remove()
        axes: Dict[int, ProbedAxes] = {}
        for module_id, calls in records.items():
            found = axes.setdefault(module_id, ProbedAxes())
            for ins, outs, _, _ in calls:
                for t in ins + outs:
                    found.add(t.shape, size, n)
        contradicted = []
        for name, m in self.declared.items():
            axis = declared_axis(m)
            for _, _, a, k in records.get(id(m), []):
                for t in declared_inputs(m, a, k):
                    if t.shape[axis] != size:
                        seen = list(t.shape).index(size) if size in t.shape else None
                        contradicted.append(f"'{name}' ({type(m).__name__}, batch_first={axis == 0}) sees the "
                                            f"resized samples on axis {seen} of its input, not on its declared "
                                            f"axis {axis}")
        outs = _leaves(output)
        lost = None
        if outs and all(t.dim() > 0 and size not in t.shape for t in outs):
            gone = [name for name, m in self.watched.items()
                    if records[id(m)] and not any(size in t.shape for t in records[id(m)][0][0])]
            shapes = ", ".join(str(tuple(t.shape)) for t in outs)
            lost = (f"the model's output of shape {shapes} has no axis of the samples resized on the batch axis"
                    + (f"; they are gone from the input of {', '.join(repr(g) for g in gone[:3])}" if gone else ""))
        return ProbeResult(axes, sorted(set(contradicted)), lost)
