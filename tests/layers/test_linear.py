"""nn.Linear routes against the dense per-sample reference (float64, 1e-10)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.layers._seng_run import DAMPING, seng_direction
from tests.reference import layerwise_dense_directions, rel_err

def _assert_exact(model, x, y, reduction="mean", **kwargs):
    names = [k for k, _ in model.named_parameters()]
    ref = layerwise_dense_directions(model, F.cross_entropy, x, y, DAMPING, names, reduction)
    got, seng = seng_direction(model, x, y, reduction, **kwargs)
    for k in names:
        assert rel_err(got[k], ref[k]) < 1e-10, k
    return seng


class SequenceHead(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.proj = nn.Linear(5, 6, bias=bias)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.proj(x)).mean(dim=1))


@pytest.mark.parametrize("route", ["auto", "explicit", "gram"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_2d_matches_dense(route, reduction):
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = torch.randn(11, 5, dtype=torch.float64), torch.randint(0, 3, (11,))
    _assert_exact(model, x, y, reduction, route=route)


def test_linear_2d_auto_uses_hadamard_gram_route():
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = torch.randn(11, 5, dtype=torch.float64), torch.randint(0, 3, (11,))
    seng = _assert_exact(model, x, y)
    assert {layer.curvature.route.name for layer in seng.layers.values()} == {"gram"}


@pytest.mark.parametrize("route", ["auto", "explicit", "gram", "implicit"])
def test_linear_on_sequences_matches_dense(route):
    model = SequenceHead().double()
    x, y = torch.randn(9, 4, 5, dtype=torch.float64), torch.randint(0, 3, (9,))
    # svd_rank >= T: the implicit route's truncation is exact
    _assert_exact(model, x, y, route=route, svd_rank=4)


def test_linear_without_bias_matches_dense():
    model = SequenceHead(bias=False).double()
    x, y = torch.randn(9, 4, 5, dtype=torch.float64), torch.randint(0, 3, (9,))
    _assert_exact(model, x, y, route="gram")


def test_linear_on_4d_inputs_flattens_positions():
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 4, 3)).double()
    x, y = torch.randn(7, 2, 3, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    _assert_exact(model, x, y)
