"""One class per layer kind; :func:`build_layers` gives each module of a model its layer (or a reason why not).

A module takes a dedicated route only when the code it runs is the code that route models: its class must
not override ``forward`` (nor, for convolutions, ``_conv_forward``) of the torch class the route is written
for, and its parameters must be plain ``nn.Parameter`` attributes (no parametrization, no weight-norm
pre-hook). A subclass that permutes, fuses an activation or transposes its weight is not that layer to SENG:
it takes the generic route (:mod:`.generic`), as does any other module with parameters.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple, Union

from torch import nn
from torch.nn.utils import parametrize

from .attention import AttentionLayer, OutProjection, plain_projections
from .base import Call, Curvature, Factors, LayerCurvature, MatrixLayer, NotExact, find_sample_axis
from .conv import ConvLayer
from .generic import GenericLayer
from .linear import LinearLayer
from .norm import NormLayer
from .routes import ROUTES, RouteSettings

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

SUPPORTED_TYPES = (nn.Linear,) + _CONVS + _NORMS + (nn.MultiheadAttention,)


def runs_code_of(module: nn.Module, base: type, *methods: str) -> bool:
    """Whether ``module`` is a ``base`` that runs ``base``'s own ``methods`` on plain parameters."""
    if not isinstance(module, base) or parametrize.is_parametrized(module):
        return False
    cls = type(module)
    if any(getattr(cls, m) is not getattr(base, m) for m in methods):
        return False
    # weight_norm-style pre-hooks replace the registered weight by a tensor computed from other parameters
    return all(getattr(module, k, None) is None or module._parameters.get(k) is getattr(module, k)
               for k in ("weight", "bias"))


def _torch_base(module: nn.Module, bases: Tuple[type, ...]) -> Optional[type]:
    return next((b for b in bases if isinstance(module, b)), None)


def layer_for(name: str, module: nn.Module) -> Optional[LayerCurvature]:
    """The dedicated curvature class for ``module`` if its forward is the one a route models and it has
    parameters, else ``None``."""
    if runs_code_of(module, nn.Linear, "forward"):
        return LinearLayer(name, module)
    if runs_code_of(module, nn.MultiheadAttention, "forward") and plain_projections(module):
        return AttentionLayer(name, module, with_out_proj=runs_code_of(module.out_proj, nn.Linear, "forward"))
    conv = _torch_base(module, _CONVS)
    if conv is not None and runs_code_of(module, conv, "forward", "_conv_forward"):
        return ConvLayer(name, module)
    norm = _torch_base(module, _NORMS)
    if norm is not None and runs_code_of(module, norm, "forward") and getattr(module, "weight", None) is not None:
        return NormLayer(name, module)
    return None


def _own_params(module: nn.Module) -> List[nn.Parameter]:
    return [p for p in module.parameters(recurse=False)]


def _registered_slots(layer: LayerCurvature) -> bool:
    """Whether every slot of ``layer`` is a parameter registered on its module (an old-style ``weight_norm``
    pre-hook computes ``weight`` from ``weight_g`` and ``weight_v``)."""
    registered = {id(p) for p in layer.module._parameters.values()}
    return all(p is None or id(p) in registered for p in layer.param_slots())


def _parametrization_owners(model: nn.Module) -> Dict[int, str]:
    """``id`` of every module inside a ``parametrize`` parametrization -> the name of the module it parametrizes."""
    return {id(sub): name for name, module in model.named_modules() if parametrize.is_parametrized(module)
            for sub in module.parametrizations.modules()}


def build_layers(model: nn.Module, accept: Callable[[str, nn.Module], bool]
                 ) -> Tuple[Dict[str, LayerCurvature], Dict[str, str], Dict[str, List[str]]]:
    """The layers of ``model`` SENG preconditions, in ``named_modules`` order.

    Returns ``(layers, fallbacks, shared)``: ``fallbacks`` maps each module with parameters outside every
    layer to the reason; ``shared`` maps ``id(param)`` of each parameter registered in several modules to
    those modules. A parameter shared between modules is left to the fallback (a curvature built from one
    of its uses would not be its per-sample gradient). A submodule whose calls its parent's layer computes
    (``layer.feeds``) takes that layer, or falls back with its parent.
    """
    owners: Dict[int, List[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None and name not in owners.setdefault(id(p), []):
                owners[id(p)].append(name)
    shared = {i: mods for i, mods in owners.items() if len(mods) > 1}
    shared_ids = set(shared)

    layers: Dict[str, LayerCurvature] = {}
    fallbacks: Dict[str, str] = {}
    # id(submodule) -> the layer its parent's capture feeds (parents come first in named_modules), or the
    # name of a parent that is not preconditioned, so that nothing captures the submodule's calls.
    fed: Dict[int, Union[LayerCurvature, str]] = {}
    parametrized = _parametrization_owners(model)
    for name, module in model.named_modules():
        if not _own_params(module) and not parametrize.is_parametrized(module):
            continue
        if id(module) in parametrized:  # its parameters belong to the generic layer of the module it parametrizes
            if parametrized[id(module)] not in layers:
                fallbacks[name] = f"parametrizes '{parametrized[id(module)]}', which has no layer"
            continue
        layer = fed.pop(id(module), None) or layer_for(name, module)
        if isinstance(layer, str):
            fallbacks[name] = f"it runs inside '{layer}', which is not preconditioned"
            continue
        if not accept(name, module):
            fallbacks[name] = "excluded by include/exclude"
        else:
            if layer is None or not _registered_slots(layer):
                # the last resort: per-sample gradients of the module's own parameters through its forward
                layer = GenericLayer(name, module)
            layer.excluded |= {id(p) for p in layer.param_slots() if p is not None and id(p) in shared_ids}
            if layer.parameters():
                layers[name] = layer
        for sub in getattr(layer, "feeds", ()):
            fed[id(sub.module)] = sub if layers.get(name) is layer else name
    kept = {id(layer) for layer in layers.values()}
    for layer in layers.values():
        layer.feeds = [sub for sub in layer.feeds if id(sub) in kept]
    return layers, fallbacks, shared


__all__ = ["AttentionLayer", "Call", "Curvature", "Factors", "GenericLayer", "LayerCurvature", "MatrixLayer",
           "NotExact", "LinearLayer", "ConvLayer", "NormLayer", "OutProjection", "ROUTES", "RouteSettings",
           "SUPPORTED_TYPES", "build_layers", "find_sample_axis",
           "layer_for", "runs_code_of"]
