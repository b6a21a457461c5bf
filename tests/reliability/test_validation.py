"""Bad input at the boundary: every SENG and damping-schedule argument rejects bad values with a
ValueError naming the key, the value and what is allowed; excluded modules are listed once at attach
time and fall back to ``g / (1 + λ)``."""

import logging
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_seng import SENG
from lightning_seng.schedules import ConstantDamping, ExponentialDamping, LambdaDamping, make_damping
from tests.modules import Scale
from tests.reference import dense_direction
from tests.reliability._reference import rel_err, seng_blocks

nan, inf = math.nan, math.inf


def _model():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


# (key, bad value, fragment of the allowed values that the message must state)
SENG_CASES = [
    ("damping", -1.0, "> 0"), ("damping", 0, "> 0"), ("damping", nan, "> 0"), ("damping", inf, "> 0"),
    ("damping", True, "> 0"), ("damping", "0.5", "> 0"), ("damping", None, "> 0"),
    ("update_freq", 0, ">= 1"), ("update_freq", -3, ">= 1"), ("update_freq", 2.5, ">= 1"),
    ("update_freq", True, ">= 1"), ("update_freq", "10", ">= 1"), ("update_freq", None, ">= 1"),
    ("sketch_size", 0, ">= 1"), ("sketch_size", -4, ">= 1"), ("sketch_size", 8.0, ">= 1"),
    ("sketch_size", True, ">= 1"), ("sketch_size", "8", ">= 1"),
    ("svd_rank", 0, ">= 1"), ("svd_rank", 1.5, ">= 1"), ("svd_rank", None, ">= 1"),
    ("implicit_threshold", -1, ">= 0"), ("implicit_threshold", 7e5, ">= 0"),
    ("loss_reduction", "avg", "['mean', 'sum']"), ("loss_reduction", None, "['mean', 'sum']"),
    ("loss_reduction", "MEAN", "['mean', 'sum']"),
    ("route", "fast", "['auto', 'threshold', 'explicit', 'gram', 'implicit']"),
    ("route", None, "['auto', 'threshold', 'explicit', 'gram', 'implicit']"),
    ("curvature_dtype", torch.float16, "torch.float32, torch.float64 or None"),
    ("curvature_dtype", torch.bfloat16, "torch.float32, torch.float64 or None"),
    ("curvature_dtype", torch.int64, "torch.float32, torch.float64 or None"),
    ("curvature_dtype", "float16", "torch.float32, torch.float64 or None"),
    ("seed", -1, ">= 0"), ("seed", 1.5, ">= 0"), ("seed", "0", ">= 0"), ("seed", None, ">= 0"),
    ("include", 5, "module names"), ("include", [3], "module names"), ("include", [None], "module names"),
    ("exclude", 7, "module names"), ("exclude", ["0", 1.5], "module names"),
    ("skip_nonfinite", "no", "True or False"), ("skip_nonfinite", None, "True or False"),
    ("comm", object(), "Communicator"), ("comm", "gloo", "Communicator"),
]


def _id(value):
    return repr(value) if isinstance(value, (bool, int, float, str, list, type(None))) else type(value).__name__


def _assert_message(err, key, value, allowed):
    msg = str(err.value)
    assert re.search(rf"(^|[^\w]){re.escape(key)}([^\w]|$)", msg), msg
    assert repr(value) in msg or type(value).__name__ in msg, msg
    assert allowed in msg, msg


@pytest.mark.parametrize("key, value, allowed", SENG_CASES, ids=[f"{k}={_id(v)}" for k, v, _ in SENG_CASES])
def test_seng_rejects_bad_argument_naming_key_value_and_allowed(key, value, allowed):
    model = _model()
    with pytest.raises(ValueError) as err:
        SENG(model, **{key: value})
    _assert_message(err, key, value, allowed)
    # a rejected construction leaves no hooks behind
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("value", ["net", None, torch.randn(3)], ids=["str", "None", "tensor"])
def test_seng_rejects_a_model_that_is_not_a_module(value):
    with pytest.raises(ValueError) as err:
        SENG(value)
    assert "model" in str(err.value) and "torch.nn.Module" in str(err.value)
    assert type(value).__name__ in str(err.value)


SCHEDULE_CASES = [
    ("damping", lambda v: ConstantDamping(v), [-1.0, 0, nan, inf, "1", None], "> 0"),
    ("damping", lambda v: ExponentialDamping(v, rate=0.5), [-2.0, 0.0, nan], "> 0"),
    ("rate", lambda v: ExponentialDamping(1.0, rate=v), [0, -0.5, nan, inf, "0.5"], "> 0"),
    ("period", lambda v: ExponentialDamping(1.0, rate=0.5, period=v), [0, -1, nan, inf], "> 0"),
    ("min_damping", lambda v: ExponentialDamping(1.0, rate=0.5, min_damping=v), [-0.1, nan, inf, "0"], ">= 0"),
    ("staircase", lambda v: ExponentialDamping(1.0, rate=0.5, staircase=v), ["yes", None, 2], "True or False"),
    ("damping", lambda v: LambdaDamping(v), [3, "x", None], "callable"),
    ("damping", lambda v: make_damping(v), ["fast", None, [0.5]], "callable"),
]
SCHEDULE_PARAMS = [(key, build, v, allowed) for key, build, values, allowed in SCHEDULE_CASES for v in values]


@pytest.mark.parametrize("key, build, value, allowed", SCHEDULE_PARAMS,
                         ids=[f"{k}={_id(v)}-{i}" for i, (k, _, v, _) in enumerate(SCHEDULE_PARAMS)])
def test_schedule_rejects_bad_argument_naming_key_value_and_allowed(key, build, value, allowed):
    with pytest.raises(ValueError) as err:
        build(value)
    _assert_message(err, key, value, allowed)


@pytest.mark.parametrize("value", [-1.0, 0.0, nan, inf])
def test_callable_damping_is_checked_when_used(value):
    seng = SENG(_model(), damping=lambda step, epoch: value)
    with pytest.raises(ValueError) as err:
        seng.damping
    msg = str(err.value)
    assert "damping" in msg and repr(value) in msg and "> 0" in msg and "step=0" in msg


@pytest.mark.parametrize("value", [-1, 1.5, None])
def test_set_epoch_rejects_bad_epoch(value):
    seng = SENG(_model())
    with pytest.raises(ValueError) as err:
        seng.set_epoch(value)
    _assert_message(err, "epoch", value, ">= 0")


@pytest.mark.parametrize("value", [0.0, -2.0, nan, inf, "1"])
def test_step_rejects_bad_loss_scale_without_touching_gradients(value):
    model = _model()
    seng = SENG(model, update_freq=1)
    F.cross_entropy(model(torch.randn(6, 4)), torch.randint(0, 3, (6,))).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError) as err:
        seng.step(loss_scale=value)
    _assert_message(err, "loss_scale", value, "> 0")
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert seng.step_count == 0


# ---------------------------------------------------------------------------- excluded layers
class TokenModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.pos = nn.Embedding(4, 6)
        self.fc = nn.Linear(6, 7)
        self.scale = Scale(7)
        self.head = nn.Linear(7, 3)

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos.weight[: tokens.shape[1]]
        return self.head(self.scale(torch.tanh(self.fc(h.mean(1)))))


FALLBACK = ["embed", "pos", "scale"]


def test_fallback_modules_are_named_in_one_warning_and_the_coverage_table(caplog):
    caplog.set_level(logging.DEBUG, logger="lightning_seng")
    seng = SENG(TokenModel().double(), damping=0.3, exclude=FALLBACK)
    records = [r for r in caplog.records if r.name.startswith("lightning_seng")]
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and all(f"'{m}'" in warnings[0] for m in FALLBACK), warnings
    assert "'fc'" not in warnings[0] and "'head'" not in warnings[0]
    table = [r.getMessage() for r in records if r.levelno == logging.INFO and "coverage" in r.getMessage()]
    assert len(table) == 1 and all(m in table[0] for m in FALLBACK + ["fc", "head"])
    assert set(seng.layers) == {"fc", "head"}
    cov = seng.coverage()
    assert {r.module: r.curvature for r in cov} == {"embed": False, "pos": False, "fc": True, "scale": False,
                                                     "head": True}
    assert cov.covered == 6 * 7 + 7 + 7 * 3 + 3 and cov.total == cov.covered + 11 * 6 + 4 * 6 + 7


def test_excluded_parameters_get_gradient_over_one_plus_damping():
    damping = 0.3
    model = TokenModel().double()
    x = torch.randint(0, 11, (9, 4))
    y = torch.randint(0, 3, (9,))
    names = ["fc.weight", "fc.bias", "head.weight", "head.bias"]
    ref = seng_blocks(model, F.cross_entropy, x, y, damping, [names[:2], names[2:]])
    seng = SENG(model, damping=damping, update_freq=1, exclude=FALLBACK)
    F.cross_entropy(model(x), y).backward()
    raw = {k: p.grad.clone() for k, p in model.named_parameters()}
    seng.step()
    params = dict(model.named_parameters())
    for k in ("embed.weight", "pos.weight", "scale.gain"):
        assert raw[k].abs().sum() > 0
        assert torch.allclose(params[k].grad, raw[k] / (1 + damping), rtol=1e-15, atol=0), k
    for k in names:
        assert rel_err(params[k].grad, ref[k]) < 1e-10, k


def test_excluded_recurrent_layer_falls_back_and_the_head_stays_exact():
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(4, 5, batch_first=True)
            self.head = nn.Linear(5, 3)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    damping = 0.3
    model = Recurrent().double()
    x, y = torch.randn(6, 3, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    # per-sample gradients by a loop (torch.func's vmap has no batching rule for nn.GRU)
    names = ["head.weight", "head.bias"]
    per_sample = {k: [] for k in names}
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for k, p in model.named_parameters():
            if k in names:
                per_sample[k].append(p.grad.clone())
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    g = {k: p.grad.clone() for k, p in model.named_parameters() if k in names}
    model.zero_grad(set_to_none=True)
    ref = dense_direction({k: torch.stack(v) for k, v in per_sample.items()}, g, damping, x.shape[0] ** -0.5)
    seng = SENG(model, damping=damping, update_freq=1, exclude=["rnn"])
    F.cross_entropy(model(x), y).backward()
    raw = {k: p.grad.clone() for k, p in model.named_parameters()}
    seng.step()
    for k, p in model.named_parameters():
        if k.startswith("rnn."):
            assert torch.allclose(p.grad, raw[k] / (1 + damping), rtol=1e-15, atol=0), k
        else:
            assert rel_err(p.grad, ref[k]) < 1e-10, k


@pytest.mark.parametrize("make, x", [
    (lambda: nn.Sequential(), lambda: torch.randn(3, 4, requires_grad=True)),
    (lambda: nn.ReLU(), lambda: torch.randn(3, 4, requires_grad=True)),
    (lambda: nn.PReLU(), lambda: torch.randn(3, 4, requires_grad=True)),
    (lambda: nn.Linear(4, 4).requires_grad_(False), lambda: torch.randn(3, 4, requires_grad=True)),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False)), lambda: torch.randn(3, 4)),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4, elementwise_affine=False)), lambda: torch.randn(3, 4)),
], ids=["empty", "no-parameters", "only-unsupported", "all-frozen", "batchnorm-no-affine", "layernorm-no-affine"])
def test_degenerate_models_attach_and_step(make, x):
    model = make()
    seng = SENG(model, damping=0.5, update_freq=1)
    for _ in range(2):
        model(x()).square().sum().backward()
        seng.step()
    assert seng.step_count == 2
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
