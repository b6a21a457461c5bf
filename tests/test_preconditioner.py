"""SENG orchestration: when hooks capture, stale factors, accumulation, batch sizes, state, filters."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_seng import SENG, ExponentialDamping, sketch
from tests.reference import layerwise_dense_directions, rel_err

D = torch.float64


def _mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _batch(n):
    return torch.randn(n, 5, dtype=D), torch.randint(0, 3, (n,))


def _backward(model, x, y, scale=1.0):
    F.cross_entropy(model(x), y).mul(scale).backward()


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def _names(model):
    return [k for k, _ in model.named_parameters()]


def _assert_grads_match(model, ref):
    for k, p in model.named_parameters():
        assert rel_err(p.grad, ref[k]) < 1e-10, k


def test_hooks_capture_only_on_refresh_steps_with_grad_enabled():
    model = _mlp()
    seng = SENG(model, update_freq=3)
    for step in range(6):
        model.zero_grad()
        x, y = _batch(4)
        _backward(model, x, y)
        captured = sum(len(layer._calls) for layer in seng.layers.values())
        assert captured == (2 if step % 3 == 0 else 0), step
        seng.step()
        assert all(not layer._calls for layer in seng.layers.values())
    assert seng.will_refresh
    with torch.no_grad():
        model(_batch(4)[0])
    assert all(not layer._calls for layer in seng.layers.values())


def test_stored_factors_precondition_later_gradients():
    model = _mlp()
    seng = SENG(model, damping=0.4, update_freq=2)
    xa, ya = _batch(9)
    xb, yb = _batch(6)
    _backward(model, xa, ya)
    seng.step()  # refresh from batch A
    model.zero_grad()
    _backward(model, xb, yb)
    g_b = _grads(model)
    seng.step()  # no refresh: factors of A, gradient of B
    ref = layerwise_dense_directions(model, F.cross_entropy, xa, ya, 0.4, _names(model), grads=g_b)
    _assert_grads_match(model, ref)


def test_curvature_comes_from_the_last_micro_batch_with_loss_scale():
    model = _mlp()
    seng = SENG(model, damping=0.4, update_freq=1)
    (x1, y1), (x2, y2) = _batch(5), _batch(8)
    _backward(model, x1, y1, 0.5)  # accumulation over two micro-batches: loss / 2 each
    _backward(model, x2, y2, 0.5)
    g = _grads(model)
    seng.step(loss_scale=0.5)
    ref = layerwise_dense_directions(model, F.cross_entropy, x2, y2, 0.4, _names(model), grads=g)
    _assert_grads_match(model, ref)


def test_changing_batch_size_between_refreshes():
    model = _mlp()
    seng = SENG(model, damping=0.4, update_freq=1)
    for n in (10, 3, 7):
        model.zero_grad()
        x, y = _batch(n)
        _backward(model, x, y)
        g = _grads(model)
        seng.step()
        ref = layerwise_dense_directions(model, F.cross_entropy, x, y, 0.4, _names(model), grads=g)
        _assert_grads_match(model, ref)
        assert seng.layers["0"].curvature.gram.shape == (n, n)


def test_damping_schedule_solves_other_dampings_from_the_refresh_eigendecomposition():
    model = _mlp()
    seng = SENG(model, damping=ExponentialDamping(1.0, rate=0.1, period=1), update_freq=100)
    x, y = _batch(6)
    _backward(model, x, y)
    seng.step()
    seng.set_epoch(2)
    assert seng.damping == pytest.approx(0.01)
    model.zero_grad()
    _backward(model, x, y)
    g = _grads(model)
    seng.step()
    ref = layerwise_dense_directions(model, F.cross_entropy, x, y, 0.01, _names(model), grads=g)
    _assert_grads_match(model, ref)
    assert all(layer.curvature.eigen is not None and layer.curvature.damping == 1.0 for layer in seng.layers.values())


def test_constant_damping_keeps_no_eigendecomposition():
    model = _mlp()
    seng = SENG(model, damping=0.3, update_freq=100)
    _backward(model, *_batch(6))
    seng.step()
    assert all(layer.curvature.eigen is None for layer in seng.layers.values())


def test_excluded_parameters_get_damped_gradient():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 5)
            self.head = nn.Linear(5, 3)
            self.skip = nn.Linear(5, 3)
            self.temperature = nn.Parameter(torch.ones(()))

        def forward(self, idx):
            h = self.emb(idx)
            return (self.head(h) + self.skip(h)) * self.temperature

    model = Net().double()
    seng = SENG(model, damping=0.5, exclude=["skip", nn.Embedding, "Net"])  # by name, type and class name
    assert set(seng.layers) == {"head"}
    idx, y = torch.randint(0, 10, (6,)), torch.randint(0, 3, (6,))
    F.cross_entropy(model(idx), y).backward()
    g = _grads(model)
    seng.step()
    for k in ("emb.weight", "skip.weight", "skip.bias", "temperature"):
        torch.testing.assert_close(dict(model.named_parameters())[k].grad, g[k] / 1.5)
    assert not torch.allclose(model.head.weight.grad, g["head.weight"] / 1.5)


def test_include_by_type_and_pattern():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 4), nn.Linear(4, 2))
    assert set(SENG(model, include=[nn.Linear]).layers) == {"2", "3"}
    assert set(SENG(model, include=["[02]"]).layers) == {"0", "2"}
    assert set(SENG(model, exclude=["Conv2d"]).layers) == {"2", "3"}


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 16, 3)).double()
    kwargs = dict(damping=0.3, update_freq=3, sketch_size=5, route="explicit")
    seng = SENG(model, **kwargs)
    batches = [(torch.randn(5, 2, 6, 6, dtype=D), torch.randint(0, 3, (5,))) for _ in range(6)]
    for x, y in batches[:4]:
        model.zero_grad(); _backward(model, x, y); seng.step()
    twin = copy.deepcopy(model)
    twin_seng = SENG(twin, **kwargs)
    twin_seng.load_state_dict(copy.deepcopy(seng.state_dict()))
    for x, y in batches[4:]:  # step 4 reuses the stored curvature, step 5... and refreshes at 6
        for m, s in ((model, seng), (twin, twin_seng)):
            m.zero_grad(); _backward(m, x, y); s.step()
        for a, b in zip(model.parameters(), twin.parameters()):
            assert torch.equal(a.grad, b.grad)
    assert torch.equal(seng.generator.get_state(), twin_seng.generator.get_state())


def test_curvature_dtype_is_float32_for_float32_models_and_stats_are_consistent():
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    seng = SENG(model, update_freq=1)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()
    g = torch.cat([p.grad.reshape(-1).double() for p in model.parameters()])
    seng.step()
    d = torch.cat([p.grad.reshape(-1).double() for p in model.parameters()])
    assert all(layer.curvature.gram.dtype == torch.float32 for layer in seng.layers.values())
    assert seng.stats["grad_norm"] == pytest.approx(g.norm().item(), rel=1e-5)
    assert seng.stats["direction_norm"] == pytest.approx(d.norm().item(), rel=1e-5)
    assert seng.stats["cosine"] == pytest.approx((g @ d / g.norm() / d.norm()).item(), rel=1e-4)
    assert seng.stats["layers/gram"] == 2 and seng.stats["refresh_time"] > 0


@pytest.mark.parametrize("kwargs,key", [
    (dict(damping=-1.0), "damping"), (dict(damping="x"), "damping"), (dict(update_freq=0), "update_freq"),
    (dict(update_freq=2.5), "update_freq"), (dict(sketch_size=0), "sketch_size"), (dict(svd_rank=0), "svd_rank"),
    (dict(loss_reduction="avg"), "loss_reduction"), (dict(route="dense"), "route"),
    (dict(implicit_threshold=-1), "implicit_threshold"), (dict(include=[3]), "include"),
    (dict(curvature_samples=0), "curvature_samples"),
    (dict(curvature_dtype=torch.float16), "curvature_dtype"),
])
def test_bad_settings_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        SENG(_mlp(), **kwargs)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_curvature_samples_build_U_from_a_uniform_subset_of_the_batch(reduction):
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 9, 3)).double()
    x, y = torch.randn(9, 2, 5, 5, dtype=D), torch.randint(0, 3, (9,))
    seng = SENG(model, damping=0.4, update_freq=1, curvature_samples=5, loss_reduction=reduction, seed=3)
    F.cross_entropy(model(x), y, reduction=reduction).backward()
    g = _grads(model)
    seng.step()
    rows = sketch.sample_indices(9, 5, torch.Generator().manual_seed(3), torch.device("cpu"))
    ref = layerwise_dense_directions(model, F.cross_entropy, x[rows], y[rows], 0.4, _names(model), grads=g)
    _assert_grads_match(model, ref)
    assert seng.layers["0"].curvature.gram.shape == (5, 5)


def test_curvature_samples_at_least_the_batch_use_every_sample():
    model = _mlp()
    seng = SENG(model, damping=0.4, update_freq=1, curvature_samples=50)
    x, y = _batch(6)
    _backward(model, x, y)
    g = _grads(model)
    seng.step()
    ref = layerwise_dense_directions(model, F.cross_entropy, x, y, 0.4, _names(model), grads=g)
    _assert_grads_match(model, ref)


def test_a_gram_eigh_cannot_decompose_is_solved_by_cholesky_at_each_damping(monkeypatch):
    """Under a damping schedule a refresh decomposes every Gram; where ``eigh`` fails to converge the layer keeps
    its Cholesky factor and refactorises at each new λ: the same directions as the dense reference."""
    model = _mlp()
    schedule = ExponentialDamping(0.5, rate=0.5, steps_per_epoch=1)
    seng = SENG(model, damping=schedule, update_freq=10)
    monkeypatch.setattr(torch.linalg, "eigh", lambda K: (_ for _ in ()).throw(torch.linalg.LinAlgError("no")))
    x, y = _batch(6)
    _backward(model, x, y)
    ref_model = copy.deepcopy(model)
    seng.step()
    assert all(layer.curvature.eigen is None for layer in seng.layers.values())
    model.zero_grad()
    x2, y2 = _batch(6)
    _backward(model, x2, y2)
    g = _grads(model)
    seng.step()  # step 1: λ = 0.25, solved by a new Cholesky factorisation
    ref = layerwise_dense_directions(ref_model, F.cross_entropy, x, y, 0.25, _names(model), grads=g)
    _assert_grads_match(model, ref)
