"""Affine weights of BatchNorm, LayerNorm, GroupNorm and RMSNorm.

With ``x̂`` the normalised input (batch statistics for BatchNorm in training mode, its running statistics
in eval mode), the per-sample gradients are ``J_n = [Σ_s G[n,·,s] ∘ x̂[n,·,s], Σ_s G[n,·,s]]`` (weight,
bias), summed over the positions ``s`` that share a parameter. They are small (``2·C``), so ``U`` is built explicitly.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Call, Factors, LayerCurvature, Mask, find_sample_axis
from .routes import ExplicitRoute, Route, RouteSettings


class NormLayer(LayerCurvature):
    kind = "norm"

    def _normalised(self, x: Tensor) -> Tensor:
        m = self.module
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.training or m.running_mean is None:
                return F.batch_norm(x, None, None, training=True, eps=m.eps)
            # eval mode: the forward normalised with the (frozen) running statistics
            return F.batch_norm(x, m.running_mean.to(x.dtype), m.running_var.to(x.dtype), training=False, eps=m.eps)
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(x, m.num_groups, eps=m.eps)
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, eps=m.eps)
        return F.rms_norm(x, m.normalized_shape, eps=m.eps)

    def _normalised_shape_dims(self) -> int:
        return len(self.module.normalized_shape) if hasattr(self.module, "normalized_shape") else 0

    def sample_axes(self, x: Tensor) -> Sequence[int]:
        dims = self._normalised_shape_dims()
        return range(x.dim() - dims) if dims else (0,)  # LayerNorm/RMSNorm: any leading axis

    def sample_first(self, call: Call, n: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """``(x̂, output grad)``: normalised over the whole batch before any subset of samples is taken."""
        x, g = call.inputs.to(dtype), call.grads[0]
        axis = find_sample_axis(x.shape, n, self.sample_axes(x), "input", self.probed)
        return self._normalised(x).movedim(axis, 0), g.movedim(axis, 0).to(dtype)

    def _channel_view(self, t: Tensor) -> Tensor:
        """``(N, C, S)``: parameter entries in the middle, positions sharing them last."""
        m = self.module
        n = t.shape[0]
        if isinstance(m, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
            c = int(torch.Size(m.normalized_shape).numel())
            return t.reshape(n, -1, c).transpose(1, 2)
        return t.reshape(n, t.shape[1], -1)

    def _factors(self, calls: List[Tuple[Tensor, Tensor]], mask: Mask) -> Factors:
        """``calls``: ``(x̂, output grad)`` pairs, batch first."""
        J = 0
        for x, g in calls:
            gv = self._channel_view(g)
            parts = []
            if mask[0]:
                parts.append((gv * self._channel_view(x)).sum(2))
            if mask[1]:
                parts.append(gv.sum(2))
            J = J + torch.cat(parts, dim=1)
        return Factors(J, None)

    def _route(self, factors: Factors, scale: float, settings: RouteSettings, generator) -> Route:
        blocks = [p.numel() for p in self.trainable_params(factors.mask)]
        return ExplicitRoute.build(factors.grad_side * scale, blocks, None, None)

    def estimated_cost(self, n: int, settings: RouteSettings) -> float:
        d = sum(p.numel() for p in self.parameters())
        return n * n * d / settings.update_freq + 2 * n * d

    def parts_of(self, tensors: List[Tensor], mask: Mask, dtype: torch.dtype) -> List[Tensor]:
        return [t.reshape(-1).to(dtype) for t in tensors]
