"""``nn.Conv1d`` / ``Conv2d`` / ``Conv3d`` with any stride, padding (mode), dilation and groups.

The input is unfolded into patches ``(N, c_in·k…, P)``; per group ``g`` the per-sample gradient is
``J_n = G_n X_nᵀ`` with ``G_n`` the output gradient ``(c_out/groups, P)`` and ``X_n`` the patches
``(c_in/groups·k…, P)``, so rank ≤ P. The bias adds a row of ones to the patches.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Factors, Mask, MatrixLayer


def unfold_patches(x: Tensor, kernel_size: Sequence[int], stride: Sequence[int],
                   dilation: Sequence[int], padding: Sequence[int] = (0, 0)) -> Tensor:
    """Patches of an input ``(N, C, *spatial)``: ``(N, C·prod(k), P)``, channel-major as in
    ``weight.reshape(c_out, -1)``, positions in row-major output order. ``padding`` (zeros, the same on both
    sides of each axis) is for 2-D inputs only, where the unfold pads as it reads; others come padded."""
    dims = len(kernel_size)
    if dims == 2:
        return F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)
    n, c = x.shape[:2]
    for i, (k, s, dil) in enumerate(zip(kernel_size, stride, dilation)):
        x = x.unfold(2 + i, dil * (k - 1) + 1, s)[..., ::dil]
    # (N, C, out_1..out_D, k_1..k_D) -> (N, C, k_1..k_D, out_1..out_D)
    perm = [0, 1] + [2 + dims + i for i in range(dims)] + [2 + i for i in range(dims)]
    x = x.permute(perm)
    return x.reshape(n, c * x[0, 0].shape[:dims].numel(), -1)


class ConvLayer(MatrixLayer):
    kind = "conv"

    def __init__(self, name, module):
        super().__init__(name, module)
        self.groups = module.groups

    def sample_axes(self, x: Tensor) -> Sequence[int]:
        return (0,) if x.dim() == len(self.module.kernel_size) + 2 else ()  # an unbatched input has none

    def _padded(self, x: Tensor) -> Tensor:
        m = self.module
        pad = m._reversed_padding_repeated_twice
        if m.padding_mode != "zeros":
            return F.pad(x, pad, mode=m.padding_mode)
        return F.pad(x, pad) if any(pad) else x

    def _factors(self, calls: List[Tuple[Tensor, Tensor]], mask: Mask) -> Factors:
        m = self.module
        xs, gs = [], []
        for x, g in calls:
            n = x.shape[0]
            pad = m._reversed_padding_repeated_twice
            if len(m.kernel_size) == 2 and m.padding_mode == "zeros" and pad[0] == pad[1] and pad[2] == pad[3]:
                # zero padding on both sides alike: the unfold pads as it reads, with no padded copy of the input
                patches = unfold_patches(x, m.kernel_size, m.stride, m.dilation, (pad[2], pad[0]))
            else:
                patches = unfold_patches(self._padded(x), m.kernel_size, m.stride, m.dilation)
            xs.append(patches.reshape(n, self.groups, -1, patches.shape[-1]))
            gs.append(g.reshape(n, self.groups, m.out_channels // self.groups, -1))
        if len(calls) == 1:  # no copy in the common case of one call per forward
            return self._assemble(gs[0], xs[0], mask)
        return self._assemble(torch.cat(gs, dim=3), torch.cat(xs, dim=3), mask)
