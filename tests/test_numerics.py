"""A damping small against ``‖UUᵀ‖``: a float32 layer whose damped system float32 cannot resolve is kept in
float64; one that float64 cannot resolve either falls back, announced. The reference is the dense float64 solve
from the very float32 values the backward produced (the layer's input and output gradient, and ``.grad``)."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_seng import SENG
from tests.reference import rel_err

N = 6


def _float32_step(damping, **kwargs):
    """One refresh step on a float32 Linear: ``(direction, reference, seng)``; the reference solves
    ``(UᵀU + λI) d = g`` densely in float64, ``U`` rows ``√N·(G_n ⊗ [x_n, 1])`` from the captured float32 values."""
    torch.manual_seed(0)
    model = nn.Linear(5, 4)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 5, generator=g), torch.randint(0, 4, (N,), generator=g)
    seng = SENG(model, damping=damping, update_freq=1, **kwargs)
    out = model(x)
    out.retain_grad()
    F.cross_entropy(out, y).backward()
    G, X = out.grad.double(), torch.cat([x, torch.ones(N, 1)], 1).double()
    U = (G[:, :, None] * X[:, None, :]).reshape(N, -1) * N ** 0.5
    grad = torch.cat([model.weight.grad, model.bias.grad[:, None]], 1).double().reshape(-1)
    ref = torch.linalg.solve(U.T @ U + damping * torch.eye(U.shape[1], dtype=torch.float64), grad)
    seng.step()
    got = torch.cat([model.weight.grad, model.bias.grad[:, None]], 1).double().reshape(-1)
    return got, ref, seng


def test_float32_with_a_damping_float32_cannot_resolve_is_kept_in_float64(caplog):
    """λ = 1e-6: float32 alone is 3 % off (the issue's measurement); kept in float64 it is within float32's
    rounding of the result, with one warning that says so."""
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    got, ref, seng = _float32_step(1e-6)
    assert rel_err(got, ref) < 1e-5
    assert seng.layers[""].curvature.gram.dtype == torch.float64
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(messages) == 1 and "float64" in messages[0] and "damping" in messages[0]


def test_float32_with_a_resolvable_damping_stays_float32(caplog):
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    got, ref, seng = _float32_step(0.5)
    assert rel_err(got, ref) < 1e-5
    assert seng.layers[""].curvature.gram.dtype == torch.float32
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_damping_beyond_float64_falls_back_announced(caplog):
    """λ = 1e-16: no dtype resolves it; the layer gets ``g / (1 + λ)`` and the warning names the damping."""
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    torch.manual_seed(0)
    model = nn.Linear(5, 4).double()
    x, y = torch.randn(N, 5, dtype=torch.float64), torch.randint(0, 4, (N,))
    seng = SENG(model, damping=1e-16, update_freq=1)
    F.cross_entropy(model(x), y).backward()
    before = [p.grad.clone() for p in model.parameters()]
    seng.step()
    for p, g in zip(model.parameters(), before):
        assert torch.equal(p.grad, g / (1 + 1e-16))
    assert "" in seng._reasons and "raise the damping" in seng._reasons[""]


@pytest.mark.parametrize("damping", [1e-12])
def test_a_tiny_damping_in_float32_is_exact_in_float64_or_announced(damping):
    """λ = 1e-12 in a float32 model (rel. error 2.2e4 before): resolved in float64 or announced, never wrong."""
    got, ref, seng = _float32_step(damping)
    if "" in seng._reasons:
        return
    assert seng.layers[""].curvature.gram.dtype == torch.float64
    assert rel_err(got, ref) < 1e-2
