"""``nn.Conv1d`` / ``Conv2d`` / ``Conv3d`` with any stride, padding (mode), dilation and groups.

The input is unfolded into patches ``(N, c_in·k…, P)``; per group ``g`` the per-sample gradient is
``J_n = G_n X_nᵀ`` with ``G_n`` the output gradient ``(c_out/groups, P)`` and ``X_n`` the patches
``(c_in/groups·k…, P)``, so rank ≤ P. The bias adds a row of ones to the patches.

A Conv2d called once per forward with zero padding alike on both sides keeps its input as it is (no
patches) until the route is chosen (on the rank that owns the layer, for all its samples): the Gram and
implicit routes unfold it then, with the padding; the explicit route, where the positions are many for the
channels (``P ≥ 2·max(c_in, c_out)/groups``), takes the per-sample gradients from the convolution's own
weight-gradient kernel with the samples as groups, which on a CPU is 2–8× faster there than patches and a
batched product (and slower on few positions with many channels, where the patches stay, unfolded a few samples
at a time). Where the route will be explicit, those rows are built once, in the runtime identity check, whose
``Σ_n J_n`` they give, and the route takes them over (``Factors.per_sample``).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Factors, Mask, MatrixLayer
from .routes import EXPLICIT_MAX_ELEMENTS, ExplicitRoute, Route, RouteSettings, build_route, choose_route

# Elements of patches unfolded at once for explicit per-sample gradients (4 MiB in float32): small enough to be
# reused from the allocator's free memory rather than mapped afresh.
PATCH_CHUNK_ELEMENTS = 1 << 20


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

    def _keeps_input(self) -> bool:
        """Whether one call's factors may keep the input unfolded (a 2-D convolution, zero padding alike on
        both sides of each axis), so that the route decides how to get the per-sample gradients."""
        m = self.module
        pad = m._reversed_padding_repeated_twice
        return len(m.kernel_size) == 2 and m.padding_mode == "zeros" and pad[0] == pad[1] and pad[2] == pad[3]

    def _factors(self, calls: List[Tuple[Tensor, Tensor]], mask: Mask) -> Factors:
        m = self.module
        if len(calls) == 1 and self._keeps_input():
            x, g = calls[0]
            # the input as (N, 1, c_in, H, W): five axes mark it as not unfolded (patches have four)
            return Factors(g.reshape(x.shape[0], self.groups, m.out_channels // self.groups, -1), x.unsqueeze(1))
        xs, gs = [], []
        for x, g in calls:
            n = x.shape[0]
            patches = unfold_patches(self._padded(x), m.kernel_size, m.stride, m.dilation)
            xs.append(patches.reshape(n, self.groups, -1, patches.shape[-1]))
            gs.append(g.reshape(n, self.groups, m.out_channels // self.groups, -1))
        if len(calls) == 1:  # no copy in the common case of one call per forward
            return self._assemble(gs[0], xs[0], mask)
        return self._assemble(torch.cat(gs, dim=3), torch.cat(xs, dim=3), mask)

    def _route(self, factors: Factors, scale: float, settings: RouteSettings, generator) -> Route:
        if factors.input_side.dim() != 5:
            return super()._route(factors, scale, settings, generator)
        m, mask = self.module, factors.mask
        x, G = factors.input_side[:, 0], factors.grad_side
        n, groups, d_out, P = G.shape
        self.positions = P
        kept, factors.per_sample = factors._kept_rows(), None  # taken over at most once: it is scaled in place
        if self._explicit(n, P, mask, settings):
            U = kept.mul_(scale) if kept is not None else self._explicit_rows(x, G * scale, mask)
            return ExplicitRoute.build(U, self._blocks(mask), settings.coordinates, generator)
        pad = m._reversed_padding_repeated_twice
        X = unfold_patches(x, m.kernel_size, m.stride, m.dilation, (pad[2], pad[0])).reshape(n, groups, -1, P)
        return build_route(G * scale, X if mask[0] else X[:, :, :0], mask[1], settings, generator)

    def _dims(self, mask: Mask) -> Tuple[int, int]:
        """``(d_out, d_in)`` per group of the trainable parameters (the bias a row of ``d_in``)."""
        m = self.module
        d_in = (m.in_channels // self.groups * m.kernel_size[0] * m.kernel_size[1] if mask[0] else 0) + mask[1]
        return m.out_channels // self.groups, d_in

    def _blocks(self, mask: Mask) -> List[int]:
        d_out, d_in = self._dims(mask)
        d_w = self.groups * d_out * (d_in - mask[1])
        return ([d_w] if mask[0] else []) + ([self.groups * d_out] if mask[1] else [])

    def _explicit(self, n: int, P: int, mask: Mask, settings: RouteSettings) -> bool:
        """Whether the route of an input kept as it is, with a trainable weight, is explicit ``U``."""
        d_out, d_in = self._dims(mask)
        return mask[0] and choose_route(n, self.groups, d_out, d_in, P, settings) == "explicit"

    def _explicit_rows(self, x: Tensor, G: Tensor, mask: Mask) -> Tensor:
        """``U``'s rows ``J_n`` ``(N, d)`` (weight block, then the bias block while trainable) of an input ``x``
        ``(N, c_in, H, W)`` kept as it is and output gradients ``G (N, groups, d_out, P)``: from the
        weight-gradient convolution with the samples as groups where the positions are many for the channels
        (``P ≥ 2·max(c_in, c_out)/groups``), else from the patches, a few samples at a time, and batched products."""
        m = self.module
        n, groups, d_out, P = G.shape
        pad = m._reversed_padding_repeated_twice
        if P >= 2 * max(m.in_channels, m.out_channels) // groups:
            w = torch.nn.grad.conv2d_weight(
                x.reshape(1, n * m.in_channels, *x.shape[2:]), (n * m.out_channels, *m.weight.shape[1:]),
                G.reshape(1, n * m.out_channels, *self._output_size(x)), stride=m.stride,
                padding=(pad[2], pad[0]), dilation=m.dilation, groups=n * groups)
            U = w.reshape(n, -1)
            return torch.cat([U, G.sum(3).reshape(n, -1)], dim=1) if mask[1] else U
        # the patches a few samples at a time, into U's rows: a whole batch's patches would be a fresh allocation of
        # N·c_in·k·P elements every refresh, whose first touch costs a CPU more than these products
        d_in = m.in_channels // groups * m.kernel_size[0] * m.kernel_size[1]
        U = G.new_empty(n, groups * d_out * d_in)
        rows = max(1, PATCH_CHUNK_ELEMENTS // (groups * d_in * P))
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            X = unfold_patches(x[start:stop], m.kernel_size, m.stride, m.dilation, (pad[2], pad[0]))
            torch.bmm(G[start:stop].reshape(-1, d_out, P), X.reshape(-1, d_in, P).transpose(1, 2),
                      out=U[start:stop].view(-1, d_out, d_in))
        return torch.cat([U, G.sum(3).reshape(n, -1)], dim=1) if mask[1] else U

    def factor_sums(self, factors: Factors) -> Optional[Tuple[List[Tensor], Tensor]]:
        """As :meth:`MatrixLayer.factor_sums`; an input kept as it is gives each patch's norm from a convolution of the
        squared input with ones, and the sums from the convolution's weight-gradient kernel or, where the route will
        be explicit ``U`` (:attr:`route_settings`, ``N·d`` under the explicit route's memory cap), from ``U``'s own rows,
        built here once and kept on ``factors`` for the route."""
        if factors.input_side.dim() != 5:
            return super().factor_sums(factors)
        m, mask = self.module, factors.mask
        x, G = factors.input_side[:, 0], factors.grad_side
        n, groups, d_out, P = G.shape
        pad = m._reversed_padding_repeated_twice
        padding = (pad[2], pad[0])
        settings, blocks = self.route_settings, self._blocks(mask)
        # (with fisher="mc" the factors checked are not those U is built from: nothing to reuse)
        if (settings is not None and not self.sampled_fisher and self._explicit(n, P, mask, settings)
                and n * sum(blocks) <= EXPLICIT_MAX_ELEMENTS):
            J = self._explicit_rows(x, G, mask)
            factors.per_sample = (G, J)
            sums = J.sum(0).split(blocks)
            parts = [sums[0].reshape(groups, d_out, -1)] + ([sums[1].reshape(groups, d_out)] if mask[1] else [])
        else:
            parts = []
            if mask[0]:
                w = torch.nn.grad.conv2d_weight(x, m.weight.shape, G.reshape(n, groups * d_out, *self._output_size(x)),
                                                stride=m.stride, padding=padding, dilation=m.dilation, groups=groups)
                parts.append(w.reshape(groups, d_out, -1))
            if mask[1]:
                parts.append(G.sum(dim=(0, 3)))
        if mask[0]:
            squares = x.square().reshape(n, groups, -1, *x.shape[2:]).sum(2)
            ones = squares.new_ones(groups, 1, *m.kernel_size)
            x_norm = F.conv2d(squares, ones, stride=m.stride, padding=padding, dilation=m.dilation,
                              groups=groups).reshape(n, groups, P)
        else:
            x_norm = G.new_zeros(n, groups, P)
        if mask[1]:
            x_norm = x_norm + 1
        # the squares summed by hand: vector_norm over a middle axis is an order of magnitude slower on a CPU
        return parts, (G.square().sum(2).sqrt() * x_norm.clamp_min(0).sqrt()).sum()

    def _output_size(self, x: Tensor) -> Tuple[int, int]:
        m = self.module
        pad = m._reversed_padding_repeated_twice
        return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in
                     zip(x.shape[2:], (pad[2], pad[0]), m.dilation, m.kernel_size, m.stride))
