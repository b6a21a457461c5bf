"""One class per layer kind; ``layer_for`` picks the class for a module (or ``None``)."""

from __future__ import annotations

from typing import Optional

from torch import nn

from .base import Curvature, Factors, LayerCurvature, MatrixLayer
from .conv import ConvLayer
from .linear import LinearLayer
from .norm import NormLayer
from .routes import ROUTES, RouteSettings

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

SUPPORTED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) + _NORMS


def layer_for(name: str, module: nn.Module) -> Optional[LayerCurvature]:
    """The curvature class for ``module`` if SENG supports it and it has parameters, else ``None``."""
    if isinstance(module, nn.Linear):
        return LinearLayer(name, module)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return ConvLayer(name, module)
    if isinstance(module, _NORMS) and getattr(module, "weight", None) is not None:
        return NormLayer(name, module)
    return None


__all__ = ["Curvature", "Factors", "LayerCurvature", "MatrixLayer", "LinearLayer", "ConvLayer", "NormLayer",
           "ROUTES", "RouteSettings", "SUPPORTED_TYPES", "layer_for"]
