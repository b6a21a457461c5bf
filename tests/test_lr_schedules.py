"""scheduler=poly: warm-up then polynomial decay per optimizer step; each lr against the recipe's own formula."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_seng.recipes.lr_schedules import WarmupPolyFactor, warmup_poly
from tests.recipe_formulas import cifar_lr, imagenet_lr


def _lrs(scheduler, steps):
    """The learning rate used by optimizer steps 0 .. steps-1 (LambdaLR is stepped after each one)."""
    out = []
    for _ in range(steps):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def _sgd(lr, groups=1):
    params = [nn.Parameter(torch.zeros(1)) for _ in range(groups)]
    return torch.optim.SGD([{"params": [p]} for p in params], lr=lr, momentum=0.9)


def test_cifar_recipe_lr_equals_the_formula_at_every_step_of_65_epochs():
    batches = 196  # 50,000 images at batch 256, last batch partial
    scheduler = warmup_poly(_sgd(0.05), steps_per_epoch=batches, decay_epochs=70, power=6, step_offset=1)
    lrs = _lrs(scheduler, 65 * batches)
    expected = [cifar_lr(k, batches) for k in range(65 * batches)]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=0)
    assert lrs[-1] == pytest.approx(0.05 * (5 / 70) ** 6, rel=1e-12)  # e = 65 at the last step


def test_imagenet_recipe_lr_has_warm_up_poly_decay_and_the_drop_after_epoch_39():
    batches = 7
    scheduler = warmup_poly(_sgd(0.145), steps_per_epoch=batches, decay_epochs=60, power=6, warmup_epochs=5,
                            warmup_start_lr=0.01, step_offset=1, milestones=[40], gamma=0.1)
    lrs = _lrs(scheduler, 50 * batches)
    assert lrs == pytest.approx([imagenet_lr(k, batches) for k in range(50 * batches)], rel=1e-12, abs=0)
    assert lrs[0] == pytest.approx(0.01 + 0.135 / (5 * batches), rel=1e-12)
    assert lrs[5 * batches - 1] == pytest.approx(0.145, rel=1e-12)  # t = 5 closes the warm-up
    drop = 40 * batches
    assert lrs[drop] / lrs[drop - 1] == pytest.approx(0.1 * (1 - 35 / 60 - 1 / (60 * batches)) ** 6
                                                      / (1 - 35 / 60) ** 6, rel=1e-12)


def test_step_offset_zero_starts_at_the_base_lr():
    scheduler = warmup_poly(_sgd(0.2), steps_per_epoch=4, decay_epochs=2, power=2)
    assert _lrs(scheduler, 9) == pytest.approx([0.2 * (1 - k / 8) ** 2 for k in range(8)] + [0.0], rel=1e-12)


def test_each_parameter_group_warms_up_to_its_own_lr():
    optimizer = _sgd(0.1, groups=2)
    optimizer.param_groups[1]["lr"] = 0.4
    scheduler = warmup_poly(optimizer, steps_per_epoch=2, decay_epochs=10, power=1, warmup_epochs=1,
                            warmup_start_lr=0.02)
    scheduler.optimizer.step()
    scheduler.step()  # t = 1/2: half way
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.06, 0.21], rel=1e-12)


def test_state_dict_restores_the_schedule_in_a_fresh_scheduler():
    first = warmup_poly(_sgd(0.145), steps_per_epoch=3, decay_epochs=60, power=6, warmup_epochs=5,
                        warmup_start_lr=0.01, step_offset=1)
    _lrs(first, 5)
    state = first.state_dict()
    second = warmup_poly(_sgd(0.145), steps_per_epoch=100, decay_epochs=1, power=1)
    second.load_state_dict(state)
    second.step()  # applies the restored factor at step 6
    assert second.optimizer.param_groups[0]["lr"] == pytest.approx(imagenet_lr(6, 3), rel=1e-12)
    assert second.lr_lambdas[0].steps_per_epoch == 3


@pytest.mark.parametrize("key, value, allowed", [
    ("steps_per_epoch", 0, "an int >= 1"),
    ("steps_per_epoch", 2.5, "an int >= 1"),
    ("decay_epochs", 0, "> 0"),
    ("power", -1.0, "> 0"),
    ("power", math.nan, "> 0"),
    ("warmup_epochs", -1, ">= 0"),
    ("warmup_start_lr", -0.1, ">= 0"),
    ("step_offset", -1, "an int >= 0"),
    ("step_offset", True, "an int >= 0"),
    ("milestones", [0], "a list of epochs, each an int >= 1"),
    ("milestones", "40", "a list of epochs, each an int >= 1"),
    ("gamma", 0.0, "> 0"),
])
def test_bad_values_name_the_key_the_value_and_what_is_allowed(key, value, allowed):
    kwargs = dict(steps_per_epoch=10, decay_epochs=5, power=2.0)
    kwargs[key] = value
    with pytest.raises(ValueError, match=rf"{key} must be .*{allowed}.*\(got {value!r}\)".replace("[", r"\[")):
        warmup_poly(_sgd(0.1), **kwargs)


def test_warm_up_needs_a_positive_base_lr():
    with pytest.raises(ValueError, match=r"optimizer.lr \(with warmup_epochs > 0\) must be .*> 0 \(got 0.0\)"):
        WarmupPolyFactor(0.0, steps_per_epoch=2, decay_epochs=1, power=1, warmup_epochs=1)
