"""Which modules take a dedicated layer route: only those that run torch's own forward on plain parameters."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from lightning_seng import SENG
from lightning_seng.layers import ConvLayer, LinearLayer, NormLayer, layer_for, runs_code_of
from tests.layers._seng_run import DAMPING
from tests.reference import layerwise_dense_directions, rel_err


class PermutingLayerNorm(nn.LayerNorm):
    """Channels-first LayerNorm (ConvNeXt's pattern): normalises over C of (N, C, H, W) by permuting."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class BatchNormReLU(nn.BatchNorm2d):
    def forward(self, x):
        return F.relu(super().forward(x))


class TransposedLinear(nn.Linear):
    def forward(self, x):
        return x @ self.weight + self.bias


class StandardisedConv(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        w = (weight - weight.mean(dim=(1, 2, 3), keepdim=True)) / (weight.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return super()._conv_forward(x, w, bias)


@pytest.mark.parametrize("module, cls", [
    (nn.Linear(3, 4), LinearLayer),
    (nn.LazyLinear(4), LinearLayer),
    (nn.MultiheadAttention(4, 2).out_proj, LinearLayer),
    (nn.Conv2d(2, 3, 3), ConvLayer),
    (nn.Conv1d(2, 3, 3), ConvLayer),
    (nn.BatchNorm1d(3), NormLayer),
    (nn.LayerNorm(3), NormLayer),
    (nn.GroupNorm(1, 3), NormLayer),
], ids=["linear", "lazy-linear", "mha-out-proj-class", "conv2d", "conv1d", "batchnorm", "layernorm", "groupnorm"])
def test_torch_layers_take_their_route(module, cls):
    assert type(layer_for("m", module)) is cls


@pytest.mark.parametrize("module", [
    PermutingLayerNorm(3), BatchNormReLU(3), TransposedLinear(3, 3), StandardisedConv(2, 3, 3),
    parametrizations.weight_norm(nn.Linear(3, 4)), nn.utils.weight_norm(nn.Linear(3, 4)),
    parametrizations.spectral_norm(nn.Conv2d(2, 3, 3)),
], ids=["permuting-layernorm", "batchnorm-relu", "transposed-linear", "standardised-conv", "parametrized-weight-norm",
        "hook-weight-norm", "spectral-norm"])
def test_subclasses_and_reparametrised_layers_take_no_dedicated_route(module):
    assert layer_for("m", module) is None


def test_conv_overriding_only_conv_forward_does_not_run_torchs_code():
    assert runs_code_of(nn.Conv2d(2, 3, 3), nn.Conv2d, "forward", "_conv_forward")
    assert not runs_code_of(StandardisedConv(2, 3, 3), nn.Conv2d, "forward", "_conv_forward")


class SeqFirst(nn.Module):
    """A sequence-first body: inputs (T, N, d)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(5, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.proj(x))).mean(0))


def _step(model, x, y, **kwargs):
    seng = SENG(model, damping=DAMPING, update_freq=1, **kwargs)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    seng.step()
    seng.remove()
    return {k: p.grad.clone() for k, p in model.named_parameters()}, seng


@pytest.mark.parametrize("t", [4, 7], ids=["sequence-4", "sequence-equal-to-the-batch"])
def test_sequence_first_layers_find_the_sample_axis_and_are_exact(t):
    """With ``T == N`` the sizes cannot tell the axes of ``(T, N, d)`` apart; the structural probe can."""
    torch.manual_seed(0)
    model = SeqFirst().double()
    n = 7
    x, y = torch.randn(t, n, 5, dtype=torch.float64), torch.randint(0, 3, (n,))
    names = [k for k, _ in model.named_parameters()]

    class BatchFirst(nn.Module):  # the reference's per-sample vmap runs over axis 0
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, xb):
            return self.m(xb.transpose(0, 1))

    wrapped = BatchFirst()
    ref = layerwise_dense_directions(wrapped, F.cross_entropy, x.transpose(0, 1), y, DAMPING,
                                     [f"m.{k}" for k in names])
    got, seng = _step(model, x, y, batch_axis=1)
    assert all(layer.curvature is not None for layer in seng.layers.values())
    for k in names:
        assert rel_err(got[k], ref[f"m.{k}"]) < 1e-10, k


def test_a_layer_without_an_axis_of_the_batch_size_falls_back_and_names_batch_axis(caplog):
    """``batch_axis=0`` on a (T, N, d) input reads N = T; the head's (N, 6) input has no axis of that size."""
    torch.manual_seed(0)
    model = SeqFirst().double()
    x, y = torch.randn(4, 7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    with caplog.at_level(logging.WARNING, logger="lightning_seng"):
        got, seng = _step(model, x, y)
    assert seng.layers["head"].curvature is None
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 1 and "'head'" in messages[0] and "batch_axis" in messages[0], messages


class SeqFirstBranching(SeqFirst):
    """Data-dependent control flow: a shape-only forward cannot decide the branch, so no probe runs."""

    def forward(self, x):
        return super().forward(x if bool(x.sum() > -1e9) else -x)


def test_two_axes_of_the_batch_size_are_ambiguous_and_fall_back_where_the_probe_cannot_run(caplog):
    torch.manual_seed(0)
    model = SeqFirstBranching().double()
    x, y = torch.randn(7, 7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    raw_model = SeqFirstBranching().double()
    raw_model.load_state_dict(model.state_dict())
    F.cross_entropy(raw_model(x), y).backward()
    with caplog.at_level(logging.WARNING, logger="lightning_seng"):
        got, seng = _step(model, x, y, batch_axis=1)
    for name in ("proj", "norm"):
        assert seng.layers[name].curvature is None
        assert any(f"'{name}'" in r.getMessage() and "ambiguous" in r.getMessage() for r in caplog.records)
    assert any("probe" in r.getMessage() and "could not run" in r.getMessage() for r in caplog.records)
    for k, p in raw_model.named_parameters():
        if not k.startswith("head"):
            torch.testing.assert_close(got[k], p.grad / (1 + DAMPING), rtol=1e-14, atol=0)
    assert seng.layers["head"].curvature is not None


def test_batch_axis_callable_gives_the_batch_size():
    torch.manual_seed(0)
    model = SeqFirst().double()
    x, y = torch.randn(4, 7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    _, seng = _step(model, x, y, batch_axis=lambda args, kwargs: args[0].shape[1])
    assert all(layer.curvature is not None for layer in seng.layers.values())


@pytest.mark.parametrize("value", [-1, 1.5, "0", True])
def test_bad_batch_axis_names_the_key(value):
    with pytest.raises(ValueError, match="batch_axis"):
        SENG(SeqFirst(), batch_axis=value)
