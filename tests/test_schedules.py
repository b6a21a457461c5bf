import math

import pytest

from lightning_seng.schedules import ConstantDamping, ExponentialDamping, LambdaDamping, make_damping
from tests.recipe_formulas import imagenet_damping


def test_exponential_damping_decays_by_rate_every_period():
    s = ExponentialDamping(1.0, rate=0.5, period=10)
    assert s(0, 0) == 1.0
    assert s(0, 10) == pytest.approx(0.5)
    assert s(0, 5) == pytest.approx(math.sqrt(0.5))
    assert ExponentialDamping(1.0, 0.5, 10, staircase=True)(0, 15) == pytest.approx(0.5)
    assert ExponentialDamping(1.0, 0.5, 1, min_damping=0.1)(0, 20) == pytest.approx(0.1)


def test_make_damping_accepts_numbers_schedules_and_callables():
    assert isinstance(make_damping(0.3), ConstantDamping)
    s = ExponentialDamping(1.0, 0.5)
    assert make_damping(s) is s
    f = make_damping(lambda step, epoch: 1.0 / (1 + step))
    assert isinstance(f, LambdaDamping) and f(3, 0) == 0.25


@pytest.mark.parametrize("build,key", [
    (lambda: ConstantDamping(0), "damping"), (lambda: ConstantDamping(float("nan")), "damping"),
    (lambda: ExponentialDamping(1.0, rate=0), "rate"), (lambda: ExponentialDamping(1.0, 0.5, period=0), "period"),
    (lambda: ExponentialDamping(1.0, 0.5, min_damping=-1), "min_damping"), (lambda: make_damping(True), "damping"),
    (lambda: make_damping(lambda s, e: -1.0)(0, 0), "damping"),
])
def test_bad_schedule_values_name_the_key(build, key):
    with pytest.raises(ValueError, match=key):
        build()


def test_damping_per_step_follows_the_fractional_epoch_of_the_imagenet_recipe():
    batches = 5005  # ImageNet-1k at 4 x 64
    s = ExponentialDamping(0.17, rate=0.9, period=10, steps_per_epoch=batches, step_offset=1)
    steps = [0, 1, 2502, 5003, 5004, 5005, 10 * batches - 1, 37 * batches + 1234, 50 * batches - 1]
    for k in steps:
        # the epoch argument is ignored once steps_per_epoch is set: time comes from the step
        assert s(k, k // batches) == pytest.approx(imagenet_damping(k, batches), rel=1e-14, abs=0), k
    assert s(10 * batches - 1, 9) == pytest.approx(0.17 * 0.9, rel=1e-14)
    assert s(0, 0) < 0.17 and s(1, 0) < s(0, 0)  # moves inside the first epoch


def test_damping_per_step_without_offset_starts_at_the_initial_value():
    s = ExponentialDamping(2.0, rate=0.5, period=1, steps_per_epoch=4)
    assert [s(k, 0) for k in range(5)] == pytest.approx([2.0 * 0.5 ** (k / 4) for k in range(5)], rel=1e-15)
    assert ExponentialDamping(2.0, 0.5, 1, staircase=True, steps_per_epoch=4)(3, 0) == 2.0
    assert ExponentialDamping(2.0, 0.5, 1, staircase=True, steps_per_epoch=4)(4, 0) == 1.0


def test_auto_steps_per_epoch_must_be_resolved_before_use():
    s = ExponentialDamping(0.17, rate=0.9, period=10, steps_per_epoch="auto", step_offset=1)
    with pytest.raises(ValueError, match=r"steps_per_epoch='auto' has not been resolved"):
        s(0, 0)
    s.set_steps_per_epoch(3)
    assert s(4, 1) == pytest.approx(0.17 * 0.9 ** (5 / 30), rel=1e-15)
    assert s.steps_per_epoch == "auto"  # stays auto: a later fit resolves it again
    s.set_steps_per_epoch(5)
    assert s(4, 1) == pytest.approx(0.17 * 0.9 ** (5 / 50), rel=1e-15)


def test_a_fixed_steps_per_epoch_is_not_overridden_by_the_trainer():
    s = ExponentialDamping(1.0, rate=0.5, steps_per_epoch=2)
    s.set_steps_per_epoch(10)
    assert s(2, 0) == pytest.approx(0.5)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"steps_per_epoch": 0}, r"steps_per_epoch must be None, 'auto' or an int >= 1 \(got 0\)"),
    ({"steps_per_epoch": "each"}, r"steps_per_epoch must be None, 'auto' or an int >= 1 \(got 'each'\)"),
    ({"steps_per_epoch": 2.0}, r"steps_per_epoch must be None, 'auto' or an int >= 1 \(got 2.0\)"),
    ({"step_offset": -1}, r"step_offset must be an int >= 0 \(got -1\)"),
    ({"step_offset": 0.5}, r"step_offset must be an int >= 0 \(got 0.5\)"),
])
def test_bad_time_settings_name_the_key_value_and_what_is_allowed(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ExponentialDamping(1.0, rate=0.5, **kwargs)


def test_set_steps_per_epoch_rejects_a_bad_count():
    with pytest.raises(ValueError, match=r"steps_per_epoch must be an int >= 1 \(got 0\)"):
        ExponentialDamping(1.0, rate=0.5, steps_per_epoch="auto").set_steps_per_epoch(0)
