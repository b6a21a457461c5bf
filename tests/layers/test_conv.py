"""Conv1d/2d/3d routes against the dense per-sample reference (float64, 1e-10), and the implicit
route's error against exact on a conv layer."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_seng import SENG
from lightning_seng.layers import conv as conv_module
from lightning_seng.layers.conv import ConvLayer, unfold_patches
from tests.layers._seng_run import DAMPING, seng_direction
from tests.reference import layerwise_dense_directions, rel_err

def _net(conv, flat):
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(flat, 3)).double()


def _flat_size(conv, x):
    with torch.no_grad():
        return conv.double()(x).numel() // x.shape[0]


def _assert_exact(conv, x, **kwargs):
    model = _net(conv, _flat_size(conv, x))
    y = torch.randint(0, 3, (x.shape[0],))
    names = [k for k, _ in model.named_parameters()]
    ref = layerwise_dense_directions(model, F.cross_entropy, x, y, DAMPING, names)
    got, seng = seng_direction(model, x, y, **kwargs)
    for k in names:
        assert rel_err(got[k], ref[k]) < 1e-10, k
    return seng


CONV2D = [
    dict(in_channels=4, out_channels=6, kernel_size=3),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), dilation=(1, 2), padding=(1, 0)),
    dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, padding="same"),
    dict(in_channels=4, out_channels=4, kernel_size=3, groups=4, bias=False),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=2, padding_mode="circular"),
]


@pytest.mark.parametrize("route", ["auto", "explicit", "gram", "implicit"])
@pytest.mark.parametrize("config", CONV2D, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items() if k not in ("in_channels",)))
def test_conv2d_matches_dense(config, route):
    x = torch.randn(6, 4, 7, 6, dtype=torch.float64)
    _assert_exact(nn.Conv2d(**config), x, route=route, svd_rank=1000)


@pytest.mark.parametrize("route", ["auto", "explicit", "gram"])
def test_conv1d_matches_dense(route):
    x = torch.randn(6, 3, 11, dtype=torch.float64)
    _assert_exact(nn.Conv1d(3, 4, 3, stride=2, dilation=2, padding=2, groups=1), x, route=route)


def test_conv1d_same_padding_replicate_mode_matches_dense():
    x = torch.randn(6, 2, 9, dtype=torch.float64)
    _assert_exact(nn.Conv1d(2, 4, 4, padding="same", padding_mode="replicate", groups=2), x)


@pytest.mark.parametrize("route", ["explicit", "gram"])
def test_conv3d_matches_dense(route):
    x = torch.randn(5, 2, 4, 5, 4, dtype=torch.float64)
    _assert_exact(nn.Conv3d(2, 4, (2, 3, 2), stride=(1, 2, 1), dilation=(2, 1, 1), padding=1), x, route=route)


@pytest.mark.parametrize("dims", [1, 3])
def test_unfold_patches_agrees_with_convolution(dims):
    """Patches @ weight equals the convolution itself, for the generic (non-2-D) unfolding."""
    conv = [None, nn.Conv1d, None, nn.Conv3d][dims](3, 5, 3, stride=2, dilation=2).double()
    x = torch.randn(2, 3, *([9] * dims), dtype=torch.float64)
    patches = unfold_patches(x, conv.kernel_size, conv.stride, conv.dilation)
    out = (conv.weight.reshape(5, -1) @ patches + conv.bias[:, None]).reshape(conv(x).shape)
    torch.testing.assert_close(out, conv(x), rtol=1e-12, atol=1e-12)


def test_implicit_route_error_against_exact_is_reported():
    """Rank-p truncation of a conv layer's output gradients: error falls with p, exact at p = c_out."""
    conv = nn.Conv2d(3, 16, 3, padding=1)
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    model = _net(conv, _flat_size(conv, x))
    y = torch.randint(0, 3, (8,))
    exact, _ = seng_direction(model, x, y, route="gram")
    errors = {}
    for rank in (1, 2, 4, 8, 16):
        got, seng = seng_direction(model, x, y, route="implicit", svd_rank=rank)
        assert seng.layers["0"].curvature.route.name == "implicit"
        errors[rank] = rel_err(got["0.weight"], exact["0.weight"])
    print("\nimplicit route, conv 3->16 on 6x6 (P=36), relative error of d vs exact:",
          ", ".join(f"p={r}: {e:.2e}" for r, e in errors.items()))
    assert errors[16] < 1e-10  # rank(G_n) <= c_out = 16: no truncation left
    assert errors[1] > errors[4] > errors[8] > errors[16]


@pytest.mark.parametrize("config", [
    dict(in_channels=2, out_channels=3, kernel_size=3, stride=2, padding=1, dilation=2),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), groups=2, padding=(1, 0)),
    dict(in_channels=3, out_channels=3, kernel_size=3, groups=3, padding="same", bias=False),
], ids=["stride-dilation", "groups-rect", "depthwise-same"])
def test_explicit_route_from_the_weight_gradient_convolution_matches_dense(config, monkeypatch):
    """Many positions for few channels: the per-sample gradients come from ``conv2d_weight`` with the samples
    as groups (counted; the runtime identity's batch sum calls it with the layer's own groups), with the bias
    block beside them."""
    calls = []
    real = torch.nn.grad.conv2d_weight
    monkeypatch.setattr(torch.nn.grad, "conv2d_weight", lambda *a, **k: calls.append(k["groups"]) or real(*a, **k))
    x = torch.randn(5, config["in_channels"], 12, 11, dtype=torch.float64)
    _assert_exact(nn.Conv2d(**config), x, route="explicit")
    assert calls.count(5 * config.get("groups", 1)) == 1


def test_few_positions_for_many_channels_keep_the_patches(monkeypatch):
    calls = []
    real = torch.nn.grad.conv2d_weight
    monkeypatch.setattr(torch.nn.grad, "conv2d_weight", lambda *a, **k: calls.append(k["groups"]) or real(*a, **k))
    x = torch.randn(5, 8, 4, 4, dtype=torch.float64)  # P = 16 < 2 * 12
    _assert_exact(nn.Conv2d(8, 12, 3, padding=1), x, route="explicit")
    assert 5 not in calls  # never with the samples as groups (the runtime identity's sum uses groups=1)


@pytest.mark.parametrize("shape", [dict(channels=(2, 3), size=12), dict(channels=(8, 12), size=4)],
                         ids=["weight-gradient-convolution", "patches"])
def test_explicit_rows_are_built_once_for_the_identity_and_the_route(shape, monkeypatch):
    """Where the route is explicit ``U``, the identity's ``Σ_n J_n`` is summed from ``U``'s own rows, built once a
    refresh (the batch-sum convolution, groups=1, never runs) and taken over by the route: still exact."""
    convs, builds = [], []
    real_conv, real_rows = torch.nn.grad.conv2d_weight, ConvLayer._explicit_rows
    monkeypatch.setattr(torch.nn.grad, "conv2d_weight", lambda *a, **k: convs.append(k["groups"]) or real_conv(*a, **k))
    monkeypatch.setattr(ConvLayer, "_explicit_rows", lambda *a: builds.append(1) or real_rows(*a))
    c_in, c_out = shape["channels"]
    x = torch.randn(5, c_in, shape["size"], shape["size"], dtype=torch.float64)
    _assert_exact(nn.Conv2d(c_in, c_out, 3, padding=1), x, route="explicit")
    assert builds == [1] and convs == ([5] if shape["size"] == 12 else [])


@pytest.mark.parametrize("groups, bias", [(1, True), (2, False), (2, True)])
def test_patches_a_few_samples_at_a_time_give_the_per_sample_gradients(groups, bias, monkeypatch):
    """The patches unfolded in chunks of samples (here of two) fill ``U``'s rows as the whole batch's would."""
    monkeypatch.setattr(conv_module, "PATCH_CHUNK_ELEMENTS", 2 * 4 // groups * 9 * 16)
    x = torch.randn(5, 4, 4, 4, dtype=torch.float64)
    _assert_exact(nn.Conv2d(4, 6, 3, padding=1, groups=groups, bias=bias), x, route="explicit")


def _conv_directions(x, y, reuse: bool, loss_scale: float = 1.0, **kwargs):
    torch.manual_seed(0)
    model = _net(nn.Conv2d(3, 4, 3, padding=1), 4 * 36)
    seng = SENG(model, damping=DAMPING, update_freq=1, route="explicit", **kwargs)
    if not reuse:
        for layer in seng.layers.values():
            layer.route_settings = None
    (F.cross_entropy(model(x), y) * loss_scale).backward()
    for p in model.parameters():
        p.grad /= loss_scale
    seng.step(loss_scale=loss_scale)
    assert seng.layers["0"].curvature.route.name == "explicit"
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("kwargs", [dict(curvature_samples=4, seed=3), dict(loss_scale=8.0)],
                         ids=["curvature_samples", "loss_scale"])
def test_explicit_rows_taken_over_follow_the_picked_samples_and_the_loss_scale(kwargs):
    """The rows built for the identity pass through the choice of samples (times N/m) and the loss scale
    exactly as the output gradients do: the direction equals the one from rows built afresh by the route."""
    x, y = torch.randn(7, 3, 6, 6, dtype=torch.float64), torch.randint(0, 3, (7,))
    got = _conv_directions(x, y, True, **kwargs)
    ref = _conv_directions(x, y, False, **kwargs)
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-12
