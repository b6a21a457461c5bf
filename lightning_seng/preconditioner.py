"""SENG: the preconditioner that rewrites ``.grad`` of any ``nn.Module`` with the SENG direction.

For each supported layer with per-sample gradients ``U`` (rows ``∇ℓ_n/√N``) and damping ``λ``,

    d = (F + λI)^{-1} g = (1/λ) · ( g − Uᵀ (λI_N + UUᵀ)^{-1} U g ),   F = UᵀU,

and every other trainable parameter gets ``g / (1 + λ)``. The curvature (factors, ``UUᵀ`` and its
Cholesky factor) is refreshed every ``update_freq`` optimizer steps from the batch of that step;
in between, the stored factors precondition the new gradients. Learning rate and momentum stay with
the wrapped first-order optimizer::

    seng = SENG(model, damping=0.5, update_freq=10)
    loss.backward(); seng.step(); optimizer.step()
"""

from __future__ import annotations

import fnmatch
import gc
import logging
import math
import numbers
import time
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import fused, sketch
from .axes import AxisProbe, BatchSources, ProbedAxes, ProbeResult, declared_axis, declared_inputs, declaring_modules
from .coverage import Coverage, CoverageRow, pending_route
from .distributed import Communicator
from .fisher import FISHERS, Likelihood, LikelihoodLike, SampledPass, make_likelihood
from .hooks import DeclaredHook, ForwardHook, ForwardPreHook, InputHook, OutputHook, remove_handles
from .layers import ROUTE_RULES, ROUTES, LayerCurvature, MatrixLayer, NotExact, RouteSettings, build_layers
from .layers import identity
from .layers.base import Curvature, sample_scale
from .schedules import ConstantDamping, DampingLike, LevenbergMarquardt, make_damping

log = logging.getLogger(__name__)

LOSS_REDUCTIONS = ("mean", "sum")
LayerFilter = Optional[Sequence[Union[str, type]]]
BatchAxis = Union[int, Callable[[tuple, dict], int]]


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_int(key: str, value, minimum: int, allow_none: bool = False) -> Optional[int]:
    """``value`` if it is an int >= ``minimum`` (or None where allowed), else ValueError naming ``key``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{key} must be {allowed} (got {value!r})")
    return value


def check_choice(key: str, value, allowed: Sequence[str]) -> str:
    """``value`` if it is one of ``allowed``, else ValueError naming ``key`` and the choices."""
    if value not in allowed:
        raise ValueError(f"{key} must be one of {list(allowed)} (got {value!r})")
    return value


# Every module some SENG is attached to (the model and all its submodules) -> that SENG, both held weakly: a second
# SENG on the same modules would capture every call twice and rewrite .grad twice.
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def _attached_seng(model: nn.Module) -> Optional[tuple]:
    """``(name, module, seng)`` for the first module of ``model`` (itself included) that a live SENG covers. A SENG
    that nothing references any more is not: it is collected (a cycle through its communicator may keep it
    until the garbage collector runs, so it runs once before a refusal)."""
    for attempt in range(2):
        for name, module in model.named_modules(remove_duplicate=True):
            ref = _ATTACHED.get(module)
            seng = ref() if ref is not None else None
            if seng is not None and not seng.removed:
                if attempt == 0:
                    del seng
                    gc.collect()
                    break
                return name, module, seng
        else:
            return None
    return None


def _check_filter(key: str, value: LayerFilter) -> List[Union[str, type]]:
    if value is None:
        return []
    if isinstance(value, (str, type)):
        value = [value]
    try:
        items = list(value)
    except TypeError:
        raise ValueError(f"{key} must list module names (fnmatch patterns) or module types (got {value!r})") from None
    for item in items:
        if not isinstance(item, (str, type)):
            raise ValueError(f"{key} must list module names (fnmatch patterns) or module types (got {item!r})")
    return items


def _matches(name: str, module: nn.Module, patterns: List[Union[str, type]]) -> bool:
    for p in patterns:
        if isinstance(p, type) and isinstance(module, p):
            return True
        if isinstance(p, str) and (fnmatch.fnmatchcase(name, p) or type(module).__name__ == p):
            return True
    return False


def _tensors(tree: Any):
    """The tensors of a nested structure of tuples, lists and dicts, depth first."""
    if isinstance(tree, Tensor):
        yield tree
    elif isinstance(tree, (tuple, list)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


def _numel(params: List[nn.Parameter]) -> int:
    """Elements of ``params``; a lazy module's parameters count 0 until materialised."""
    return sum(0 if isinstance(p, nn.parameter.UninitializedParameter) else p.numel() for p in params)


def _slot_shapes(layer: LayerCurvature) -> list:
    """Shape of each of a layer's parameter slots, as a tuple; ``None`` for an absent one, ``"lazy"`` for one not
    yet materialised."""
    return [None if p is None else "lazy" if isinstance(p, nn.parameter.UninitializedParameter) else tuple(p.shape)
            for p in layer.param_slots()]


def _one_process() -> bool:
    """Whether no multi-process ``torch.distributed`` group is up (under one, ``.grad`` may be averaged)."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def _transformed() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``, ...) is running: a forward inside one
    is no call of the training batch (a ``vmap(jacrev(model))`` term); the runtime identity sees what such a term
    adds to a parameter's gradient."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _entries(grad: Tensor) -> Tensor:
    """The entries of a gradient: itself, or the values of a sparse one (``nn.Embedding(sparse=True)``)."""
    return grad.coalesce().values() if grad.is_sparse else grad


def check_settings(damping: DampingLike = 0.5, update_freq: int = 10, sketch_size: Optional[int] = None,
                   curvature_samples: Optional[int] = None, svd_rank: int = 16, implicit_threshold: int = 700_000, loss_reduction: str = "mean",
                   include: LayerFilter = None, exclude: LayerFilter = None, route: str = "auto",
                   curvature_dtype: Union[torch.dtype, str, None] = None, seed: int = 0,
                   skip_nonfinite: bool = True, batch_axis: BatchAxis = 0, batch_shortcut: bool = True,
                   relative_damping: bool = False, column_sample_size: Optional[int] = None,
                   fisher: str = "empirical", likelihood: LikelihoodLike = "categorical",
                   output_module: Optional[str] = None) -> dict:
    """Validate SENG's settings (all but the model and ``comm``) and return them normalised.

    Raises ``ValueError`` naming the key, the value and what is allowed. ``curvature_dtype`` may also
    be spelled ``"float32"`` / ``"float64"`` (as in configs). The Lightning callback calls this at
    construction, so a bad value fails before training starts.
    """
    make_damping(damping)
    if isinstance(curvature_dtype, str):
        curvature_dtype = {"float32": torch.float32, "float64": torch.float64}.get(
            curvature_dtype.removeprefix("torch."), curvature_dtype)
    if curvature_dtype is not None and curvature_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"curvature_dtype must be torch.float32, torch.float64 or None, or the strings 'float32' / "
                         f"'float64' (got {curvature_dtype!r})")
    if not isinstance(skip_nonfinite, bool):
        raise ValueError(f"skip_nonfinite must be True or False (got {skip_nonfinite!r})")
    if not callable(batch_axis):
        check_int("batch_axis", batch_axis, 0)
    if not isinstance(batch_shortcut, bool):
        raise ValueError(f"batch_shortcut must be True or False (got {batch_shortcut!r})")
    if not isinstance(relative_damping, bool):
        raise ValueError(f"relative_damping must be True or False (got {relative_damping!r})")
    make_likelihood(likelihood)
    if output_module is not None and not isinstance(output_module, str):
        raise ValueError(f"output_module must be None (the model itself) or the name of a submodule, as "
                         f"model.named_modules() gives it (got {output_module!r})")
    if sketch_size is not None and column_sample_size is not None:
        raise ValueError(f"sketch_size and column_sample_size are two ways of sizing the same sketch: set one, the "
                         f"other None (got sketch_size={sketch_size!r}, column_sample_size={column_sample_size!r})")
    return dict(
        damping=damping,
        update_freq=check_int("update_freq", update_freq, 1),
        sketch_size=check_int("sketch_size", sketch_size, 1, allow_none=True),
        curvature_samples=check_int("curvature_samples", curvature_samples, 1, allow_none=True),
        svd_rank=check_int("svd_rank", svd_rank, 1),
        implicit_threshold=check_int("implicit_threshold", implicit_threshold, 0),
        loss_reduction=check_choice("loss_reduction", loss_reduction, LOSS_REDUCTIONS),
        include=_check_filter("include", include),
        exclude=_check_filter("exclude", exclude),
        route=check_choice("route", route, ROUTE_RULES + ROUTES),
        curvature_dtype=curvature_dtype,
        seed=check_int("seed", seed, 0),
        skip_nonfinite=skip_nonfinite,
        batch_axis=batch_axis,
        batch_shortcut=batch_shortcut,
        relative_damping=relative_damping,
        column_sample_size=check_int("column_sample_size", column_sample_size, 1, allow_none=True),
        fisher=check_choice("fisher", fisher, FISHERS),
        likelihood=likelihood,
        output_module=output_module,
    )


class SENG:
    r"""Sketchy Empirical Natural Gradient preconditioner for an unmodified ``nn.Module``.

    Args:
        model: the network; hooks are registered on its modules with parameters: a dedicated route for
            Linear, Conv1d/2d/3d, BatchNorm, LayerNorm, GroupNorm, RMSNorm, MultiheadAttention and Embedding
            whose ``forward`` is torch's own (a weight tied between Embedding and Linear modules is one layer
            over all its uses), the generic route (:mod:`~lightning_seng.layers.generic`) for any other
            module's own parameters. Parameters without exact curvature get ``g / (1 + λ)`` and are listed
            by :meth:`coverage` and at WARNING level.
        damping: ``λ > 0``: a number, a :class:`~lightning_seng.schedules.DampingSchedule`, or a
            callable ``(step, epoch) -> float``.
        update_freq: refresh the curvature every ``update_freq`` optimizer steps (step 0 refreshes).
        sketch_size: what the sketched routes sample, a new draw at every refresh: on the explicit route that
            many of ``U``'s coordinates for ``UUᵀ`` and ``U g`` (``Uᵀv`` uses all), on the implicit route that
            many rows of ``Ĝ`` and of ``X̂`` for ``UUᵀ`` (``U g`` exact); the Gram route is exact. ``None``: exact.
        column_sample_size: the SENG authors' ``--fim-col-sample-size`` ``s``, instead of ``sketch_size``: ``s²``
            coordinates on the explicit route, ``s`` rows of ``Ĝ`` and of ``X̂`` on the implicit route, drawn once a
            refresh and used for ``UUᵀ`` and for ``U g`` until the next. With ``route="threshold"`` it reproduces
            their sketch.
        curvature_samples: build ``U`` from this many samples of the refresh batch, drawn uniformly without
            replacement (an unbiased estimate of the empirical Fisher); cuts refresh and per-step cost in
            proportion. ``None`` uses the whole batch.
        svd_rank: rank ``p`` of the implicit route's truncation of each output gradient.
        implicit_threshold: in ``route="auto"``, layers with at least this many parameters whose
            positions (sequence length, patches) exceed ``svd_rank`` use the implicit route.
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss was reduced over the batch.
        include / exclude: module names (fnmatch patterns, or class names) or module types to
            precondition / leave to the ``g / (1 + λ)`` fallback.
        route: ``"auto"`` or one of ``"explicit"``, ``"gram"``, ``"implicit"`` for Linear and Conv layers
            (for the Linear uses of a tied embedding: ``"implicit"`` compresses them, others keep them exact), or
            ``"threshold"``, the authors' rule: implicit for layers with more than ``implicit_threshold`` parameters
            whatever their positions, explicit ``U`` for all others (with no memory cap).
        curvature_dtype: dtype of factors and solves; default float64 for float64 models, else float32
            (also under bf16/fp16 autocast).
        seed: seed of the sketches' random generator.
        skip_nonfinite: if the gradient holds NaN/Inf, zero all gradients for this step (the wrapped
            optimizer then moves by momentum only), warn once and count it in ``stats``.
        batch_axis: where the batch size ``N`` is read on each refresh step: the axis of the first tensor
            passed to the model's forward and to :meth:`observe_batch` (default 0; 1 for sequence-first models
            fed ``(T, N, ...)``), or a callable ``(args, kwargs) -> N``. ``N`` is cross-checked with the modules
            that declare their layout (``batch_first`` of attention, Transformer and RNN modules); if the
            sources disagree, the refresh builds nothing and one warning names them. Each layer's sample axis
            is the axis of its input that holds this batch axis in a shape-only forward of the model with it
            resized (:mod:`lightning_seng.axes`); where that probe cannot run, the one axis of size ``N``, and
            a layer with none or several falls back, with a warning.
        batch_shortcut: compute ``U g`` of a plain ``nn.Linear`` on a 2-D input from the step's own batch
            (input and output gradient), ``N·B·(d_in + d_out)`` instead of ``N·d_in·d_out``, where the autograd
            graph and the gradient's version counter show that ``.grad`` is exactly that batch's gradient
            (``layers/linear.py``); never when ``loss_scale`` ≠ 1 (AMP unscaling changes ``.grad`` unseen) or under a
            multi-process ``torch.distributed`` group. Set ``False`` if your loop changes ``.grad`` between backward
            and ``step`` in a way the version counter cannot see (through ``.data`` or a custom kernel).
        relative_damping: each layer's damping is ``damping`` times the mean eigenvalue of its ``UUᵀ``,
            ``tr(UUᵀ)/N`` (the mean squared per-sample gradient norm over ``N``), taken at each refresh: one
            setting for layers and problems whose gradients differ in scale. Layers without curvature keep
            ``g / (1 + damping)``.
        fisher: ``"empirical"`` (the paper's): ``U``'s rows are per-sample gradients of the training loss at the true
            labels. ``"mc"``: on refresh steps they are per-sample gradients of the negative log-likelihood at targets
            drawn from the model's predictive distribution (:mod:`lightning_seng.fisher`), one draw per sample (per
            position for outputs with positions, whose loss the sample's positions sum); the gradient preconditioned
            stays ``.grad``. The draw comes from ``seed``'s generator (:attr:`sampled_targets` shows it). In the output
            module's forward hook SENG forms the sampled loss ``L = mean_n ℓ_n`` (``"sum"``: ``Σ_n ℓ_n``) and runs one
            ``torch.autograd.grad(L, <the captured layer outputs>)``, which reaches the layer outputs only, not the
            parameters: about a backward without the weight gradients per refresh. Every route builds its rows from
            those output gradients. The runtime identities are checked on the user's backward (they show that the
            per-sample decomposition of each layer is exact for this usage; the sampled rows go through the same
            decomposition). A layer the sampled loss does not reach (computed after the output module), a forward
            that runs again inside that backward (gradient checkpointing) and an output the likelihood cannot read
            fall back with a WARNING. Tensor hooks of your own on the layer outputs also see the sampled backward.
        likelihood: with ``fisher="mc"``: ``"categorical"`` (logits ``(N, C, ...)``, the classes on axis 1 as
            ``F.cross_entropy`` takes them; ``fisher.Categorical(class_axis=-1)`` for ``(N, T, V)``), ``"gaussian"``
            (unit variance, ``ŷ = f + ε``, ``F.mse_loss``), ``"bernoulli"`` (logits, ``F.binary_cross_entropy_with_logits``),
            a :class:`~lightning_seng.fisher.Likelihood`, or a callable ``(outputs, generator) -> ℓ (N,)`` whose
            ``mean_n ℓ_n`` (``"sum"``: ``Σ_n ℓ_n``) is the loss on the training loss's scale. The built-in losses are
            torch's defaults for each likelihood, reduced as ``loss_reduction`` says, so the sampled rows are on the
            empirical rows' scale and ``damping`` means the same for both (for ``F.mse_loss``, ``‖ŷ − f‖²``, both
            have mean ``4·JᵀJ`` per output element at a correct unit-variance model). The samples are on axis 0 of
            the output (checked with the structural probe where it runs).
        output_module: with ``fisher="mc"``: the name of the submodule (``model.named_modules()``) whose output the
            likelihood reads; ``None``: the model itself.
        stats_every: record ``grad_norm``, ``direction_norm`` and ``cosine`` on every ``stats_every``-th step
            (``None``: on refresh steps). Recording costs passes over the gradients and the directions; the
            Lightning callback sets it to its logging interval.
        comm: a :class:`~lightning_seng.distributed.Communicator` for DDP; ``None`` for one process.
        log_coverage: log the coverage table at INFO when attached (the Lightning callback prints it itself,
            on rank zero, and passes ``False``); the fallbacks' WARNING is logged either way.
    """

    def __init__(self, model: nn.Module, damping: DampingLike = 0.5, update_freq: int = 10,
                 sketch_size: Optional[int] = None, curvature_samples: Optional[int] = None, svd_rank: int = 16,
                 implicit_threshold: int = 700_000,
                 loss_reduction: str = "mean", include: LayerFilter = None, exclude: LayerFilter = None,
                 route: str = "auto", curvature_dtype: Optional[torch.dtype] = None, seed: int = 0,
                 skip_nonfinite: bool = True, batch_axis: BatchAxis = 0, batch_shortcut: bool = True,
                 relative_damping: bool = False, column_sample_size: Optional[int] = None,
                 fisher: str = "empirical", likelihood: LikelihoodLike = "categorical",
                 output_module: Optional[str] = None, stats_every: Optional[int] = None,
                 comm: Optional[Communicator] = None, log_coverage: bool = True,
                 compile_step: Union[bool, str] = False):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module (got {type(model).__name__})")
        if comm is not None and not isinstance(comm, Communicator):
            raise ValueError(f"comm must be a lightning_seng.distributed.Communicator or None (got {comm!r})")
        checked = check_settings(damping=damping, update_freq=update_freq, sketch_size=sketch_size,
                                 curvature_samples=curvature_samples, svd_rank=svd_rank, implicit_threshold=implicit_threshold,
                                 loss_reduction=loss_reduction, include=include, exclude=exclude, route=route,
                                 curvature_dtype=curvature_dtype, seed=seed, skip_nonfinite=skip_nonfinite,
                                 batch_axis=batch_axis, batch_shortcut=batch_shortcut,
                                 relative_damping=relative_damping, column_sample_size=column_sample_size,
                                 fisher=fisher, likelihood=likelihood, output_module=output_module)
        self.relative_damping = checked["relative_damping"]
        self.damping_schedule = make_damping(checked["damping"])
        self.settings = RouteSettings(route=checked["route"], sketch_size=checked["sketch_size"],
                                      column_sample_size=checked["column_sample_size"],
                                      svd_rank=checked["svd_rank"], implicit_threshold=checked["implicit_threshold"],
                                      update_freq=checked["update_freq"])
        self.loss_reduction = checked["loss_reduction"]
        self.curvature_samples = checked["curvature_samples"]
        include, exclude = checked["include"], checked["exclude"]
        curvature_dtype = checked["curvature_dtype"]
        self.skip_nonfinite = skip_nonfinite
        self.batch_axis = checked["batch_axis"]
        self.stats_every = check_int("stats_every", stats_every, 1, allow_none=True)
        if isinstance(compile_step, str):
            check_choice("compile_step", compile_step, COMPILE_MODES)
        elif not isinstance(compile_step, bool):
            raise ValueError(f"compile_step must be True, False or a torch.compile mode, one of {list(COMPILE_MODES)} "
                             f"(got {compile_step!r})")
        self.compile_step = "default" if compile_step is True else (compile_step or None)
        self._run_plan = fused.runner(self.compile_step)
        self._plan: Optional[fused.StepPlan] = None
        self.model = model
        self.fisher = checked["fisher"]
        self.likelihood = make_likelihood(checked["likelihood"])
        self.output_module = checked["output_module"]
        modules = dict(model.named_modules())
        if self.output_module is not None and self.output_module not in modules:
            names = [k for k in modules if k][:8]
            raise ValueError(f"output_module must name a submodule of the model, as model.named_modules() gives it, "
                             f"or be None for the model itself (got {self.output_module!r}; its submodules include "
                             f"{names})")
        self.comm = comm if comm is not None else Communicator()
        if isinstance(self.damping_schedule, LevenbergMarquardt) and type(self.comm) is not Communicator:
            raise ValueError("damping=LevenbergMarquardt(...) needs the whole model's curvature in one process; "
                             f"it is not available with comm={type(self.comm).__name__} (use a constant damping or "
                             "a schedule)")

        taken = _attached_seng(model)
        if taken is not None:
            name, module, other = taken
            where = "it" if module is model else f"its submodule '{name}' ({type(module).__name__})"
            raise ValueError(f"model {type(model).__name__}: {where} already has a SENG attached, {other!r} (attached "
                             f"to a {type(other.model).__name__}); two would capture every call and rewrite .grad "
                             "twice. Call .remove() on the first, or attach the new one to a copy.deepcopy of the model")

        params = [p for p in model.parameters()]
        if curvature_dtype is None:
            curvature_dtype = torch.float64 if params and params[0].dtype == torch.float64 else torch.float32
        self.curvature_dtype = curvature_dtype

        self.layers, self._fallbacks, shared = build_layers(
            model, lambda name, module: (not include or _matches(name, module, include))
            and not (exclude and _matches(name, module, exclude)))
        # factors gathered to an owner rank (DDP's global mode) are not those a rank checks: no per-sample reuse there
        local = type(self.comm).gather_factors is Communicator.gather_factors
        for layer in self.layers.values():
            layer.note_attached()
            layer.sampled_fisher = self.fisher == "mc"
            layer.route_settings = self.settings if local else None
        self._covered = {id(p) for layer in self.layers.values() for p in layer.parameters()}
        # id -> weak reference: an id alone could be reused by a parameter created after this one is freed
        self._attached = {id(p): weakref.ref(p) for p in params}
        self.other_params = [p for p in params if id(p) not in self._covered]
        self._shared = shared
        self._reasons: Dict[str, str] = {}  # layer -> why it has no curvature now (NotExact, never captured)
        self._warned: set = set()

        self.removed = False
        self._handles = [module.register_forward_hook(ForwardHook(self, layer), with_kwargs=True, prepend=True)
                         for layer in self.layers.values() for module in layer.modules()]
        self._handles += [module.register_forward_pre_hook(ForwardPreHook(self, layer), with_kwargs=True)
                          for layer in self.layers.values() if type(layer).before_call is not LayerCurvature.before_call
                          for module in layer.modules()]
        self._handles.append(model.register_forward_pre_hook(InputHook(self), with_kwargs=True))
        self._sources = BatchSources()  # what each source said the batch size is (axes.py)
        declared = declaring_modules(model)
        self._handles += [module.register_forward_pre_hook(DeclaredHook(self, name), with_kwargs=True)
                          for name, module in declared.items()]
        # fisher="mc": the sampled loss is drawn from the output module's output (fisher.py)
        self._sampled = SampledPass()
        self._output_axis: Any = 0  # the probe's sample axis of the output module's output (0 where unprobed)
        watched_output = {}
        if self.fisher == "mc":
            out_name = self.output_module or ""
            self._handles.append(modules[out_name].register_forward_hook(OutputHook(self), with_kwargs=True))
            watched_output = {out_name: modules[out_name]}
        names = {id(m): n for n, m in model.named_modules()}
        self._probe = AxisProbe(model, {**{names.get(id(m), lname): m for lname, layer in self.layers.items()
                                           for m in layer.modules()}, **declared, **watched_output}, declared)
        self._probe_inputs: Optional[tuple] = None  # (args, kwargs) of the model's forward on this refresh step
        self._claimed = list(model.modules())
        for module in self._claimed:
            _ATTACHED[module] = weakref.ref(self)
        # the hooks hold this SENG weakly: once collected, its hooks go too
        weakref.finalize(self, remove_handles, self._handles)
        # U g' from the layer's own batch (layers/linear.py) needs .grad to be that batch's: not under DDP
        self._observe = checked["batch_shortcut"] and type(self.comm) is Communicator
        # whether a forward between refreshes may be observed (some layer watchable: until the first step, any);
        # else the layers' forward hooks return at once on those steps
        self._observing = self._observe
        self._loss_weights: Optional[List[float]] = None  # how the observed loss weighs each sample (observe_loss)
        self._in_step = False
        self.comm.setup(self.layers, self)
        self.generator = torch.Generator().manual_seed(seed)
        self.step_count = 0
        self.epoch = 0
        self.skipped_refreshes = 0
        self._nonfinite_steps = 0
        self._finite_flags: List[Tensor] = []  # between refreshes: whether each step's gradient was finite (see
        # _count_nonfinite)
        self._walk: List[tuple] = []  # model.named_modules() as _with_grad keeps it
        self._stats: Dict[str, Any] = {"skipped_refreshes": 0, "nonfinite_steps": 0}
        self._coverage_cached: tuple = (None, 0.0)  # (what the percentage depends on, the percentage)
        self._written_cached: tuple = (None, set())  # (ids of the parameters with a gradient, _written of them)
        self._feedback: Optional[tuple] = None  # Levenberg–Marquardt: (params, their values, gradients, λ)
        self._announce_coverage(log_coverage)

    # ------------------------------------------------------------------ hooks
    @property
    def capturing(self) -> bool:
        """Whether forward calls are recorded now: on refresh steps, while autograd records, outside ``step``.

        Eval mode still trains when grad is enabled (frozen BatchNorm statistics, no dropout); evaluation
        loops run under no_grad and are skipped by the grad check.
        """
        return self.will_refresh and torch.is_grad_enabled() and not self._in_step and not _transformed()

    def _forward(self, layer: LayerCurvature, args: tuple, kwargs: dict, output: Any) -> None:
        """Body of every layer's forward hook (:class:`~lightning_seng.hooks.ForwardHook`)."""
        if self._in_step or not torch.is_grad_enabled() or _transformed():
            return
        if self._sampled.running:  # a forward recomputed inside the sampled backward: its calls are not the batch's
            self._sampled.failure = (f"the forward of '{layer.name}' ran again during the sampled loss's backward "
                                     "(gradient checkpointing recomputes the forward inside backward), so the "
                                     "captured calls are not one forward's")
            return
        if self.will_refresh:
            edges = layer.capture(args, kwargs, output)
            if edges:
                self._sampled.edges += edges
            layer.watch_gradients(_one_process())
        if self._observe and _one_process():
            layer.observe(args, kwargs, output)

    def _sample(self, output: Any) -> None:
        """Body of the output module's forward hook on refresh steps under ``fisher="mc"``
        (:class:`~lightning_seng.hooks.OutputHook`): targets drawn from the likelihood of ``output``, the sampled
        loss ``L = mean_n ℓ_n`` (``"sum"``: ``Σ_n ℓ_n``) and one ``torch.autograd.grad(L, <the captured calls'
        output edges>)``, which reaches the layer outputs only (not the parameters): the calls' tensor hooks keep
        its gradients in their sampled slot (:class:`~lightning_seng.layers.base.GradKeeper`)."""
        state = self._sampled
        if state.running or state.failure is not None:
            return
        state.ran = True
        likelihood = self.likelihood
        try:
            generator = self._draw_generator(output)
            if isinstance(likelihood, Likelihood):
                why = likelihood.check(output)
                if why is not None:
                    state.failure = f"likelihood={likelihood!r} cannot read the output module's output: {why}"
                    return
                targets = likelihood.sample(output, generator)
                losses = likelihood.per_sample(output, targets, self.loss_reduction)
                state.shape, state.targets = tuple(output.shape), targets
            else:
                losses = likelihood(output, generator)
        except Exception as err:  # noqa: BLE001: the likelihood's own failure is the reason to fall back
            state.failure = f"the sampled loss could not be formed from the output module's output ({err!r})"
            return
        if not isinstance(losses, Tensor) or losses.dim() != 1 or not losses.requires_grad:
            what = (f"a tensor of shape {tuple(losses.shape)}" + ("" if losses.requires_grad else " without grad")
                    if isinstance(losses, Tensor) else type(losses).__name__)
            state.failure = (f"the likelihood gave {what}, not a per-sample loss (N,) that depends on the output")
            return
        state.rows = losses.shape[0]
        if not state.edges:
            return
        total = losses.mean() if self.loss_reduction == "mean" else losses.sum()
        state.running = True
        for layer in self.layers.values():
            layer.sampling = True
        try:
            torch.autograd.grad(total, state.edges, retain_graph=True, allow_unused=True)
        finally:
            state.running = False
            for layer in self.layers.values():
                layer.sampling = False

    def _draw_generator(self, output: Any) -> torch.Generator:
        """The generator of this refresh's draw: SENG's own on the CPU; on another device one of that device,
        seeded from SENG's (so the draws follow ``seed`` and the state saved by :meth:`state_dict`)."""
        first = next(_tensors(output), None)
        device = first.device if first is not None else torch.device("cpu")
        if device.type == "cpu":
            return self.generator
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=self.generator))
        return torch.Generator(device).manual_seed(seed)

    @property
    def sampled_targets(self) -> Any:
        """The targets drawn by a built-in likelihood on the last refresh step with ``fisher="mc"`` (``None``
        otherwise, and for a callable likelihood)."""
        return self._sampled.targets

    def _sampled_failure(self, n: Optional[int]) -> Optional[str]:
        """Why this refresh has no Monte-Carlo rows for any layer (``None`` if it has them where the sampled loss
        reached): the pass failed or did not run, or its samples are not the batch's."""
        state, name = self._sampled, repr(self.output_module or "the model")
        if state.failure is not None:
            return state.failure
        if not state.ran:
            return (f"the output module ({name}) did not run on this refresh step with grad enabled; set "
                    "output_module to the module whose output the loss reads (e.g. the network a LightningModule's "
                    "training_step calls)")
        if n is None or state.rows is None:
            return None
        if state.rows != n:
            return (f"the sampled loss has {state.rows} per-sample losses for a batch of {n} samples (the samples "
                    f"are on axis 0 of the output of {name}, of shape {state.shape})")
        axis = self._output_axis
        if state.shape is not None and axis != 0:
            where = {None: "no axis", "ambiguous": "several axes", "merged": "no axis of its own"}.get(axis, f"axis {axis}")
            return (f"the output of {name}, of shape {state.shape}, holds the samples on {where} (found by resizing "
                    "the batch in a shape-only forward), not on axis 0 as the built-in likelihoods read it; pass "
                    "a callable likelihood")
        return None

    def _check_attached(self, what: str) -> None:
        if self.removed:
            raise RuntimeError(f"SENG.{what} after SENG.remove(): this SENG's hooks are detached and it captures "
                               "nothing; attach a new SENG to the model (load_state_dict carries the state over)")

    def _observe_input(self, args: tuple, kwargs: dict) -> None:
        """Body of the model's forward pre-hook on refresh steps (:class:`~lightning_seng.hooks.InputHook`)."""
        if self._sampled.running:
            return
        self._sampled = SampledPass()  # a new forward: the sampled loss of the last one is gone with its calls
        self._probe_inputs = (args, kwargs)
        self._sources.new_forward(*self._read_batch_size(args, kwargs))

    def _declared(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Body of the forward pre-hook of a module that declares its layout (``batch_first``) on refresh steps
        (:class:`~lightning_seng.hooks.DeclaredHook`): its input's declared axis is a source of the batch size."""
        axis = declared_axis(module)
        for t in declared_inputs(module, args, kwargs):
            self._sources.note(f"'{name}' ({type(module).__name__}, batch_first={axis == 0})",
                               t.shape[axis], f"axis {axis} of its input of shape {tuple(t.shape)}")

    def _read_batch_size(self, args: Any, kwargs: dict) -> tuple:
        """``(N, how it was read)`` from a call's inputs: ``batch_axis`` of the first tensor found, or
        ``batch_axis(args, kwargs)``; ``(None, "")`` without a tensor."""
        if callable(self.batch_axis):
            return check_int("batch_axis(args, kwargs)", self.batch_axis(args, kwargs), 1), "batch_axis(args, kwargs)"
        first = next((t for t in _tensors((args, kwargs))), None)
        if first is None:
            return None, ""
        if first.dim() <= self.batch_axis:
            raise ValueError(f"batch_axis must be an axis of the model's first input, of shape {tuple(first.shape)} "
                             f"(got {self.batch_axis}); pass batch_axis=callable(args, kwargs) -> N otherwise")
        how = f"batch_axis={self.batch_axis} of its first tensor, of shape {tuple(first.shape)}"
        return int(first.shape[self.batch_axis]), how

    def observe_batch(self, args: Any, kwargs: Optional[dict] = None) -> None:
        """Tell SENG this step's batch (as the Lightning callback does): its batch size ``N`` is ``batch_axis`` of
        the first tensor found, or ``batch_axis(args, kwargs)``. On a refresh step it is cross-checked with the
        model's first input (read the same way) and with the modules that declare their layout
        (:mod:`lightning_seng.axes`)."""
        self._check_attached("observe_batch()")
        n, how = self._read_batch_size(args, kwargs or {})
        if n is not None:
            self._sources.new_batch(n, how)

    def _refresh_batch(self) -> Tuple[Optional[int], bool]:
        """``(N, True)``: the batch size of this refresh where every source agrees (``None`` if none spoke), and
        each layer's sample axes from the structural probe (:mod:`lightning_seng.axes`). Where the sources
        disagree, or the probe finds the samples off a module's declared axis, gone from the model's output or
        breaking a forward that runs unresized, ``(None, False)``: the captured calls are dropped, one WARNING
        names the sources and the settings that fix it, and no layer gets curvature from this refresh (those
        with none are listed as falling back for that reason)."""
        n, disagreement = self._sources.take()
        self._output_axis = 0
        if disagreement is not None:
            disagreement = "its sources disagree: " + disagreement
        inputs, self._probe_inputs = self._probe_inputs, None
        probed = {name: None for name in self.layers}
        if disagreement is None and n is not None:
            result = self._probe.run(*inputs, n, self.batch_axis) if inputs is not None else \
                "the model's own forward did not run on this refresh step"
            if isinstance(result, str):
                if inputs is not None:
                    self._warn_once("axes:probe", "SENG: the structural probe of the sample axes could not run: "
                                                  f"{result}; each layer takes the one axis of the batch size in its "
                                                  "input, and falls back where there are several")
                probed = {name: ProbedAxes(why_not=f"the probe could not run: {result}") for name in self.layers}
            elif result.contradicted or result.output_lost:
                disagreement = "; ".join(result.contradicted + ([result.output_lost] if result.output_lost else []))
                disagreement = (f"in a shape-only forward of the model with its batch axis (size {n}) resized, "
                                + disagreement)
            else:
                probed = {name: self._probed(result, layer) for name, layer in self.layers.items()}
                self._output_axis = self._probed_output_axis(result)
        for name, layer in self.layers.items():
            layer.probed = probed[name]
        if disagreement is None:
            return n, True
        for name, layer in self.layers.items():
            layer.clear()
            if layer.curvature is None:
                self._reasons[name] = "the batch size of the refresh step was not confirmed (see the warning)"
        self._warn_once("axes:sources", f"SENG: the batch size of this refresh step is not confirmed, "
                        f"{disagreement}. No layer gets curvature from this refresh (the last good curvature is "
                        "kept, layers without one get g / (1 + damping)); set batch_axis to the axis of the model's "
                        "first input that counts the samples (batch_axis=1 for (T, N, ...) inputs, or a callable "
                        "(args, kwargs) -> N), or batch_first on the modules to the layout they are fed")
        return None, False

    def _probed_output_axis(self, result: ProbeResult) -> Any:
        """The probe's sample axis of the output module's output (``fisher="mc"``, built-in likelihoods); 0 where
        the probe did not see that shape."""
        shape = self._sampled.shape
        if self.fisher != "mc" or shape is None:
            return 0
        module = dict(self.model.named_modules())[self.output_module or ""]
        found = result.axes.get(id(module))
        return found.shapes.get(shape, 0) if found is not None else 0

    @staticmethod
    def _probed(result: ProbeResult, layer: LayerCurvature) -> ProbedAxes:
        """The probe's sample axes of all modules ``layer`` captures, in one table."""
        found = ProbedAxes()
        for module in layer.modules():
            for shape, axis in result.axes[id(module)].shapes.items():
                found.shapes[shape] = axis if found.shapes.get(shape, axis) == axis else "ambiguous"
        return found

    def observe_loss(self, loss: Tensor) -> None:
        """Before ``loss.backward()`` on a refresh step (the Lightning callback calls it): read from the loss's autograd
        graph how it weighs each sample (:func:`~lightning_seng.layers.identity.batch_weights`) to check the
        ``loss_reduction`` setting at the refresh; a graph that does not tell is not checked. Optional in a plain
        loop, where it costs a walk of the loss's last few graph nodes."""
        n = self._sources.current()
        if self.capturing and n is not None and isinstance(loss, Tensor):
            self._loss_weights = identity.batch_weights(loss, n)

    def remove(self) -> None:
        """Detach all hooks and drop captured tensors; the model is free for a new SENG. Calling it again does
        nothing; :meth:`step`, :meth:`observe_batch` and :meth:`adapt_damping` raise after it."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for layer in self.layers.values():
            layer.clear()
            layer.release()
            layer.watch.stop()
            layer.remove_hooks()
        for module in self._claimed:
            ref = _ATTACHED.get(module)
            if ref is not None and ref() is self:
                del _ATTACHED[module]
        self._claimed = []
        self._feedback = None
        self._probe_inputs = None  # the model's inputs of a refresh step that never stepped
        self._plan = None
        self._sampled = SampledPass(targets=self._sampled.targets)
        self.removed = True

    def __deepcopy__(self, memo: dict):
        raise TypeError("a SENG cannot be deep-copied: the copy would need hooks on a copy of the model. Deep-copy "
                        "the model and attach a new SENG to the copy (seng.state_dict() / load_state_dict carry the "
                        "curvature and counters over)")

    def __copy__(self):
        raise TypeError("a SENG cannot be copied: its hooks belong to one model. Attach a new SENG to the model "
                        "after remove(), or to a copy.deepcopy of it (state_dict / load_state_dict carry the state)")

    def __reduce_ex__(self, protocol):
        raise TypeError("a SENG cannot be pickled: its hooks belong to a live model (a pickled model carries them "
                        "as inert hooks). Save seng.state_dict() and attach a new SENG after loading the model")

    # ------------------------------------------------------------------ schedule
    @property
    def will_refresh(self) -> bool:
        """Whether the current step refreshes the curvature (and so the hooks capture)."""
        return self.step_count % self.settings.update_freq == 0

    @property
    def damping(self) -> float:
        return self.damping_schedule(self.step_count, self.epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = check_int("epoch", epoch, 0)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, loss_scale: float = 1.0) -> None:
        """Rewrite ``.grad`` of every trainable parameter with the SENG direction.

        Call after ``backward`` (and after unscaling AMP gradients), before ``optimizer.step()``.
        ``loss_scale`` is the factor the loss carried into backward relative to the batch loss
        (AMP scale / gradient-accumulation steps); captured output gradients are divided by it.
        """
        self._check_attached("step()")
        if isinstance(loss_scale, bool) or not isinstance(loss_scale, numbers.Real) or not 0 < loss_scale < math.inf:
            raise ValueError(f"loss_scale must be a finite number > 0 (got {loss_scale!r})")
        self._in_step = True
        refresh = self.will_refresh
        try:
            schedule = self.damping_schedule
            if isinstance(schedule, LevenbergMarquardt) and schedule.due(self.step_count):
                self._keep_for_feedback()
            if loss_scale != 1.0:  # .grad may have been unscaled in place, which its version counter does not show
                for layer in self.layers.values():
                    layer.release()
            self._step(loss_scale)
        finally:
            self._in_step = False
            self._sampled.edges = []  # the graph's nodes: not held past the step
            # between refreshes with no layer observed, no layer kept anything of this step (the hooks were idle)
            if refresh or self._observing:
                for layer in self.layers.values():
                    layer.release()
                    layer.watch.stop()
                # the curvatures changed, or a layer may have become unwatchable
                self._observing = self._observe and any([layer.watchable() for layer in self.layers.values()])

    @property
    def damping_feedback_due(self) -> bool:
        """Whether :meth:`adapt_damping` waits for this step's loss after the optimizer step (a
        :class:`~lightning_seng.schedules.LevenbergMarquardt` damping, on one of its measured steps)."""
        return self._feedback is not None

    def _keep_for_feedback(self) -> None:
        """Copies of the parameters and of their gradients before this step rewrites them (dense)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        self._feedback = (params, [p.detach().clone() for p in params],
                          [(p.grad.to_dense() if p.grad.is_sparse else p.grad).detach().clone() for p in params],
                          self.damping)

    def discard_feedback(self) -> None:
        """Drop the copies kept for :meth:`adapt_damping` (the damping stays where it is)."""
        self._feedback = None

    def adapt_damping(self, loss_before: float, loss_after: float) -> float:
        """Levenberg–Marquardt: the ratio ``ρ`` of the loss change the optimizer step made on this step's batch,
        ``loss_after − loss_before``, to the change the quadratic model predicts,
        ``M(δ) = gᵀδ + ½ δᵀ(F + λI)δ`` (``δ`` the parameters' move since :meth:`step`, ``g`` their gradient then,
        ``δᵀFδ = ‖Uδ‖²`` per layer with curvature and ``‖δ‖²`` for parameters that got ``g / (1 + λ)``), and λ moved
        by the schedule's rule. Call after ``optimizer.step()`` when :attr:`damping_feedback_due`, with the batch's
        loss before and after (the same batch, the same mode). Returns ``ρ`` (``nan`` when ``M(δ) ≥ 0``)."""
        self._check_attached("adapt_damping()")
        if self._feedback is None:
            raise ValueError("adapt_damping() has no step to judge: call it after a step for which "
                             "damping_feedback_due was True (damping=LevenbergMarquardt(...))")
        params, before, grads, damping = self._feedback
        self._feedback = None
        with torch.no_grad():
            deltas = {id(p): p.detach() - b for p, b in zip(params, before)}
            slopes = [torch.vdot(g.reshape(-1), deltas[id(p)].reshape(-1)) for p, g in zip(params, grads)]
            squares = {k: d.reshape(-1).dot(d.reshape(-1)) for k, d in deltas.items()}
            terms, seen = [], set()  # δᵀ(F + λ_l I)δ of each layer with curvature
            for layer in self.layers.values():
                cur = layer.curvature
                mine = layer.trainable_params(layer.trainable())
                if cur is None or not mine or any(id(p) not in deltas for p in mine):
                    continue
                norm = layer.curvature_norm([deltas[id(p)] for p in mine])
                if norm is None:
                    continue
                terms.append(norm.to(torch.float64) + damping * cur.scale * sum(squares[id(p)] for p in mine))
                seen.update(id(p) for p in mine)
            rest = [squares[k] for k in deltas if k not in seen]  # parameters that got g / (1 + λ): F = I
            model = torch.stack(slopes).sum(dtype=torch.float64) + 0.5 * (
                sum(terms, torch.zeros((), dtype=torch.float64))
                + (1.0 + damping) * (torch.stack(rest).sum(dtype=torch.float64) if rest else 0.0))
            predicted = float(model)
        change = float(loss_after) - float(loss_before)
        if not math.isfinite(change):
            rho = -math.inf
        elif predicted < 0:
            rho = change / predicted
        else:
            rho = math.nan
        self._stats["lm_rho"] = rho
        self._stats["damping"] = self.damping_schedule.update(rho)
        return rho

    def _step(self, loss_scale: float) -> None:
        damping = self.damping
        refresh = self.will_refresh
        with_grad = self._with_grad()
        params = [p for _, p in with_grad]
        every = self.stats_every
        records = refresh if every is None else self.step_count % every == 0
        if (not records and self.skip_nonfinite and type(self.comm) is Communicator
                and not any(p.grad.is_sparse for p in params)):
            if refresh:  # a refresh reads whether the gradient is finite: it decides whether to build curvature
                grads_finite = bool(self._finite([_entries(p.grad) for p in params]))
                self._refresh(damping, loss_scale, grads_finite)
                if not grads_finite:
                    self._zero_nonfinite()
                    self.step_count += 1
                    return
            self._step_in_place(with_grad, damping, checked=refresh)
            self.step_count += 1
            return
        squares = self._grad_squares(params)
        # Only a refresh step reads whether the gradient is finite (it decides whether to build curvature);
        # other steps keep it on the device and select with torch.where, so they never wait for the GPU.
        finite = torch.isfinite(squares).all()
        # sparse gradients (nn.Embedding(sparse=True)) cannot be selected by torch.where: read then too
        known = refresh or any(p.grad.is_sparse for p in params)
        if known:
            grads_finite = bool(finite)
            if refresh:
                self._refresh(damping, loss_scale, grads_finite)
            if not grads_finite:
                self._zero_nonfinite()
                self.step_count += 1
                return

        directions: Dict[str, Optional[List[Tensor]]] = {}
        for name, layer in self.layers.items():
            if not self.comm.owns(name):
                directions[name] = None
                continue
            d = layer.direction(damping)
            if d is None:
                params_l = self._without_curvature(name, layer)
                d = [p.grad.to(self.curvature_dtype) / (1.0 + damping) if p.grad is not None else None
                     for p in params_l]
            directions[name] = d
        directions = self.comm.reduce_directions(directions)

        pairs = []
        for name, layer in self.layers.items():
            d = directions.get(name)
            if d is not None:
                pairs += [(p, dp) for p, dp in zip(layer.trainable_params(layer.trainable()), d)
                          if p.grad is not None and dp is not None]
        others = self._other_grads(with_grad)
        index = {id(p): i for i, p in enumerate(params)}
        self._record(pairs, others, squares, index, damping)
        if known:  # finite
            for p, dp in pairs:
                p.grad.copy_(dp)
            if others:
                torch._foreach_div_([p.grad for p in others], 1.0 + damping)
        else:
            self._write_where_finite(pairs, others, finite, damping)
        self.step_count += 1

    def _with_grad(self) -> List[tuple]:
        """``(name, parameter)`` of every parameter with a gradient, as ``model.named_parameters()`` gives them (each
        shared parameter once, under its first name). The walk over the module tree is kept, and taken again
        whenever a module's children or the names of its parameters are not what they were (a module or parameter
        added or deleted, a module put in place of another); the parameters are read from each module afresh, so
        one put in place of another is seen at once."""
        walk = self._walk
        if not walk or any(tuple(m._parameters) != keys or tuple(m._modules.values()) != kids
                           for m, keys, kids, _ in walk):
            walk = self._walk = [(m, tuple(m._parameters), tuple(m._modules.values()),
                                  [(f"{prefix}.{k}" if prefix else k, k) for k in m._parameters])
                                 for prefix, m in self.model.named_modules()]
        seen, out = set(), []
        for m, _, _, names in walk:
            params = m._parameters
            for name, k in names:
                p = params[k]
                if p is not None and p.grad is not None and id(p) not in seen:
                    seen.add(id(p))
                    out.append((name, p))
        return out

    def _without_curvature(self, name: str, layer: LayerCurvature) -> List[nn.Parameter]:
        """The trainable parameters of a layer that has no usable curvature this step (they get
        ``g / (1 + λ)``); a layer whose parameters have gradients but whose forward never ran on a refresh
        step is announced."""
        params = layer.trainable_params(layer.trainable())
        if (layer.curvature is None and not layer.captured and name not in self._reasons
                and any(p.grad is not None for p in params)):
            self._fall_back(name, "its parameters have gradients but its forward did not run on a refresh "
                                  "step (are they used outside the module's forward?)")
        return params

    def _step_in_place(self, with_grad: List[tuple], damping: float, checked: bool) -> None:
        """A step that records no statistics (one process, ``skip_nonfinite``): every direction is written into
        ``.grad`` in place. Unless the gradient is known to be finite (``checked``: a refresh step read it), a
        non-finite one is handled on the device (all gradients zeroed), so nothing is read back to the host.
        Between refreshes the layers with a plain route take the fused step (:mod:`lightning_seng.fused`)."""
        self._stats["damping"] = damping
        grads = [p.grad for _, p in with_grad]
        if not grads:
            return
        plan = None if checked else self._step_plan(with_grad, damping)
        if plan is not None:
            self._fused_step(plan, damping)
            return
        finite = None if checked else self._finite(grads)
        for name, layer in self.layers.items():
            self._direction_(name, layer, damping)
        others = self._other_grads(with_grad)
        if others:
            torch._foreach_div_([p.grad for p in others], 1.0 + damping)
        if finite is not None:
            torch._foreach_mul_(grads, finite.to(torch.float32))
            for g in grads:
                g.nan_to_num_(0.0, 0.0, 0.0)
            self._finite_flags.append(finite)

    def _direction_(self, name: str, layer: LayerCurvature, damping: float) -> None:
        """The layer's direction written into its ``.grad``; ``g / (1 + λ)`` where it has no usable curvature."""
        if not layer.direction_(damping):
            for p in self._without_curvature(name, layer):
                if p.grad is not None:
                    p.grad.div_(1.0 + damping)

    def _step_plan(self, with_grad: List[tuple], damping: float) -> Optional[fused.StepPlan]:
        """The fused step's plan for this step: kept while the curvatures, the trainable parameters and the
        parameters with a gradient stay what they were when it was built, its damping moved to this step's (which
        needs a new plan only where a layer without an eigendecomposition is in it); else built again (``None``
        when no layer has a plain route: the per-layer path)."""
        key = (tuple(id(p) for _, p in with_grad), tuple(p.requires_grad for _, p in with_grad),
               tuple(id(layer.curvature) for layer in self.layers.values()))
        plan = self._plan
        if plan is not None and plan.key == key and plan.fixed_damping in (None, damping):
            plan.set_damping(damping)
            return plan
        self._plan = None
        usable, without = [], []
        for name, layer in self.layers.items():
            cur = layer.curvature
            if cur is None or layer.trainable() != cur.mask or layer.falls_back_whole():
                without += [p for p in self._without_curvature(name, layer) if p.grad is not None]
            elif any(p.grad is None for p in layer.trainable_params(cur.mask)):
                return None  # a gradient missing: the per-layer path decides
            else:
                usable.append((name, layer))
        without += self._other_grads(with_grad)
        plan = fused.build_plan(usable, without, damping)
        if plan is not None:
            # the curvatures kept alive with the plan: their ids in the key cannot be taken by new ones
            plan.key, plan.curvatures = key, [layer.curvature for layer in self.layers.values()]
            self._plan = plan
        return plan

    def _fused_step(self, plan: "fused.StepPlan", damping: float) -> None:
        """The step between refreshes through ``plan``: the fused tensor work, then the layers that keep their own
        path; the non-finite guard inside the fused work where no layer keeps its own path, else after them."""
        grads = [p.grad for p in plan.params] + [p.grad for p in plan.rest_params]
        eager = self.compile_step is None
        us = None
        if eager and any(layer.batch is not None for layer in plan.linear_layers):
            # U g' from the Linear layers' own batch, where that is exactly their gradient and cheaper
            us = [None if layer.batch is None else
                  layer.batch_u_dot(layer.curvature, layer.grad_parts(layer.curvature.mask, layer.curvature.gram.dtype))
                  for layer in plan.linear_layers]
        # Where every gradient is in host memory, reading the flag waits for nothing: the gradients are zeroed only
        # when it is set, instead of a pass over all of them on every step. Elsewhere on the device: after the
        # rest have written theirs, or inside the fused work where there is no rest.
        host = eager and plan.host_readable
        guard = not plan.rest and not host
        found = self._run_plan(*plan.arguments(grads, us), guard=guard)
        for name, layer in plan.rest:
            self._direction_(name, layer, damping)
        if host:
            if found.item():
                fused.clear_nonfinite_(grads, found)
        elif not guard:
            fused.clear_nonfinite_(grads, found)
        self._finite_flags.append(found)

    @staticmethod
    def _finite(grads: List[Tensor]) -> Tensor:
        """Whether every gradient is finite, as a 0-dim bool tensor on the device: NaN and ±Inf reach the sum of
        each gradient (one read pass, accumulated in at least float32; only a sum beyond float32's range, about
        3.4e38, would count a finite gradient as non-finite). A plain sum: on a CPU an L1 or L2 norm is several
        times slower."""
        groups: Dict[torch.dtype, List[Tensor]] = {}
        for g in grads:
            groups.setdefault(g.dtype, []).append(
                g.sum(dtype=torch.float32) if g.dtype in (torch.float16, torch.bfloat16) else g.sum())
        totals = [torch.stack(sums).to(torch.float64).sum() for sums in groups.values()]
        return torch.isfinite(totals[0] if len(totals) == 1 else torch.stack(totals).sum())

    def _write_where_finite(self, pairs, others: List[nn.Parameter], finite: Tensor, damping: float) -> None:
        """Non-refresh steps: the directions where the gradient is finite; otherwise zeros
        (``skip_nonfinite``) or the raw gradient, decided on the device."""
        for p, dp in pairs:
            fill = 0.0 if self.skip_nonfinite else p.grad.to(dp.dtype)
            p.grad.copy_(torch.where(finite, dp, fill))
        if others:
            grads = [p.grad for p in others]
            scale = torch.where(finite, 1.0 / (1.0 + damping), 0.0 if self.skip_nonfinite else 1.0)
            torch._foreach_mul_(grads, scale)
            if self.skip_nonfinite:  # 0 · NaN is NaN: clear what the scale could not
                bad = ~finite
                for g in grads:
                    g.masked_fill_(bad, 0.0)
        self._finite_flags.append(finite)

    def _other_grads(self, with_grad: List[tuple]) -> List[nn.Parameter]:
        """Trainable parameters with a gradient that no layer writes this step (they get ``g / (1 + λ)``): those of
        unsupported modules, any added to the model after SENG was attached (they have no hooks), and any put in
        place of a layer's parameter after attach (``module.weight = nn.Parameter(...)``: the layer leaves that slot
        alone, see :meth:`~lightning_seng.layers.base.LayerCurvature.replaced_slots`)."""
        others, late = [], []
        written = self._written(with_grad)
        for name, p in with_grad:
            if not p.requires_grad or id(p) in written:
                continue
            ref = self._attached.get(id(p))
            if ref is None or ref() is not p:
                self._attached[id(p)] = weakref.ref(p)
                self.other_params.append(p)
                late.append(name)
            others.append(p)
        if late:
            self._announce_late(late)
        return others

    def _written(self, with_grad: List[tuple]) -> set:
        """``id`` of each parameter some layer holds in a slot it held at attach (whether trainable or not): with
        ``requires_grad``, the layer writes its ``.grad``. Recomputed only when the parameters with a gradient
        change (a parameter replaced or added shows up there), so a plain step pays one tuple of ids."""
        key = tuple(id(p) for _, p in with_grad)
        if self._written_cached[0] != key:
            held = {id(q) for layer in self.layers.values() for q in layer.parameters()}
            self._written_cached = key, held
        return self._written_cached[1]

    def _announce_late(self, late: List[str]) -> None:
        """One WARNING for parameters added or put in place of another after attach, and one per layer that had
        one of its parameters replaced, saying what that layer does now."""
        self._warn_once("late:" + ",".join(late),
                        "SENG: parameters added or replaced after SENG was attached get g / (1 + damping): "
                        f"{', '.join(repr(n) for n in late)}; create SENG again to precondition them")
        for name, layer in self.layers.items():
            if not layer.replaced_slots():
                continue
            if layer.falls_back_whole():
                self._fall_back(name, "a parameter it shares between modules was replaced after SENG was attached")
            else:
                self._warn_once(f"replaced:{name}", f"SENG: layer '{name}' ({type(layer.module).__name__}) had a "
                                "parameter replaced after SENG was attached; its other parameters get g / (1 + damping) "
                                "until its next curvature refresh, then exact curvature over them alone")

    def _grad_squares(self, params: List[nn.Parameter]) -> Tensor:
        """``‖grad‖²`` of every parameter with a gradient, ``(P,)`` float64, from one fused norm accumulated in
        float64 (a large but finite gradient does not overflow); NaN/Inf where a gradient holds one."""
        if not params:
            return torch.zeros(0, dtype=torch.float64)
        return torch.stack(torch._foreach_norm([_entries(p.grad) for p in params], 2, dtype=torch.float64)).square()

    def _record(self, pairs, others: List[nn.Parameter], squares: Tensor, index: Dict[int, int],
                damping: float) -> None:
        """``stats``: ‖g‖, ‖d‖ and cos(g, d) over all trainable parameters (``squares``: ‖g‖² per parameter,
        taken before the gradients were rewritten, at ``index[id(param)]``). Kept as tensors: read only when
        ``stats`` is read."""
        zero = squares.new_zeros(())
        g_sq = d_sq = dot = zero
        if pairs:
            known = [index[id(p)] for p, _ in pairs if id(p) in index]
            # a layer whose module left the model after attach is not in squares: measure it here
            g_sq = squares[known].sum() + sum((p.grad.double().square().sum() for p, _ in pairs if id(p) not in index),
                                             zero)
            d_sq = torch.stack(torch._foreach_norm([dp for _, dp in pairs], 2, dtype=torch.float64)).square().sum()
            dot = torch.stack([torch.vdot(p.grad.reshape(-1).to(dp.dtype), dp.reshape(-1)).double()
                               for p, dp in pairs]).sum()
        if others:
            s = squares[[index[id(p)] for p in others]].sum()
            g_sq, d_sq, dot = g_sq + s, d_sq + s / (1 + damping) ** 2, dot + s / (1 + damping)
        self._stats.update(damping=damping, grad_norm=g_sq.sqrt(), direction_norm=d_sq.sqrt(),
                           cosine=dot / (g_sq * d_sq).sqrt().clamp_min(1e-300))

    @property
    def stats(self) -> Dict[str, float]:
        """The statistics as numbers: ``damping`` (the last step's); ``grad_norm``, ``direction_norm``, ``cosine`` (of
        the last step that measured them: every ``stats_every``-th step, or refresh steps);
        ``coverage`` (% of trainable parameters with curvature), ``refresh_time``, ``skipped_refreshes``,
        ``nonfinite_steps`` and ``layers/<route>``. Reading it waits for the device: read it on logging steps."""
        self._count_nonfinite()
        return {k: float(v) if isinstance(v, Tensor) else v for k, v in self._stats.items()}

    @property
    def nonfinite_steps(self) -> int:
        self._count_nonfinite()
        return self._nonfinite_steps

    def _count_nonfinite(self) -> None:
        """Fold the non-refresh steps' device-side count of non-finite gradients into the counter."""
        flags, self._finite_flags = self._finite_flags, []
        # a bool flag: whether the step's gradient was finite; the fused step's float flag: nonzero where it was not
        pending = int(torch.stack([(~f if f.dtype == torch.bool else f.reshape(()) != 0) for f in flags]).sum()) \
            if flags else 0
        if pending:
            self._nonfinite_steps += pending
            self._warn_once("grad", f"SENG: non-finite gradient on {pending} step(s) between curvature refreshes; "
                                    "those steps' gradients were zeroed (counted in stats['nonfinite_steps'])"
                            if self.skip_nonfinite else
                            f"SENG: non-finite gradient on {pending} step(s) between curvature refreshes "
                            "(counted in stats['nonfinite_steps'])")
        self._stats["nonfinite_steps"] = self._nonfinite_steps

    def _zero_nonfinite(self) -> None:
        self._nonfinite_steps += 1
        if "grad" not in self._warned:
            names = list(dict.fromkeys(name.rpartition(".")[0] for name, p in self.model.named_parameters()
                                       if p.grad is not None and not bool(torch.isfinite(_entries(p.grad)).all())))
            where = ", ".join(f"'{n}'" for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            self._warn_once("grad", f"SENG: non-finite gradient in layer {where}; this step's gradients are "
                                    "zeroed (counted in stats['nonfinite_steps'])")
        if self.skip_nonfinite:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.zero_()

    def _refresh(self, damping: float, loss_scale: float, grads_finite: bool) -> None:
        start = time.perf_counter()
        self._count_nonfinite()  # a refresh reads the device anyway
        pick = self._sample_picker()
        n, agreed = self._refresh_batch()
        weights, self._loss_weights = self._loss_weights, None
        mismatch = None if weights is None or n is None else identity.reduction_mismatch(
            weights, loss_scale, n, self.loss_reduction)
        factors = {}
        failure = self._sampled_failure(n) if self.fisher == "mc" and agreed else None
        self._sampled = SampledPass(targets=self._sampled.targets)  # read: the next refresh starts afresh
        for name, layer in self.layers.items():
            if failure is not None:  # no Monte-Carlo rows from this refresh: layers with a gradient fall back
                layer.clear()
                factors[name] = None
                if any(p.grad is not None for p in layer.trainable_params(layer.trainable())):
                    self._fall_back(name, failure)
                continue
            try:
                factors[name] = layer.take_factors(loss_scale, self.curvature_dtype, pick, n)
            except NotExact as reason:
                factors[name] = None
                self._fall_back(name, str(reason))
        if mismatch is not None:  # every layer's U would be scaled by N or 1/N: none gets curvature
            self._warn_once("reduction", f"SENG: {mismatch}; no layer gets curvature from this refresh (they get "
                                         "g / (1 + damping))")
            for name in self.layers:
                self.layers[name].curvature = None
                self._reasons[name] = mismatch
            factors = dict.fromkeys(factors)
        if not grads_finite or not agreed:  # this batch is bad as a whole: keep the last good curvature, build nothing
            factors = dict.fromkeys(factors)
        self._check_identities(factors)
        factors = self.comm.gather_factors(factors)
        prepared = {name: (f, *self.layers[name].prepare(f, self.loss_reduction, self.settings, self.generator))
                    for name, f in factors.items() if f is not None}
        scales = dict(zip(prepared, self._damping_scales([gram for _, _, gram in prepared.values()])))
        self._resolve(prepared, {name: damping * scale for name, scale in scales.items()})
        grams = [gram for _, _, gram in prepared.values()]
        scales = [scales[name] for name in prepared]
        # layers that share N are factorised in one batched Cholesky, its status read once
        chols = sketch.damped_cholesky_batch(grams, [damping * scale for scale in scales])
        # under a damping schedule every step has another λ: an eigendecomposition now serves them all
        # between refreshes without a factorisation or a host read per layer and step
        scheduled = not isinstance(self.damping_schedule, ConstantDamping) and prepared
        eigens = sketch.eigen_batch([gram for (_, _, gram), chol in zip(prepared.values(), chols)
                                     if chol is not None]) if scheduled else []
        eigens = iter(eigens)
        built: Dict[str, Curvature] = {}
        bad = []
        for (name, (f, route, gram)), chol, scale in zip(prepared.items(), chols, scales):
            if chol is None:
                bad.append(name)
            else:
                built[name] = Curvature(route, gram, chol, damping * scale, f.mask,
                                        next(eigens) if scheduled else None, scale=scale)
        if self.comm.agree(not bad and grads_finite and agreed):
            for name, cur in built.items():
                self.layers[name].curvature = cur
                self._reasons.pop(name, None)
                if pick is None and self.fisher == "empirical":  # U's rows are this step's samples, all of them
                    self.layers[name].refreshed_from_batch(sample_scale(cur.gram.shape[0], self.loss_reduction))
        else:
            self.skipped_refreshes += 1
            for name in bad:
                self._warn_once(name, f"SENG: non-finite curvature in layer '{name}'; refresh skipped, "
                                      "the last good factors are kept")
        routes = {key: 0 for key in ROUTES + ("norm", "diagonal", "remote")}
        for name, layer in self.layers.items():
            key = self._route_key(name, layer)
            routes[key] = routes.get(key, 0) + 1
        self._stats.update({f"layers/{k}": v for k, v in routes.items()})
        self._stats["coverage"] = self._coverage_percent()
        self._stats["kept_bytes"] = sum(self.kept_bytes().values())
        self._stats["skipped_refreshes"] = self.skipped_refreshes
        self._stats["refresh_time"] = time.perf_counter() - start

    def _check_identities(self, factors: Dict[str, Optional[Any]]) -> None:
        """The runtime identities (:func:`~lightning_seng.layers.identity.failures`) over the layers with factors: a
        layer that fails builds nothing from this refresh and falls back, announced."""
        for name, why in identity.failures(factors).items():
            factors[name] = None
            self._fall_back(name, why)

    def _resolve(self, prepared: Dict[str, tuple], dampings: Dict[str, float]) -> None:
        """Numerics (:func:`~lightning_seng.layers.identity.resolves`): a float32 layer is prepared again in float64 (its curvature is kept
        and applied in float64); one that float64 cannot resolve either falls back. Said once per layer. One
        host read for all layers."""
        if not prepared:
            return
        names = list(prepared)
        grams = [prepared[name][2] for name in names]
        traces = torch.stack([g.diagonal().sum().to(torch.float64).to(grams[0].device) for g in grams]).tolist()
        for name, trace in zip(names, traces):
            lam = dampings[name]
            f, _, gram = prepared[name]
            if identity.resolves(gram.dtype, trace, lam):
                continue
            cond = (trace + lam) / lam
            if gram.dtype != torch.float64 and identity.resolves(torch.float64, trace, lam):
                wide = f.to(torch.float64)
                prepared[name] = (wide, *self.layers[name].prepare(wide, self.loss_reduction, self.settings,
                                                                  self.generator))
                self._warn_once(f"float64:{name}", f"SENG: layer '{name}': the damping {lam:.3g} is small against its "
                                f"curvature (tr UUᵀ = {trace:.3g}, condition up to {cond:.3g}), beyond what "
                                f"{gram.dtype} resolves; its curvature is kept and applied in float64")
                continue
            del prepared[name]
            self._fall_back(name, f"the damping {lam:.3g} is small against its curvature (tr UUᵀ = {trace:.3g}, "
                                  f"condition up to {cond:.3g}), beyond what float64 resolves; raise the damping")

    def _damping_scales(self, grams: List[Tensor]) -> List[float]:
        """Per Gram matrix, the factor on the damping: 1, or under ``relative_damping`` its mean eigenvalue
        ``tr(K)/N`` (one read for all; 1 where that is not a positive finite number)."""
        if not self.relative_damping or not grams:
            return [1.0] * len(grams)
        means = torch.stack([g.diagonal().mean().to(torch.float64) for g in grams]).tolist()
        return [m if math.isfinite(m) and m > 0 else 1.0 for m in means]

    def _route_key(self, name: str, layer: LayerCurvature) -> str:
        if not self.comm.owns(name):
            return "remote"  # another rank owns it (global mode)
        cur = layer.curvature
        if cur is None:
            return "diagonal"
        return cur.route.name if layer.kind in ("linear", "conv") else layer.kind

    def _fall_back(self, name: str, reason: str) -> None:
        """Layer ``name`` gets ``g / (1 + λ)`` until a refresh succeeds; said once per layer at WARNING level."""
        self.layers[name].curvature = None
        self._reasons[name] = reason
        self._warn_once(f"fallback:{name}", f"SENG: no exact curvature for '{name}' "
                        f"({type(self.layers[name].module).__name__}): {reason}; it gets g / (1 + damping)")

    # ------------------------------------------------------------------ coverage
    def _coverage_percent(self) -> float:
        """``coverage().percent``, recomputed only when what it depends on changed: the trainable parameters
        and the layers that fall back (a refresh on every step would otherwise walk the model each time)."""
        key = (tuple(p.requires_grad for p in self.model.parameters()), tuple(sorted(self._reasons)))
        if self._coverage_cached[0] != key:
            self._coverage_cached = key, self.coverage().percent
        return self._coverage_cached[1]

    def coverage(self) -> Coverage:
        """One row per module with trainable parameters: its route (before the first refresh, the layer
        kind; after, ``kind/route``), its parameter count and whether it has curvature (see
        :mod:`lightning_seng.coverage`). ``str()`` of the result is a table."""
        rows: List[CoverageRow] = []
        seen: set = set()
        modules = dict(self.model.named_modules())
        names = {id(m): n for n, m in modules.items()}
        # a layer may cover parameters registered on other modules: a weight tied between modules (hooked on
        # each of them), a parametrization's (on the layer of the module it parametrizes)
        layer_of = {id(q): n for n, layer in self.layers.items() for q in layer.parameters()}
        for name, module in modules.items():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
            seen |= {id(p) for p in own}
            kind = type(module).__name__
            for lname in dict.fromkeys(layer_of[id(p)] for p in own if id(p) in layer_of):
                layer = self.layers[lname]
                covered = [p for p in own if layer_of.get(id(p)) == lname]
                others = [names.get(id(m), "?") for m in layer.modules() if m is not module]
                ok = lname not in self._reasons
                note = self._reasons.get(lname, "")
                if not note and isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
                    note = "batch statistics as constants"  # the SENG authors' reading (README, BatchNorm)
                if not note and lname != name:
                    note = f"tied to '{lname}'" if any(m is module for m in layer.modules()) else f"with '{lname}'"
                elif not note and others:
                    note = "shared with " + ", ".join(map(repr, others))
                rows.append(CoverageRow(name, kind, self._route_label(lname, layer) if ok else "fallback",
                                        _numel(covered), ok, note))
            rest = [p for p in own if id(p) not in layer_of]
            if rest:
                notes = [self._fallbacks[name]] if name in self._fallbacks else []
                tied = sorted({m for p in rest for m in self._shared.get(id(p), ()) if m != name})
                if tied:
                    notes.append("shared with " + ", ".join(repr(m) for m in tied))
                rows.append(CoverageRow(name, kind, "fallback", _numel(rest), False, "; ".join(notes)))
        return Coverage(rows)

    def kept_bytes(self) -> Dict[str, int]:
        """Bytes each layer keeps between refreshes (its committed curvature: factors or ``U``, ``UUᵀ`` and its
        Cholesky factor), by layer name; layers without curvature keep none; under ``"(step plan)"`` what the
        fused step between refreshes keeps besides (:mod:`lightning_seng.fused`: stacked blocks, ``U`` built from
        small Gram factors, the stacked inverses or eigenvectors). Sum it for the total."""
        kept = {name: 0 if layer.curvature is None else layer.curvature.nbytes for name, layer in self.layers.items()}
        if self._plan is not None:
            kept["(step plan)"] = self._plan.built_bytes
        return kept

    def _route_label(self, name: str, layer: LayerCurvature) -> str:
        if not self.comm.owns(name):
            return f"{layer.kind} (rank {self.comm.owners[name]})" if hasattr(self.comm, "owners") else layer.kind
        cur = layer.curvature
        if not isinstance(layer, MatrixLayer):
            return layer.kind
        if cur is None:
            return pending_route(layer.kind, self.settings.route)  # chosen at the refresh
        return f"{layer.kind}/{cur.route.name}"  # the route Linear/Conv chose by cost

    def _announce_coverage(self, table: bool = True) -> None:
        cov = self.coverage()
        if table:
            log.info("SENG coverage:\n%s", cov.table())
        falling = cov.fallbacks()
        if falling:
            log.warning("SENG: %s: %s", cov.summary(), ", ".join(
                f"'{r.module}' ({r.type}{': ' + r.note if r.note else ''})" for r in falling))

    def _sample_picker(self) -> Optional[Callable[[int], Optional[tuple]]]:
        """For ``curvature_samples = m``: ``pick(N)`` gives the rows to keep of an ``N``-sample batch (the same
        rows for every layer of this refresh) and the factor for the output gradients: ``N/m`` under mean
        reduction, so that the kept rows are those of the mean loss over the ``m`` samples."""
        m = self.curvature_samples
        if m is None:
            return None
        chosen: Dict[int, Optional[tuple]] = {}

        def pick(n: int) -> Optional[tuple]:
            if n not in chosen:
                chosen[n] = None if m >= n else (
                    sketch.sample_indices(n, m, self.generator, torch.device("cpu")),
                    n / m if self.loss_reduction == "mean" else 1.0)
            return chosen[n]
        return pick

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Step, epoch, counters, the sketch RNG state and every layer's committed curvature."""
        return {
            "step_count": self.step_count,
            "epoch": self.epoch,
            "skipped_refreshes": self.skipped_refreshes,
            "nonfinite_steps": self.nonfinite_steps,
            "generator": self.generator.get_state(),
            **({"damping_schedule": self.damping_schedule.state_dict()}
               if isinstance(self.damping_schedule, LevenbergMarquardt) else {}),
            "layers": {name: layer.curvature.state_dict() for name, layer in self.layers.items()
                       if layer.curvature is not None},
            "shapes": {name: [list(shape) if isinstance(shape, tuple) else shape for shape in _slot_shapes(layer)]
                       for name, layer in self.layers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`. Raises ``ValueError`` if the state has curvature for a layer this model lacks,
        or if a layer's parameters differ from those the state was saved with (shapes, a bias present or absent),
        naming the first such layer and both; nothing is changed then. A state saved before the shapes were
        recorded is checked on what its curvature shows (which parameters it covered)."""
        unknown = set(state["layers"]) - set(self.layers)
        if unknown:
            raise ValueError(f"SENG state has curvature for layers this model lacks: {sorted(unknown)}")
        self._check_layer_shapes(state)
        self.step_count = int(state["step_count"])
        self.epoch = int(state["epoch"])
        self.skipped_refreshes = int(state["skipped_refreshes"])
        self._nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self._finite_flags = []
        self._stats.update(skipped_refreshes=self.skipped_refreshes, nonfinite_steps=self._nonfinite_steps)
        self.generator.set_state(state["generator"])
        if isinstance(self.damping_schedule, LevenbergMarquardt) and "damping_schedule" in state:
            self.damping_schedule.load_state_dict(state["damping_schedule"])
        self._feedback = None
        for name, layer in self.layers.items():
            layer.clear()
            cur = state["layers"].get(name)
            layer.curvature = None if cur is None else Curvature.from_state(cur)
        self._observing = self._observe  # new curvatures: decided again at the end of the next step

    def _check_layer_shapes(self, state: dict) -> None:
        saved = state.get("shapes")
        for name, layer in self.layers.items():
            now = _slot_shapes(layer)
            if saved is not None and name in saved:
                was = [shape if shape is None or isinstance(shape, str) else tuple(shape) for shape in saved[name]]
                lazy = any(shape == "lazy" for shape in list(was) + now)
                if not lazy and was != now:
                    raise ValueError(f"SENG state does not fit layer '{name}' ({type(layer.module).__name__}): its "
                                     f"parameter shapes (in slot order, None for an absent one) were {was} in the "
                                     f"saved state and are {now} in this model")
            cur = state["layers"].get(name)
            if cur is not None:
                mask = tuple(bool(m) for m in cur["mask"])
                if len(mask) != len(now) or any(m and shape is None for m, shape in zip(mask, now)):
                    raise ValueError(f"SENG state does not fit layer '{name}' ({type(layer.module).__name__}): its "
                                     f"saved curvature covers the parameter slots {list(mask)}, this model's "
                                     f"parameter shapes are {now} (None: absent)")

    def __repr__(self) -> str:
        s = self.settings
        return (f"SENG(layers={len(self.layers)}, damping={self.damping_schedule!r}, update_freq={s.update_freq}, "
                f"sketch_size={s.sketch_size}, column_sample_size={s.column_sample_size}, curvature_samples={self.curvature_samples}, svd_rank={s.svd_rank}, route={s.route!r}, "
                f"loss_reduction={self.loss_reduction!r}, fisher={self.fisher!r}"
                + (f", likelihood={self.likelihood!r}, output_module={self.output_module!r}" if self.fisher == "mc" else "")
                + ")")
