"""Levenberg–Marquardt damping: the quadratic model against a dense float64 reference (per-sample gradients from
``torch.func``, explicit ``F``), the update rule, when feedback is due, resume, and the settings' checks."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_seng import SENG, LevenbergMarquardt
from tests.reference import per_sample_gradients

D = torch.float64


class Scaled(nn.Module):
    """An MLP whose output is multiplied by a bare parameter, left out (``exclude``): it gets g / (1 + λ)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        self.gain = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.body(x) * self.gain


def _setup(damping=0.7, every=1, update_freq=1):
    torch.manual_seed(0)
    model = Scaled().double()
    seng = SENG(model, damping=LevenbergMarquardt(damping, every=every), update_freq=update_freq, exclude=[Scaled])
    return model, seng


def _reference_rho(model, x, y, step_fn, damping):
    """ρ from dense matrices: U rows ∇ℓ_n/√N per layer (the empirical Fisher), F = UᵀU per layer, identity for
    the uncovered gain; δ the parameters' move; the loss before and after on the batch."""
    names = [k for k, _ in model.named_parameters()]
    ps = per_sample_gradients(model, F.cross_entropy, x, y, names)
    n = x.shape[0]
    theta = {k: p.detach().clone() for k, p in model.named_parameters()}
    model.zero_grad()
    before = F.cross_entropy(model(x), y)
    before.backward()
    g = {k: p.grad.clone() for k, p in model.named_parameters()}
    step_fn()
    with torch.no_grad():
        after = F.cross_entropy(model(x), y)
    delta = {k: p.detach() - theta[k] for k, p in model.named_parameters()}
    quad = 0.0
    for layer in ("body.0", "body.2"):
        keys = [f"{layer}.weight", f"{layer}.bias"]
        U = torch.cat([ps[k].reshape(n, -1) for k in keys], 1) / n ** 0.5
        dv = torch.cat([delta[k].reshape(-1) for k in keys])
        quad += dv @ (U.T @ U + damping * torch.eye(U.shape[1], dtype=D)) @ dv
    quad += (1 + damping) * delta["gain"].square().sum()
    slope = sum((g[k] * delta[k]).sum() for k in names)
    model_change = slope + 0.5 * quad
    return float((after - before) / model_change), float(before), float(after)


def test_rho_is_the_dense_quadratic_models():
    """SENG's ρ after a real step (SENG direction, SGD lr 0.5) equals the dense model's for the same move, replayed
    on an untouched copy of the model."""
    model, seng = _setup(damping=0.7)
    assert [(row.module, row.curvature) for row in seng.coverage().rows] == [("", False), ("body.0", True), ("body.2", True)]
    ref_model = copy.deepcopy(model)
    x, y = torch.randn(6, 5, dtype=D), torch.randint(0, 3, (6,))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.0)
    model.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert not seng.damping_feedback_due
    theta = [p.detach().clone() for p in model.parameters()]
    seng.step()
    opt.step()
    assert seng.damping_feedback_due
    with torch.no_grad():
        after = F.cross_entropy(model(x), y)
    moved = [p.detach() - t for p, t in zip(model.parameters(), theta)]
    rho = seng.adapt_damping(loss.item(), float(after))
    assert not seng.damping_feedback_due

    def replay():
        with torch.no_grad():
            for p, m in zip(ref_model.parameters(), moved):
                p.add_(m)

    rho_ref, before_ref, after_ref = _reference_rho(ref_model, x, y, replay, 0.7)
    assert before_ref == pytest.approx(loss.item(), rel=1e-12) and after_ref == pytest.approx(float(after), rel=1e-12)
    assert rho == pytest.approx(rho_ref, rel=1e-10)
    assert seng.stats["lm_rho"] == rho


@pytest.mark.parametrize("rho,factor", [(1.0, 0.95 ** 2), (0.5, 1.0), (0.1, 0.95 ** -2), (-math.inf, 0.95 ** -2),
                                        (math.nan, 1.0)])
def test_update_rule(rho, factor):
    schedule = LevenbergMarquardt(1.0, every=2, decay=0.95)
    assert schedule.update(rho) == pytest.approx(factor, rel=1e-12)


def test_update_stays_within_the_bounds():
    schedule = LevenbergMarquardt(1.0, every=1, decay=0.5, min_damping=0.3, max_damping=3.0)
    assert [schedule.update(1.0) for _ in range(3)] == [0.5, 0.3, 0.3]
    assert [schedule.update(0.0) for _ in range(4)] == [0.6, 1.2, 2.4, 3.0]


def _train_step(model, seng, opt, x, y, after=None):
    """backward, SENG, optimizer; then, when feedback is due, ``adapt_damping`` with the batch's loss again (or
    ``after``). Returns ``ρ``, or ``None`` when no feedback was due."""
    model.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    seng.step()
    opt.step()
    if not seng.damping_feedback_due:
        return None
    if after is None:
        with torch.no_grad():
            after = float(F.cross_entropy(model(x), y))
    return seng.adapt_damping(loss.item(), after)


def test_feedback_is_due_every_k_steps_and_only_then():
    model, seng = _setup(every=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    due = [_train_step(model, seng, opt, torch.randn(4, 5, dtype=D), torch.randint(0, 3, (4,))) is not None
           for _ in range(7)]
    assert due == [True, False, False, True, False, False, True]
    with pytest.raises(ValueError, match="adapt_damping.*damping_feedback_due"):
        seng.adapt_damping(1.0, 0.5)


def test_tiny_steps_lower_the_damping_and_a_blow_up_raises_it():
    model, seng = _setup(damping=1.0, every=1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    x, y = torch.randn(8, 5, dtype=D), torch.randint(0, 3, (8,))
    for _ in range(3):
        rho = _train_step(model, seng, opt, x, y)
        assert 0.9 < rho < 1.1  # the quadratic model is exact to first order
    assert seng.damping == pytest.approx(0.95 ** 3)
    _train_step(model, seng, opt, x, y, after=math.nan)
    assert seng.damping == pytest.approx(0.95 ** 2) and seng.stats["lm_rho"] == -math.inf


def test_the_adapted_damping_resumes():
    model, seng = _setup(damping=1.0, every=1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    _train_step(model, seng, opt, torch.randn(8, 5, dtype=D), torch.randint(0, 3, (8,)))
    state = seng.state_dict()
    _, fresh = _setup(damping=1.0, every=1)
    fresh.load_state_dict(state)
    assert fresh.damping == seng.damping == pytest.approx(0.95)


def test_a_distributed_communicator_is_refused_at_construction():
    from lightning_seng.distributed import Communicator

    class Ranks(Communicator):
        """Stands for any communicator of several processes."""

    with pytest.raises(ValueError, match="LevenbergMarquardt.*one process.*comm=Ranks"):
        SENG(Scaled().double(), damping=LevenbergMarquardt(1.0), comm=Ranks())


@pytest.mark.parametrize("kwargs,key", [(dict(every=0), "every"), (dict(decay=1.0), "decay"),
                                        (dict(lower=0.8, upper=0.5), "lower and upper"),
                                        (dict(min_damping=0.0), "min_damping"),
                                        (dict(damping=10.0, max_damping=5.0), "within")])
def test_bad_settings_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        LevenbergMarquardt(**kwargs)
