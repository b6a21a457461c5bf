import math

import pytest

from lightning_seng.schedules import ConstantDamping, ExponentialDamping, LambdaDamping, make_damping


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
