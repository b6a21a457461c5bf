"""Small float64 networks and seeded data shared by the distributed tests."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.modules import Conv1D, RMSNorm


class ConvNet(nn.Module):
    """Conv2d -> GroupNorm -> Linear -> LayerNorm -> Linear: every layer kind SENG preconditions,
    without BatchNorm (whose batch statistics would differ between a rank and the global batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.norm = nn.GroupNorm(1, 3)
        self.fc1 = nn.Linear(3 * 4 * 4, 6)
        self.ln = nn.LayerNorm(6)
        self.fc2 = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.norm(self.conv(x)))
        h = torch.tanh(self.ln(self.fc1(h.flatten(1))))
        return self.fc2(h)


class GenericNet(nn.Module):
    """Modules without a dedicated route, so the generic one: a linear map by ``addmm`` with its weight
    stored ``(in, out)``, a custom RMS norm, and a gain read in the root's own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = Conv1D(2 * 4 * 4, 6)
        self.norm = RMSNorm(6)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 6))
        self.head = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.norm(self.fc(x.flatten(1)))) * self.gain)


def make_generic_net(seed: int = 0) -> GenericNet:
    torch.manual_seed(seed)
    return GenericNet().double()


def make_net(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet().double()


def make_batch(n: int, seed: int = 1) -> Tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 4, (n,), generator=g))


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def local_mode_reference(model: nn.Module, sengs: list, replicas: list, x: Tensor, y: Tensor, parts: list,
                         steps: int, lr: float, before_step=None) -> list:
    """``local`` mode built without any communication: per step, one single-process SENG per rank's batch (on
    ``replicas`` of ``model``, batch slices ``parts``), each fed the global-batch gradient; the directions averaged
    and the weights moved along them by ``lr``. Returns the averaged direction of each step (``before_step(k)`` is
    called first)."""
    total = sum(part.stop - part.start for part in parts)
    out = []
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        grads = []
        for m, part in zip(replicas, parts):
            m.load_state_dict(model.state_dict())
            m.zero_grad()
            F.cross_entropy(m(x[part]), y[part]).backward()
            grads.append([p.grad.clone() * (part.stop - part.start) / total for p in m.parameters()])
        g = [sum(gs) for gs in zip(*grads)]
        directions = []
        for m, seng in zip(replicas, sengs):
            for p, gp in zip(m.parameters(), g):
                p.grad.copy_(gp)
            seng.step()
            directions.append([p.grad.clone() for p in m.parameters()])
        d = [sum(ds) / len(parts) for ds in zip(*directions)]
        out.append(d)
        with torch.no_grad():
            for p, dp in zip(model.parameters(), d):
                p.sub_(lr * dp)
    return out


def rank_slices(sizes) -> list:
    """Each rank's slice of a global batch made of the ranks' batches of ``sizes``, in rank order."""
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    return [slice(s, s + n) for s, n in zip(starts, sizes)]
