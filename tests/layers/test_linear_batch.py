"""A plain Linear computes ``U g'`` from the current batch's input and output gradient
(``rowsum((G gbᵀ) ∘ (X̃ x̃bᵀ))``) when the autograd graph shows that ``g'`` is exactly that batch's sum;
otherwise from ``g'`` itself. Float64, against the dense reference built from the refresh batch's per-sample
gradients and the current gradient."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_seng import SENG, sketch
from lightning_seng.layers import linear
from lightning_seng.layers.linear import LinearLayer
from tests.reference import dense_direction, per_sample_gradients, rel_err

DAMPING = 0.3


def _model():
    torch.manual_seed(0)
    # wide layers at a small batch: the shortcut is the cheaper U g' there
    return nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 24)).double()


def _batch(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 40, generator=g, dtype=torch.float64), torch.randint(0, 24, (n,), generator=g)


def _reference(model, refresh_batch, grads):
    """Per Linear, ``(UᵀU + λI)^{-1} g'`` with ``U`` from the refresh batch (rows ``∇ℓ_n/√N``)."""
    x, y = refresh_batch
    names = [k for k, _ in model.named_parameters()]
    ps = per_sample_gradients(model, F.cross_entropy, x, y, names)
    out = {}
    for module in ("0", "2"):
        keys = [k for k in names if k.startswith(module + ".")]
        out.update(dense_direction({k: ps[k] for k in keys}, {k: grads[k] for k in keys}, DAMPING,
                                   x.shape[0] ** -0.5))
    return out


@pytest.fixture(autouse=True)
def any_saving(monkeypatch):
    """These layers are small: let them take part whatever the saving (the gate has its own test)."""
    monkeypatch.setattr(linear, "MIN_SAVING", 0)


@pytest.fixture
def shortcut_calls(monkeypatch):
    calls = []
    real = sketch.batch_u_dot

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(sketch, "batch_u_dot", spy)
    return calls


def _refreshed(model):
    seng = SENG(model, damping=DAMPING, update_freq=100)
    x0, y0 = _batch(0)
    F.cross_entropy(model(x0), y0).backward()
    seng.step()
    model.zero_grad(set_to_none=True)
    return seng, (x0, y0)


def _check(model, seng, refresh_batch, backward, edit=lambda m: None):
    backward()
    edit(model)
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    seng.step()
    ref = _reference(model, refresh_batch, grads)  # after the step: its forward calls would count as the step's
    for k, p in model.named_parameters():
        assert rel_err(p.grad, ref[k]) < 1e-10, k


def test_batch_u_dot_equals_u_times_the_batch_gradient():
    g = torch.Generator().manual_seed(1)
    G, X = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 7, generator=g, dtype=torch.float64)
    gb, xb = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randn(9, 7, generator=g, dtype=torch.float64)
    for bias in (False, True):
        Ww, Wb = gb.T @ xb, gb.sum(0)
        old = sketch.patch_u_dot(G[:, None, :, None], X[:, None, :, None], Ww[None], Wb[None] if bias else None)
        assert rel_err(sketch.batch_u_dot(G, X, gb, xb, bias), old) < 1e-12


@pytest.fixture
def batch_taken(monkeypatch):
    """Layers whose ``.grad`` was found to be exactly their batch's gradient, one entry per ``U g'``."""
    taken = []
    real = LinearLayer.batch_factors

    def spy(self, cur):
        out = real(self, cur)
        if out is not None:
            taken.append(self.name)
        return out
    monkeypatch.setattr(LinearLayer, "batch_factors", spy)
    return taken


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_the_refresh_step_takes_u_g_from_the_gram_and_stays_exact(reduction, shortcut_calls, batch_taken):
    """On a refresh step ``g' = Uᵀ1 / scale``, so ``U g' = (UUᵀ) 1 / scale``: no pass over the batch at all."""
    model = _model()
    seng = SENG(model, damping=DAMPING, update_freq=100, loss_reduction=reduction)
    x, y = _batch(0)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y, reduction=reduction).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    seng.step()
    names = [k for k, _ in model.named_parameters()]
    ps = per_sample_gradients(model, lambda o, t: F.cross_entropy(o, t, reduction=reduction), x, y, names)
    scale = x.shape[0] ** -0.5  # U's rows are ∇ℓ_n / √N under either reduction
    for module in ("0", "2"):
        keys = [k for k in names if k.startswith(module + ".")]
        ref = dense_direction({k: ps[k] for k in keys}, {k: grads[k] for k in keys}, DAMPING, scale)
        for k in keys:
            assert rel_err(dict(model.named_parameters())[k].grad, ref[k]) < 1e-10, k
    assert batch_taken == ["0", "2"] and shortcut_calls == []


def test_with_curvature_samples_the_refresh_step_computes_u_g_from_the_batch(shortcut_calls, batch_taken):
    model = _model()
    seng = SENG(model, damping=DAMPING, update_freq=100, curvature_samples=2)
    x, y = _batch(0)
    F.cross_entropy(model(x), y).backward()
    seng.step()
    assert batch_taken == ["0", "2"] and len(shortcut_calls) == 2


def test_between_refreshes_the_batch_shortcut_is_exact_on_a_new_batch(shortcut_calls):
    model = _model()
    seng, refresh_batch = _refreshed(model)
    shortcut_calls.clear()
    x1, y1 = _batch(1)
    _check(model, seng, refresh_batch, lambda: F.cross_entropy(model(x1), y1).backward())
    assert len(shortcut_calls) == 2  # both layers took it


@pytest.mark.parametrize("case", ["accumulation", "weight-decay-in-grad", "clipping", "grad-not-cleared",
                                  "called-twice", "l2-in-loss", "weight-used-outside", "tiny-extra-term",
                                  "two-backward-passes"])
def test_a_gradient_that_is_not_the_batch_sum_uses_the_gradient_itself(case, shortcut_calls):
    model = _model()
    seng, refresh_batch = _refreshed(model)
    shortcut_calls.clear()
    (x1, y1), (x2, y2) = _batch(1), _batch(2)

    def backward():
        if case == "accumulation":
            (F.cross_entropy(model(x1), y1) / 2).backward()
            (F.cross_entropy(model(x2), y2) / 2).backward()
        elif case == "grad-not-cleared":
            for p in model.parameters():
                p.grad = torch.zeros_like(p)  # zero_grad(set_to_none=False): autograd adds into it
            F.cross_entropy(model(x1), y1).backward()
        elif case == "called-twice":
            F.cross_entropy(model(x1), y1).backward()
            with torch.enable_grad():
                model(x2).sum().mul(0).backward()  # a second call of each layer in the step
        elif case == "l2-in-loss":
            penalty = sum(p.square().sum() for p in model.parameters()) * 1e-2
            (F.cross_entropy(model(x1), y1) + penalty).backward()
        elif case == "weight-used-outside":  # e.g. a regulariser reading the weights through another op
            extra = sum((m.weight @ torch.ones(m.weight.shape[1], dtype=torch.float64)).sum() + m.bias.sum()
                        for m in (model[0], model[2]))
            (F.cross_entropy(model(x1), y1) + 0.1 * extra).backward()
        elif case == "tiny-extra-term":  # far below any tolerance a check on values could use
            (F.cross_entropy(model(x1), y1) + 1e-30 * sum(p.sum() for p in model.parameters())).backward()
        elif case == "two-backward-passes":
            out = model(x1)
            F.cross_entropy(out, y1).backward(retain_graph=True)
            (0.5 * F.cross_entropy(out, y1)).backward()
        else:
            F.cross_entropy(model(x1), y1).backward()

    def edit(m):
        if case == "weight-decay-in-grad":
            for p in m.parameters():
                p.grad.add_(p.detach(), alpha=1e-2)
        elif case == "clipping":
            nn.utils.clip_grad_norm_(m.parameters(), 1e-3)

    _check(model, seng, refresh_batch, backward, edit)
    assert shortcut_calls == []


def test_no_shortcut_while_a_multi_process_group_is_up(shortcut_calls, monkeypatch):
    model = _model()
    seng, refresh_batch = _refreshed(model)
    shortcut_calls.clear()
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    x1, y1 = _batch(1)
    _check(model, seng, refresh_batch, lambda: F.cross_entropy(model(x1), y1).backward())
    assert shortcut_calls == []


def test_the_shortcut_under_autocast_matches_the_gradient_formula(shortcut_calls):
    """bf16 autocast: the weight reaches the matmul through a cast, whose edge is the one traced; U g' from the
    batch equals U g' from the (bf16-computed) gradient up to bf16 rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 24))
    seng = SENG(model, damping=DAMPING, update_freq=100)
    x, y = torch.randn(8, 40), torch.randint(0, 24, (8,))
    for step in range(2):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x + step), y)
        loss.backward()
        if step == 1:
            layer = seng.layers["0"]
            parts = layer.grad_parts(layer.curvature.mask, torch.float32)
            assert layer.batch_factors(layer.curvature) is not None
            assert rel_err(layer._u_dot(layer.curvature, parts), layer.curvature.route.u_dot(parts)) < 2e-2
        seng.step()
    assert len(shortcut_calls) == 3  # step 1: both layers, and the call above


def test_a_layer_whose_saving_is_below_the_gate_is_not_watched(monkeypatch, shortcut_calls, batch_taken):
    model = _model()
    seng, refresh_batch = _refreshed(model)
    shortcut_calls.clear()
    batch_taken.clear()
    # layer 0 (40 -> 30, N = 4, B = 4) saves 4 * (1200 - 4 * 70) = 3680 multiply-adds, layer 2 (30 -> 24) 1728
    monkeypatch.setattr(linear, "MIN_SAVING", 3000)
    x1, y1 = _batch(1)
    _check(model, seng, refresh_batch, lambda: F.cross_entropy(model(x1), y1).backward())
    assert batch_taken == ["0"] and len(shortcut_calls) == 1


def test_the_bias_share_comes_from_its_gradient_so_a_changed_bias_gradient_stays_exact(shortcut_calls, batch_taken):
    """Only the weight's gradient is traced: an extra term on the biases (here an L1 penalty and an edit of
    ``.grad``) leaves the shortcut on and the direction exact."""
    model = _model()
    seng, refresh_batch = _refreshed(model)
    shortcut_calls.clear()
    batch_taken.clear()
    x1, y1 = _batch(1)

    def backward():
        (F.cross_entropy(model(x1), y1) + 0.1 * (model[0].bias.abs().sum() + model[2].bias.abs().sum())).backward()

    def edit(m):
        m[2].bias.grad.mul_(3.0)
    _check(model, seng, refresh_batch, backward, edit)
    assert batch_taken == ["0", "2"] and len(shortcut_calls) == 2


def test_a_hook_of_anyone_else_on_the_weight_is_seen_beside_the_layers_own():
    """``_foreign_hooks``: none on a bare weight; none with only the layer's two (a gradient hook and a
    post-accumulate-grad hook); one as soon as anyone else adds either kind, and again after the layer's own are
    gone; the layer's own then no longer count."""
    layer = LinearLayer("fc", nn.Linear(3, 2))
    weight = layer.module.weight
    assert not layer._foreign_hooks(weight)
    layer._watch_weight(weight)
    assert len(layer._leaf_hooks) == 3 and not layer._foreign_hooks(weight)
    theirs = weight.register_hook(lambda g: g)
    assert layer._foreign_hooks(weight)
    theirs.remove()
    assert not layer._foreign_hooks(weight)
    after = weight.register_post_accumulate_grad_hook(lambda p: None)
    assert layer._foreign_hooks(weight)
    layer.remove_hooks()
    assert layer._foreign_hooks(weight)
    after.remove()
    assert not layer._foreign_hooks(weight)
