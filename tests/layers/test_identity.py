"""The runtime identities (``layers/identity.py``): usages the layer routes do not foresee are exact or announced,
never silently wrong. Float64, against the dense reference built from ``torch.func`` per-sample gradients."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_seng import SENG
from lightning_seng.layers import identity, linear
from tests.reference import dense_direction, per_sample_gradients, rel_err

DAMPING = 0.3
N = 6


def _batch(seed=0, n=N, d=5, classes=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _step(model, seng, loss_fn):
    """One backward and ``seng.step()``: ``(.grad before the step, .grad after)`` by parameter name."""
    model.zero_grad()
    loss_fn().backward()
    before = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    seng.step()
    return before, {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def _layer_direction(model, x, y, names, g):
    """The dense ``(UᵀU + λI)^{-1} g`` over ``names`` (one layer), ``U`` from the plain cross-entropy per sample."""
    ps = per_sample_gradients(model, F.cross_entropy, x, y, names)
    return dense_direction(ps, {k: g[k] for k in names}, DAMPING, N ** -0.5)


def _assert_damped(after, before, names):
    """The announced fallback: each of ``names`` got ``g / (1 + λ)``."""
    for k in names:
        assert rel_err(after[k], before[k] / (1 + DAMPING)) < 1e-12, k


def _assert_exact(after, model, x, y, names, g, context=()):
    """``names`` (one layer) got the dense ``(UᵀU + λI)^{-1} g`` of the batch ``(x, y)``."""
    ref = _layer_direction(model, x, y, names, g)
    for k in names:
        assert rel_err(after[k], ref[k]) < 1e-10, (*context, k)


def _halve(p):
    p.grad.mul_(0.5)


def _shrink(p):
    p.grad.mul_(0.3)


def _fallen_back(seng):
    return set(seng._reasons)


def test_a_post_accumulate_hook_on_one_weight_is_announced_and_the_other_layer_stays_exact(caplog, monkeypatch):
    """``p.grad.mul_(0.5)`` after accumulation on the last weight: that layer's ``.grad`` is no longer what its
    backward produced while the other layer's is: it gets ``g/(1+λ)`` with one warning; the shortcut (gate at 0,
    so that it would run) is off for it."""
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    monkeypatch.setattr(linear, "MIN_SAVING", 0)
    model = _mlp()
    model[2].weight.register_post_accumulate_grad_hook(_halve)
    x, y = _batch()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    before, after = _step(model, seng, lambda: F.cross_entropy(model(x), y))
    assert _fallen_back(seng) == {"2"}
    _assert_damped(after, before, ("2.weight", "2.bias"))
    _assert_exact(after, model, x, y, ["0.weight", "0.bias"], before)
    messages = _warnings(caplog)
    assert len(messages) == 1 and "'2'" in messages[0] and "post-accumulate-grad hook" in messages[0]


@pytest.mark.parametrize("update_freq", [1, 2])
def test_a_hook_that_rescales_the_whole_gradient_is_preconditioned_exactly(update_freq, caplog, monkeypatch):
    """One Linear whose ``.grad`` (weight and bias) a hook scales by 0.3 after accumulation: ``(F + λI)^{-1}·.grad``
    with ``F`` from the backward is exact (rel. error 9 before, through the batch shortcut), on refresh steps and
    between. (A power of two would be read as a loss scale SENG was not told of, and announced.)"""
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    monkeypatch.setattr(linear, "MIN_SAVING", 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30)).double()
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(_shrink)
    seng = SENG(model, damping=DAMPING, update_freq=update_freq)
    x0, y0 = _batch(0, d=40, classes=30)
    for step in range(3):
        x, y = _batch(step, d=40, classes=30)
        before, after = _step(model, seng, lambda: F.cross_entropy(model(x), y))
        if step % update_freq == 0:
            x0, y0 = x, y
        _assert_exact(after, model, x0, y0, ["0.weight", "0.bias"], before, context=(step,))
    assert _warnings(caplog) == []


def test_a_weight_hook_added_after_the_first_step_is_announced(caplog):
    """``weight.register_hook(lambda g: 2 * g)`` after attach: the per-sample gradients no longer sum to what
    reaches the weight, so the layer falls back at the next refresh, saying so."""
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    model = _mlp()
    x, y = _batch()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    _step(model, seng, lambda: F.cross_entropy(model(x), y))
    assert _fallen_back(seng) == set()
    model[0].weight.register_hook(lambda g: 2 * g)
    before, after = _step(model, seng, lambda: F.cross_entropy(model(x), y))
    assert _fallen_back(seng) == {"0"}
    _assert_damped(after, before, ("0.weight", "0.bias"))
    _assert_exact(after, model, x, y, ["2.weight", "2.bias"], before)
    assert any("do not sum to" in m and "hook on a parameter" in m for m in _warnings(caplog))


def test_clipping_the_gradient_norm_before_the_step_keeps_every_layer_exact(caplog):
    """``clip_grad_norm_`` rescales every ``.grad`` by one factor: a rescaling of the whole gradient, not a change to
    one layer's, so nothing falls back and the direction is ``(F + λI)^{-1}`` times the clipped gradient."""
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    model = _mlp()
    x, y = _batch()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    before = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    seng.step()
    assert _warnings(caplog) == []
    after = {k: p.grad for k, p in model.named_parameters()}
    for layer in ("0", "2"):
        _assert_exact(after, model, x, y, [f"{layer}.weight", f"{layer}.bias"], before)


class _Unrolled(nn.Module):
    """An ``nn.LSTMCell`` unrolled in a Python loop over ``(N, T, d)`` and a Linear head on the last state."""

    def __init__(self, d=3, h=5, classes=4):
        super().__init__()
        self.cell = nn.LSTMCell(d, h)
        self.head = nn.Linear(h, classes)

    def forward(self, x):
        h = c = x.new_zeros(x.shape[0], self.cell.hidden_size)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return self.head(h)


class _TwoOutputs(nn.Module):
    """A custom module returning ``(h, tanh(h))`` whose outputs both reach the loss."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 5, dtype=torch.float64) / 3)

    def forward(self, x):
        h = x @ self.weight
        return h, torch.tanh(h)


class _TwoOutputNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _TwoOutputs()
        self.head = nn.Linear(5, 4).double()

    def forward(self, x):
        h, f = self.block(x)
        return self.head(h + f * h)


@pytest.mark.parametrize("make,shape", [(lambda: _Unrolled().double(), (N, 4, 3)), (_TwoOutputNet, (N, 5))],
                         ids=["unrolled-lstm-cell", "two-output-module"])
def test_generic_modules_are_exact_or_announced(make, shape, caplog):
    """Every layer either matches the dense per-sample reference or is announced and gets ``g/(1+λ)``; the
    coverage never claims curvature it has not got."""
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    torch.manual_seed(0)
    model = make()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(*shape, generator=g, dtype=torch.float64), torch.randint(0, 4, (N,), generator=g)
    seng = SENG(model, damping=DAMPING, update_freq=1)
    before, after = _step(model, seng, lambda: F.cross_entropy(model(x), y))
    for name, layer in seng.layers.items():
        names = [k for k, p in model.named_parameters() if any(p is q for q in layer.parameters())]
        if name in seng._reasons:
            _assert_damped(after, before, names)
        else:
            _assert_exact(after, model, x, y, names, before, context=(name,))
    covered = {r.module for r in seng.coverage().rows if r.curvature}
    assert not covered & set(seng._reasons)


def test_attention_weights_in_the_loss_are_announced(caplog):
    """The averaged attention weights enter the loss (an entropy term): the in-projection's captured calls miss
    that path, so the attention layer falls back, announced; the head stays exact."""
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(6, 2, batch_first=True).double()
            self.head = nn.Linear(6, 4).double()

        def forward(self, x):
            out, weights = self.mha(x, x, x, need_weights=True)
            return self.head(out.mean(1)), weights

    model = Net()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 3, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (N,), generator=g)

    def loss():
        logits, weights = model(x)
        return F.cross_entropy(logits, y) + 0.5 * (weights * weights.clamp_min(1e-12).log()).sum() / N

    seng = SENG(model, damping=DAMPING, update_freq=1)
    before, after = _step(model, seng, loss)
    assert "mha" in seng._reasons
    mha = [k for k in before if k.startswith("mha.") and not k.startswith("mha.out_proj")]
    _assert_damped(after, before, mha)
    assert any("'mha'" in m and "attention weights" in m for m in _warnings(caplog))


def test_an_input_gradient_penalty_is_announced(caplog):
    """``‖∂L/∂x‖²`` in the loss (``create_graph=True``): its second-order path reaches the weights outside the
    layers' output gradients; every layer it reaches falls back, announced, with ``g/(1+λ)``."""
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    model = _mlp()
    x, y = _batch()

    def loss():
        xr = x.clone().requires_grad_(True)
        data = F.cross_entropy(model(xr), y)
        (gx,) = torch.autograd.grad(data, xr, create_graph=True)
        return data + 10.0 * gx.square().sum()

    seng = SENG(model, damping=DAMPING, update_freq=1)
    before, after = _step(model, seng, loss)
    assert _fallen_back(seng) == {"0", "2"}
    _assert_damped(after, before, before)
    assert len(_warnings(caplog)) == 2


def test_micro_batches_compare_against_the_last_backward_without_a_warning(caplog):
    """Gradient accumulation: the identity compares the last micro-batch's per-sample gradients with what that
    backward produced (not with the accumulated ``.grad``), and the direction uses the accumulated gradient."""
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    model = _mlp()
    x, y = _batch(n=2 * N)
    seng = SENG(model, damping=DAMPING, update_freq=1)
    model.zero_grad()
    for part in (slice(0, N), slice(N, None)):
        (F.cross_entropy(model(x[part]), y[part]) / 2).backward()
    before = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    seng.step(loss_scale=0.5)
    assert _warnings(caplog) == []
    after = {k: p.grad for k, p in model.named_parameters()}
    for layer in ("0", "2"):
        _assert_exact(after, model, x[N:], y[N:], [f"{layer}.weight", f"{layer}.bias"], before)


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_float32_networks_pass_the_identity(autocast, caplog):
    """No false alarm in low precision: a float32 conv net and transformer block, several refreshes, plain and
    under bf16 autocast, keep every layer's curvature."""
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16 * 7 * 7, 10))
    block = nn.Sequential(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), nn.Flatten(),
                          nn.Linear(32 * 8, 10))
    for model, x in ((conv, torch.randn(16, 3, 16, 16)), (block, torch.randn(16, 8, 32))):
        y = torch.randint(0, 10, (16,))
        seng = SENG(model, damping=0.1, update_freq=1)
        for _ in range(3):
            model.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            seng.step()
        assert seng._reasons == {}, seng._reasons
        seng.remove()
    assert _warnings(caplog) == []


def test_sum_mismatch_is_relative_to_the_magnitudes_summed():
    """The tolerance scales with what was summed: a float32 roundoff passes, a change of 1 % does not."""
    eps = torch.finfo(torch.float32).eps
    assert identity.sum_mismatch([1e-3, 1.0, 100.0], eps) is None
    assert identity.sum_mismatch([1e-2, 1.0, 1.0], eps) == pytest.approx(1e-2)
    assert identity.sum_mismatch([float("nan"), 1.0, 1.0], eps) is not None


def test_judge_direct_tells_a_common_rescaling_from_one_layers_change():
    """Rows ``[<a, b>, ‖b‖², ‖a‖², ‖a − b‖², M]`` (``a = .grad``, ``b`` the per-sample sum over the loss scale)."""
    eps = {k: torch.finfo(torch.float64).eps for k in "abc"}
    same = [1.0, 1.0, 1.0, 0.0, 1.0]
    clipped = [0.3, 1.0, 0.09, 0.49, 1.0]
    half = [0.5, 1.0, 0.25, 0.25, 1.0]
    assert identity.judge_direct({"a": same, "b": same}, eps) == {}
    assert identity.judge_direct({"a": clipped, "b": clipped}, eps) == {}
    assert set(identity.judge_direct({"a": same, "b": same, "c": clipped}, eps)) == {"c"}
    failed = identity.judge_direct({"a": half, "b": half}, eps)  # 2^-1: a loss scale SENG was not told of
    assert set(failed) == {"a", "b"} and "loss_scale" in failed["a"]
    failed = identity.judge_direct({"a": [0.0, 1.0, 1.0, 2.0, 1.0]}, eps)  # orthogonal: no rescaling explains it
    assert set(failed) == {"a"} and "do not sum" in failed["a"]


@pytest.mark.parametrize("setting,reduction", [("mean", "sum"), ("sum", "mean")])
def test_a_loss_reduction_that_does_not_match_the_loss_is_announced(setting, reduction, caplog):
    """``loss_reduction`` against the loss's own reduction (read from its graph by ``observe_loss``): a mismatch
    would scale every layer's ``U`` by ``√N``; no layer gets curvature, one warning names the setting to use."""
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    model = _mlp()
    x, y = _batch()
    seng = SENG(model, damping=DAMPING, update_freq=1, loss_reduction=setting)
    model.zero_grad()
    loss = F.cross_entropy(model(x), y, reduction=reduction)
    seng.observe_loss(loss)
    loss.backward()
    before = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    seng.step()
    for k, p in model.named_parameters():
        assert rel_err(p.grad, before[k] / (1 + DAMPING)) < 1e-12, k
    messages = _warnings(caplog)
    assert len(messages) == 1 and f"loss_reduction='{reduction}'" in messages[0].split("set ")[-1]


@pytest.mark.parametrize("make_loss,weights", [
    (lambda out, y: F.cross_entropy(out, y), [1 / N]),
    (lambda out, y: F.cross_entropy(out, y, reduction="sum") / N, [1 / N]),
    (lambda out, y: F.cross_entropy(out, y, reduction="none").sum() * 1024 / 2, [512.0]),
    (lambda out, y: F.mse_loss(out, torch.zeros_like(out)), [1 / N]),
    (lambda out, y: F.cross_entropy(out, y) + 1e-3 * sum(p.square().sum() for p in _mlp().parameters()), [1 / N]),
    (lambda out, y: F.cross_entropy(out, y) + F.cross_entropy(out, y, reduction="sum"), [1 / N, 1.0]),
    (lambda out, y: F.cross_entropy(out, y) * out.sum(), None),
], ids=["mean", "sum-over-N", "scaled-sum", "mse", "with-penalty", "two-terms", "not-a-constant-factor"])
def test_batch_weights_read_the_loss_graph(make_loss, weights):
    x, y = _batch()
    out = _mlp(1)(x)
    got = identity.batch_weights(make_loss(out, y), N)
    assert got == (None if weights is None else pytest.approx(weights))


def test_a_matching_reduction_under_a_loss_scale_passes(caplog):
    """Accumulation's ``1/k`` and an AMP-like scale are constant factors the loss scale accounts for."""
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    model = _mlp()
    x, y = _batch()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    model.zero_grad()
    loss = F.cross_entropy(model(x), y) * 64.0
    seng.observe_loss(loss)
    loss.backward()
    for p in model.parameters():  # unscaled, as AMP's GradScaler does before the step
        p.grad.div_(64.0)
    seng.step(loss_scale=64.0)
    assert _warnings(caplog) == [] and seng._reasons == {}


def test_an_amp_loss_scale_not_passed_to_the_step_is_announced(caplog):
    """The loss carried a factor 1024 into backward and ``.grad`` was unscaled, but ``seng.step()`` was not told:
    the captured output gradients are 1024 times too large for ``.grad``; every layer falls back, one warning each
    naming ``loss_scale``. Passing it keeps every layer exact (no warning)."""
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    for passed in (False, True):
        caplog.clear()
        model = _mlp()
        x, y = _batch()
        seng = SENG(model, damping=DAMPING, update_freq=1)
        model.zero_grad()
        (F.cross_entropy(model(x), y) * 1024.0).backward()
        for p in model.parameters():
            p.grad.div_(1024.0)
        seng.step(loss_scale=1024.0 if passed else 1.0)
        messages = _warnings(caplog)
        if passed:
            assert messages == [] and seng._reasons == {}
        else:
            assert _fallen_back(seng) == {"0", "2"} and all("loss_scale" in m for m in messages)
        seng.remove()
