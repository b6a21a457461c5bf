"""The learning-rate schedule every optimizer of the benchmark shares."""
import math

import pytest
import torch
from omegaconf import OmegaConf

from benchmarks.lr_schedule import attach, check_schedule, lr_factor


def test_poly_follows_one_minus_t_over_T_to_the_power():
    # 10 steps per epoch, horizon 4 epochs: after 10 steps t = 1, factor (1 - 1/4)^6
    assert lr_factor(10, 10, "poly", 0.0, 4.0, 6.0) == pytest.approx(0.75 ** 6)
    assert lr_factor(40, 10, "poly", 0.0, 4.0, 6.0) == 0.0
    assert lr_factor(55, 10, "poly", 0.0, 4.0, 6.0) == 0.0  # past the horizon: stays at 0


def test_cosine_is_half_at_mid_horizon():
    assert lr_factor(20, 10, "cosine", 0.0, 4.0, 1.0) == pytest.approx(0.5)
    assert lr_factor(0, 10, "cosine", 0.0, 4.0, 1.0) == pytest.approx(1.0)


def test_warmup_rises_linearly_then_the_decay_starts_from_one():
    assert lr_factor(0, 10, "constant", 1.0, 4.0, 1.0) == pytest.approx(0.1)
    assert lr_factor(4, 10, "constant", 1.0, 4.0, 1.0) == pytest.approx(0.5)
    assert lr_factor(10, 10, "poly", 1.0, 4.0, 2.0) == pytest.approx(1.0)
    assert lr_factor(25, 10, "poly", 1.0, 4.0, 2.0) == pytest.approx(0.5 ** 2)


def test_attach_sets_the_lr_of_the_wrapped_optimizer_every_step():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    cfg = OmegaConf.create({"name": "cosine", "power": 1, "warmup_epochs": 0, "decay_epochs": None})
    sched = attach(opt, cfg, steps_per_epoch=5, budget_epochs=2)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi / 2)))


def test_an_unknown_schedule_is_refused_naming_the_key():
    cfg = OmegaConf.create({"name": "step", "power": 1, "warmup_epochs": 0, "decay_epochs": None})
    with pytest.raises(ValueError, match=r"schedule.name must be one of \['constant', 'cosine', 'poly'\] \(got 'step'\)"):
        check_schedule(cfg)
