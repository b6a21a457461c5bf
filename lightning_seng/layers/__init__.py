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
from .embedding import EmbeddingLayer, TiedLinearLayer, group_refusal, unsupported
from .generic import GenericLayer
from .linear import LinearLayer
from .norm import NormLayer
from .routes import ROUTE_RULES, ROUTES, RouteSettings

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

SUPPORTED_TYPES = (nn.Linear, nn.Embedding) + _CONVS + _NORMS + (nn.MultiheadAttention,)


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
    if isinstance(module, nn.Embedding):
        # checked for subclasses too: the generic route compares outputs and cannot see a coupling that
        # only the gradient has (scale_grad_by_freq)
        reason = unsupported(module)
        if reason is not None:
            raise NotExact(reason)
        if runs_code_of(module, nn.Embedding, "forward"):
            return EmbeddingLayer(name, [module])
    return None


def _tied_layer(weight: nn.Parameter, modules: List[nn.Module], names: Dict[int, str],
                holders: Dict[int, List[nn.Module]], accept: Callable[[str, nn.Module], bool]
                ) -> Union[None, str, LayerCurvature]:
    """One layer for a ``weight`` that several plain ``nn.Linear`` / ``nn.Embedding`` modules register as
    their ``weight`` (tied embeddings), hooked on all of them and covering the Linear modules' bias too
    (unless that bias is registered outside them); or why there is none; ``None`` for other sharing.
    ``modules`` are in ``named_modules`` order, and the layer takes the first one's name."""
    if not all(m.weight is weight and (runs_code_of(m, nn.Linear, "forward") or
                                       runs_code_of(m, nn.Embedding, "forward")) for m in modules):
        return None
    excluded = [names[id(m)] for m in modules if not accept(names[id(m)], m)]
    if excluded:
        return "its weight is tied to " + ", ".join(repr(n) for n in excluded) + ", excluded by include/exclude"
    linears = [m for m in modules if isinstance(m, nn.Linear)]
    if any(m.bias is not linears[0].bias for m in linears):
        return ("the Linear modules sharing its weight have different biases, and SENG's hooks cannot tell "
                "their calls apart")
    embeddings = [m for m in modules if isinstance(m, nn.Embedding)]
    reason = group_refusal(embeddings)
    if reason is not None:
        return reason
    name = names[id(modules[0])]
    layer = EmbeddingLayer(name, modules) if embeddings else TiedLinearLayer(name, modules)
    bias = linears[0].bias if linears else None
    if bias is not None and any(all(h is not m for m in modules) for h in holders[id(bias)]):
        layer.excluded.add(id(bias))
    return layer


def _own_params(module: nn.Module) -> List[nn.Parameter]:
    return [p for p in module.parameters(recurse=False)]


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
    of its uses would not be its per-sample gradient), except a weight tied between plain Linear and
    Embedding modules: one layer hooked on all of them sums its uses (:func:`_tied_layer`). A submodule
    whose calls its parent's layer computes (``layer.feeds``) takes that layer, or falls back with its parent.
    """
    owners: Dict[int, List[str]] = {}
    holders: Dict[int, List[nn.Module]] = {}  # the distinct modules registering each parameter
    weights: Dict[int, nn.Parameter] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for key, p in module._parameters.items():
            if p is None:
                continue
            if name not in owners.setdefault(id(p), []):
                owners[id(p)].append(name)
            if all(m is not module for m in holders.setdefault(id(p), [])):
                holders[id(p)].append(module)
            if key == "weight":
                weights[id(p)] = p
    # one module registered under several names is not sharing: its hooks see every call
    shared = {i: owners[i] for i, mods in holders.items() if len(mods) > 1}
    shared_ids = set(shared)
    names = {id(m): name for name, m in model.named_modules()}
    order = {i: k for k, i in enumerate(names)}
    tied: Dict[int, Tuple[nn.Module, Union[str, LayerCurvature]]] = {}  # id(module) -> (first module, layer or why not)
    for i in shared_ids & set(weights):
        modules = sorted(holders[i], key=lambda m: order[id(m)])
        result = _tied_layer(weights[i], modules, names, holders, accept)
        if result is not None:
            tied.update({id(m): (modules[0], result) for m in modules})

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
        if id(module) in tied:
            first, result = tied[id(module)]
            if isinstance(result, str):
                fallbacks[name] = "excluded by include/exclude" if not accept(name, module) else result
            elif module is first:
                layers[name] = result
            continue
        layer = fed.pop(id(module), None)
        if isinstance(layer, str):
            fallbacks[name] = f"it runs inside '{layer}', which is not preconditioned"
            continue
        if layer is None:
            try:
                layer = layer_for(name, module)
            except NotExact as reason:  # a torch layer whose settings couple samples (scale_grad_by_freq)
                fallbacks[name] = str(reason)
                continue
        if not accept(name, module):
            fallbacks[name] = "excluded by include/exclude"
        else:
            if layer is None:
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


__all__ = ["AttentionLayer", "Call", "Curvature", "EmbeddingLayer", "Factors", "GenericLayer", "LayerCurvature",
           "MatrixLayer", "NotExact", "LinearLayer", "ConvLayer", "NormLayer", "OutProjection", "ROUTE_RULES", "ROUTES",
           "RouteSettings", "SUPPORTED_TYPES", "build_layers", "find_sample_axis", "layer_for", "runs_code_of"]
