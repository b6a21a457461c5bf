"""The module hooks SENG registers: small objects, one class per hook kind, that dispatch to SENG and a layer.

They are objects rather than closures for two reasons:

- a model keeps its hooks in its ``_forward_hooks`` / ``_forward_pre_hooks`` dicts, so pickling the model
  (``torch.save(model)``) or ``copy.deepcopy(model)`` reaches them. A live hook pickles and deep-copies as an
  :class:`InertHook`: a saved, loaded or copied model carries no hook that feeds the SENG attached to the
  original (a copy is a new model, to which a new SENG may attach);
- ``torch.compile``: each hook's ``__call__`` is ``torch._dynamo.disable``-d, so Dynamo never traces into it.
  Traced inline, a hook graph-breaks on its side effects (detached inputs kept, tensor hooks registered) and
  Dynamo compiles the rest of the hook as a frame of its own, guarded on what it read: SENG's step counter
  (``will_refresh``) and the hook's closure or instance. Measured on an MLP of ten equal Linear layers: the
  closures and an undisabled hook object both recompiled as the step counter moved (2 recompilations over 6
  steps and over 40; the reported case reached ``recompile_limit``); disabled, none (``tests/test_lifecycle.py``). What stays
  is the graph break at each hooked module: Dynamo compiles each module's ``forward`` as its own frame, and
  torch guards those on the parameters' shapes, so layers of distinct shapes each compile it once.

``torch._dynamo`` is imported with this module, i.e. by ``import lightning_seng`` (about 1.1 s here, on top of
torch's 1.1 s), on purpose: besides the ``disable`` above, the sample-axis probe (:mod:`lightning_seng.axes`)
builds a ``FakeTensorMode``, which imports Dynamo, and a process that imports Dynamo for the first time after
``torch.distributed.init_process_group`` (gloo) aborted at exit ("terminate called without an active exception")
in 2 of 15 two-process runs here, against 0 of 30 when Dynamo was imported before the process group. Imported
up front, it precedes the group in every launcher that imports the library first.

A hook holds its SENG weakly: a SENG that its user no longer references is collected, its hooks then do
nothing (and are removed with it), and the model is free for a new SENG.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
import torch._dynamo

if TYPE_CHECKING:
    from .layers.base import LayerCurvature
    from .preconditioner import SENG


def remove_handles(handles: list) -> None:
    """Remove hook handles (a SENG's, when it is collected without :meth:`~lightning_seng.SENG.remove`)."""
    for handle in handles:
        handle.remove()


class InertHook:
    """What a SENG hook becomes in a pickled or deep-copied model: it does nothing."""

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __repr__(self) -> str:
        return "InertHook()"


class _LiveHook:
    """Base of the live hooks: pickled and deep-copied as an :class:`InertHook` (never the SENG behind them)."""

    __slots__ = ()

    def __reduce__(self):
        return InertHook, ()

    def __deepcopy__(self, memo: dict) -> InertHook:
        return InertHook()

    def __copy__(self) -> InertHook:
        return InertHook()


class ForwardHook(_LiveHook):
    """Forward hook (with kwargs) on a layer's module: capture on refresh steps, observe on every step while a
    layer may be watched (``SENG._observing``); between refreshes with nothing to watch it returns at once."""

    __slots__ = ("seng", "layer")

    def __init__(self, seng: "SENG", layer: "LayerCurvature"):
        self.seng, self.layer = weakref.ref(seng), layer

    @torch._dynamo.disable
    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        seng = self.seng()
        if seng is not None and (seng._observing or seng.will_refresh):
            seng._forward(self.layer, args, kwargs, output)


class ForwardPreHook(_LiveHook):
    """Forward pre-hook (with kwargs) for layers that note something before a call (``before_call``)."""

    __slots__ = ("seng", "layer")

    def __init__(self, seng: "SENG", layer: "LayerCurvature"):
        self.seng, self.layer = weakref.ref(seng), layer

    @torch._dynamo.disable
    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seng = self.seng()
        if seng is not None and seng.capturing:
            self.layer.before_call(args, kwargs)


class InputHook(_LiveHook):
    """Forward pre-hook (with kwargs) on the model: its inputs on refresh steps (the batch size, the probe)."""

    __slots__ = ("seng",)

    def __init__(self, seng: "SENG"):
        self.seng = weakref.ref(seng)

    @torch._dynamo.disable
    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seng = self.seng()
        if seng is not None and seng.capturing:
            seng._observe_input(args, kwargs)


class DeclaredHook(_LiveHook):
    """Forward pre-hook (with kwargs) on a module that declares its layout (``batch_first``): a source of the
    batch size on refresh steps (:mod:`lightning_seng.axes`)."""

    __slots__ = ("seng", "name")

    def __init__(self, seng: "SENG", name: str):
        self.seng, self.name = weakref.ref(seng), name

    @torch._dynamo.disable
    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seng = self.seng()
        if seng is not None and seng.capturing:
            seng._declared(self.name, module, args, kwargs)


class OutputHook(_LiveHook):
    """Forward hook (with kwargs) on the output module under ``fisher="mc"``: on refresh steps, the sampled loss
    from its output and its backward to the captured layer outputs (:meth:`~lightning_seng.SENG._sample`)."""

    __slots__ = ("seng",)

    def __init__(self, seng: "SENG"):
        self.seng = weakref.ref(seng)

    @torch._dynamo.disable
    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        seng = self.seng()
        if seng is not None and seng.capturing:
            seng._sample(output)
