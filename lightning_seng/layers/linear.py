"""``nn.Linear`` on inputs ``(N, d_in)`` or sequences ``(N, ..., d_in)``.

Per sample, the gradient is ``J_n = Σ_t G[n, :, t] ⊗ x̃[n, :, t]`` (``x̃`` = input with a 1 appended
for the bias): rank one for 2-D inputs, where ``UUᵀ = (G Gᵀ) ∘ (X̃ X̃ᵀ)`` and no per-sample tensor is
built; rank ≤ T for sequences. A layer called several times in one forward (weight sharing) adds the
calls as further positions.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from .base import Factors, Mask, MatrixLayer


class LinearLayer(MatrixLayer):
    kind = "linear"

    def sample_axes(self, x: Tensor) -> Sequence[int]:
        return range(x.dim() - 1)  # any leading axis: (N, d), (N, T, d), (T, N, d), ...

    def _factors(self, calls: List[Tuple[Tensor, Tensor]], mask: Mask) -> Factors:
        xs, gs = [], []
        for x, g in calls:
            n = x.shape[0]
            xs.append(x.reshape(n, -1, x.shape[-1]))  # (N, T, d_in)
            gs.append(g.reshape(n, -1, g.shape[-1]))  # (N, T, d_out)
        X = (xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)).transpose(1, 2).unsqueeze(1)  # (N, 1, d_in, P)
        G = (gs[0] if len(gs) == 1 else torch.cat(gs, dim=1)).transpose(1, 2).unsqueeze(1)  # (N, 1, d_out, P)
        return self._assemble(G, X, mask)
