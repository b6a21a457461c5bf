"""Non-finite gradients or curvature: the refresh is skipped, the last good factors are kept, one
warning per layer (naming it), counters in ``seng.stats``, and training goes on with finite weights."""

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

import lightning_seng.layers.base as layers_base
from lightning_seng import SENG
from tests.reference import per_sample_gradients, dense_direction
from tests.reliability._reference import rel_err

DAMPING = 0.4
LR, MOMENTUM = 0.1, 0.9


def _mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3)).to(dtype)


def _batch(step, n=10, dtype=torch.float64):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _snapshot(seng):
    """Every committed curvature tensor, cloned, by layer."""
    out = {}
    for name, layer in seng.layers.items():
        cur = layer.curvature
        if cur is not None:
            out[name] = {"gram": cur.gram.clone(), "chol": cur.chol.clone(),
                         **{k: v.clone() for k, v in cur.route.tensors.items()}}
    return out


def _assert_same_factors(before, seng):
    after = _snapshot(seng)
    assert before.keys() == after.keys() and before
    for name in before:
        assert before[name].keys() == after[name].keys()
        for key in before[name]:
            assert torch.equal(before[name][key], after[name][key]), (name, key)


def _train(steps, bad_steps, update_freq=2, dtype=torch.float64):
    """Plain loop; batches in ``bad_steps`` carry a NaN. Returns model, seng, snapshots before each
    bad step, parameter values around each bad step and all recorded warnings."""
    model = _mlp(dtype)
    seng = SENG(model, damping=DAMPING, update_freq=update_freq)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    snaps, around = {}, {}
    if True:
        for step in range(steps):
            x, y = _batch(step, dtype=dtype)
            if step in bad_steps:
                x[3, 2] = float("nan")
                snaps[step] = _snapshot(seng)
                bufs = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
                before = [p.detach().clone() for p in model.parameters()]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            seng.step()
            opt.step()
            if step in bad_steps:
                around[step] = (before, bufs, [p.detach().clone() for p in model.parameters()])
    return model, seng, snaps, around


def test_nan_batch_on_refresh_step_keeps_last_good_factors():
    model, seng, snaps, _ = _train(steps=3, bad_steps={2})
    _assert_same_factors(snaps[2], seng)
    assert seng.stats["skipped_refreshes"] == 1
    assert seng.stats["nonfinite_steps"] == 1


def test_nan_step_zeroes_gradients_so_optimizer_moves_by_momentum_only():
    _, _, _, around = _train(steps=4, bad_steps={3})
    before, bufs, after = around[3]
    for p0, buf, p1 in zip(before, bufs, after):
        assert torch.allclose(p1, p0 - LR * (MOMENTUM * buf), rtol=0, atol=1e-15)


def test_training_continues_with_finite_weights_and_fresh_factors_after_nan():
    model, seng, snaps, _ = _train(steps=9, bad_steps={2, 5})
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert seng.stats["skipped_refreshes"] == 1 and seng.stats["nonfinite_steps"] == 2
    # step 8 refreshed from a clean batch: new factors, finite, different from those kept at step 2
    fresh = _snapshot(seng)
    for name, tensors in fresh.items():
        assert all(torch.isfinite(t.double()).all() for t in tensors.values())
        assert not torch.equal(tensors["gram"], snaps[2][name]["gram"])
    assert math.isfinite(seng.stats["direction_norm"]) and seng.stats["direction_norm"] > 0


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == "lightning_seng.preconditioner" and r.levelno == logging.WARNING]


def test_nan_batch_warns_once_naming_the_layer(caplog):
    caplog.set_level(logging.WARNING, logger="lightning_seng.preconditioner")
    _, seng, _, _ = _train(steps=7, bad_steps={2, 4, 6})
    messages = _warnings(caplog)
    assert len(messages) == 1, messages
    assert "non-finite" in messages[0] and "'0'" in messages[0], messages
    assert seng.stats["skipped_refreshes"] == 3 and seng.stats["nonfinite_steps"] == 3


def test_nonfinite_gradient_warning_names_the_offending_layer(caplog):
    caplog.set_level(logging.WARNING, logger="lightning_seng.preconditioner")
    model = _mlp()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    x, y = _batch(0)
    F.cross_entropy(model(x), y).backward()
    model[3].bias.grad[1] = float("inf")
    seng.step()
    messages = _warnings(caplog)
    assert len(messages) == 1 and "'3'" in messages[0] and "'0'" not in messages[0], messages
    assert all(float(p.grad.abs().sum()) == 0 for p in model.parameters())
    assert seng.stats["nonfinite_steps"] == 1


def test_nan_on_non_refresh_step_counts_step_but_not_a_skipped_refresh():
    model, seng, snaps, _ = _train(steps=4, bad_steps={3})
    _assert_same_factors(snaps[3], seng)
    assert seng.stats["skipped_refreshes"] == 0 and seng.stats["nonfinite_steps"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_counters_are_in_stats_from_the_first_clean_step():
    model, seng, _, _ = _train(steps=2, bad_steps=set())
    assert seng.stats["skipped_refreshes"] == 0
    assert seng.stats["nonfinite_steps"] == 0


def _one_layer_old_factor_direction(model, x_old, y_old, x_new, y_new):
    """Dense direction from the per-sample gradients of the *old* batch applied to the new gradient."""
    names = ["weight", "bias"]
    ps = per_sample_gradients(model, F.cross_entropy, x_old, y_old, names)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x_new), y_new).backward()
    g = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return dense_direction(ps, g, DAMPING, x_old.shape[0] ** -0.5)


def test_overflowing_curvature_with_finite_gradient_preconditions_with_old_factors(caplog):
    caplog.set_level(logging.WARNING, logger="lightning_seng.preconditioner")
    model = nn.Linear(6, 3).double()
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    seng = SENG(model, damping=DAMPING, update_freq=1, route="gram")
    x0, y0 = _batch(0)
    F.cross_entropy(model(x0), y0).backward()
    seng.step()
    model.zero_grad(set_to_none=True)
    kept = _snapshot(seng)
    # Every sample is the same huge input with the labels balanced: with uniform logits the
    # per-sample output gradients cancel in the batch gradient, which stays finite and small, while
    # |x|² overflows float64 in the Gram matrix.
    x1 = torch.full((6, 6), 1e160, dtype=torch.float64)
    y1 = torch.tensor([0, 1, 2, 0, 1, 2])
    ref = _one_layer_old_factor_direction(model, x0, y0, x1, y1)
    F.cross_entropy(model(x1), y1).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    seng.step()
    _assert_same_factors(kept, seng)
    assert seng.stats["skipped_refreshes"] == 1 and seng.nonfinite_steps == 0
    assert _warnings(caplog) == [
        "SENG: non-finite curvature in layer ''; refresh skipped, the last good factors are kept"]
    assert rel_err(model.weight.grad, ref["weight"]) < 1e-10
    assert rel_err(model.bias.grad, ref["bias"]) < 1e-10


def test_large_finite_gradient_is_not_treated_as_nonfinite():
    """A gradient whose squared norm overflows float32 is still finite: it must be preconditioned,
    not zeroed as a NaN/Inf step."""
    model = nn.Linear(6, 3)
    seng = SENG(model, damping=DAMPING, update_freq=1)
    x0, y0 = _batch(0, dtype=torch.float32)
    F.cross_entropy(model(x0), y0).backward()
    seng.step()
    model.zero_grad(set_to_none=True)
    x1, y1 = _batch(1, dtype=torch.float32)
    F.cross_entropy(model(x1 * 1e20), y1).backward()
    g = model.weight.grad.clone()
    assert torch.isfinite(g).all() and not torch.isfinite(g.norm())
    seng.step()
    assert seng.stats["nonfinite_steps"] == 0
    assert torch.isfinite(model.weight.grad).all() and model.weight.grad.abs().max() > 0


def test_singular_system_skips_refresh_keeps_factors_and_names_layer(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="lightning_seng.preconditioner")
    model = _mlp()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    x, y = _batch(0)
    F.cross_entropy(model(x), y).backward()
    seng.step()
    model.zero_grad(set_to_none=True)
    kept = _snapshot(seng)
    real = layers_base.sketch.damped_cholesky_batch

    def fake(grams, damping):
        # the last layer (3 classes -> built last) reports a failed factorisation
        assert len(grams) == len(seng.layers)
        return real(grams, damping)[:-1] + [None]

    monkeypatch.setattr(layers_base.sketch, "damped_cholesky_batch", fake)
    x, y = _batch(1)
    F.cross_entropy(model(x), y).backward()
    seng.step()
    _assert_same_factors(kept, seng)
    messages = _warnings(caplog)
    assert len(messages) == 1 and "'3'" in messages[0] and "refresh skipped" in messages[0], messages
    assert seng.stats["skipped_refreshes"] == 1 and seng.nonfinite_steps == 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_skip_nonfinite_false_leaves_gradients_for_the_caller():
    """``skip_nonfinite=False``: SENG counts the step and keeps its factors but hands the NaN gradient back
    untouched (e.g. for a GradScaler or a custom guard to act on)."""
    model = _mlp()
    seng = SENG(model, damping=DAMPING, update_freq=1, skip_nonfinite=False)
    x, y = _batch(0)
    F.cross_entropy(model(x), y).backward()
    seng.step()
    model.zero_grad(set_to_none=True)
    kept = _snapshot(seng)
    x, y = _batch(1)
    x[0, 0] = float("nan")
    F.cross_entropy(model(x), y).backward()
    raw = [p.grad.clone() for p in model.parameters()]
    seng.step()
    _assert_same_factors(kept, seng)
    assert seng.stats["nonfinite_steps"] == 1 and seng.stats["skipped_refreshes"] == 1
    for a, p in zip(raw, model.parameters()):
        assert torch.equal(a.isnan(), p.grad.isnan()) and torch.equal(a.nan_to_num(), p.grad.nan_to_num())
    assert any(p.grad.isnan().any() for p in model.parameters())
