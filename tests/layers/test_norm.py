"""Norm-layer affine weights against the dense per-sample reference (float64, 1e-10)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.layers._seng_run import DAMPING, seng_direction
from tests.reference import dense_direction, layerwise_dense_directions, per_sample_jacobian, rel_err

@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)), (10, 5)),
    (lambda: nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8, bias=False), nn.Tanh(), nn.Linear(8, 3)), (10, 5)),
    (lambda: nn.Sequential(nn.Linear(5, 8), nn.RMSNorm(8), nn.Tanh(), nn.Linear(8, 3)), (10, 5)),
    (lambda: nn.Sequential(nn.Conv2d(2, 6, 3), nn.GroupNorm(3, 6), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 9, 3)),
     (10, 2, 5, 5)),
], ids=["layernorm", "layernorm-no-bias", "rmsnorm", "groupnorm"])
def test_per_sample_norms_match_dense(make, shape):
    model = make().double()
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))
    names = [k for k, _ in model.named_parameters()]
    ref = layerwise_dense_directions(model, F.cross_entropy, x, y, DAMPING, names)
    got, seng = seng_direction(model, x, y)
    assert seng.stats["layers/norm"] == 1
    for k in names:
        assert rel_err(got[k], ref[k]) < 1e-10, k


def test_layernorm_over_sequences_sums_positions():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)).double()
    x, y = torch.randn(8, 3, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    names = [k for k, _ in model.named_parameters()]
    ref = layerwise_dense_directions(model, F.cross_entropy, x, y, DAMPING, names)
    got, _ = seng_direction(model, x, y)
    for k in names:
        assert rel_err(got[k], ref[k]) < 1e-10, k


@pytest.mark.parametrize("bn,shape", [(nn.BatchNorm1d(5, track_running_stats=False), (12, 5)),
                                   (nn.BatchNorm2d(3, track_running_stats=False), (12, 3, 4, 4))],
                         ids=["bn1d", "bn2d"])
def test_batchnorm_matches_per_sample_jacobian(bn, shape):
    """BatchNorm couples samples through batch statistics, so per-sample gradients of its own affine
    weights are the Jacobian of the vector of per-sample losses computed on the whole batch."""
    model = nn.Sequential(bn, nn.Tanh(), nn.Flatten(), nn.Linear(int(torch.tensor(shape[1:]).prod()), 3)).double()
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))
    n = shape[0]
    got, seng = seng_direction(model, x, y)
    jac = per_sample_jacobian(model, lambda out: F.cross_entropy(out, y, reduction="none"), x, ["0.weight", "0.bias"])
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    g = {k: dict(model.named_parameters())[k].grad for k in ("0.weight", "0.bias")}
    ref = dense_direction(jac, g, DAMPING, n ** -0.5)
    for k in ("0.weight", "0.bias"):
        assert rel_err(got[k], ref[k]) < 1e-10, k


def test_coverage_says_batchnorm_in_training_mode_takes_its_statistics_as_constants():
    """The norm route treats a training-mode BatchNorm's batch statistics as constants (as the SENG authors do):
    the coverage table says so on that row, and not in eval mode, where the running statistics are constants."""
    from lightning_seng import SENG

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    seng = SENG(model)
    rows = {r.module: r for r in seng.coverage().rows}
    assert rows["1"].route == "norm" and "batch statistics as constants" in rows["1"].note
    model.eval()
    assert "batch statistics" not in {r.module: r for r in seng.coverage().rows}["1"].note
    seng.remove()
