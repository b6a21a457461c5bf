"""Damping schedules: λ as a function of the optimizer step and the epoch.

The paper decays the damping together with the learning rate; the exponential schedule here is
``λ_k = λ_0 · r^(epoch / T)``. Any callable ``(step, epoch) -> float`` works as well.
"""

from __future__ import annotations

import math
from typing import Callable, Union


class DampingSchedule:
    """Base class: ``value(step, epoch)`` returns the damping λ > 0."""

    def value(self, step: int, epoch: int) -> float:
        raise NotImplementedError

    def __call__(self, step: int, epoch: int) -> float:
        return self.value(step, epoch)


def _check_positive(key: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{key} must be a finite number > 0 (got {value!r})")
    return float(value)


class ConstantDamping(DampingSchedule):
    """``λ_k = λ_0``."""

    def __init__(self, damping: float):
        self.damping = _check_positive("damping", damping)

    def value(self, step: int, epoch: int) -> float:
        return self.damping

    def __repr__(self) -> str:
        return f"ConstantDamping({self.damping})"


class ExponentialDamping(DampingSchedule):
    """``λ = λ_0 · rate^(epoch / period)``, optionally floored at ``min_damping``.

    ``staircase=True`` uses ``floor(epoch / period)`` (decay every ``period`` epochs, as step LR
    schedules do); otherwise the decay is smooth in the epoch.
    """

    def __init__(self, damping: float, rate: float, period: float = 1.0, min_damping: float = 0.0,
                 staircase: bool = False):
        self.damping = _check_positive("damping", damping)
        self.rate = _check_positive("rate", rate)
        self.period = _check_positive("period", period)
        if (isinstance(min_damping, bool) or not isinstance(min_damping, (int, float))
                or not math.isfinite(min_damping) or min_damping < 0):
            raise ValueError(f"min_damping must be a finite number >= 0 (got {min_damping!r})")
        if not isinstance(staircase, bool):
            raise ValueError(f"staircase must be True or False (got {staircase!r})")
        self.min_damping = float(min_damping)
        self.staircase = staircase

    def value(self, step: int, epoch: int) -> float:
        exponent = epoch / self.period
        if self.staircase:
            exponent = math.floor(exponent)
        return max(self.damping * self.rate ** exponent, self.min_damping)

    def __repr__(self) -> str:
        return (f"ExponentialDamping({self.damping}, rate={self.rate}, period={self.period}, "
                f"min_damping={self.min_damping}, staircase={self.staircase})")


class LambdaDamping(DampingSchedule):
    """Wraps any ``fn(step, epoch) -> float``; the returned value is checked at every call."""

    def __init__(self, fn: Callable[[int, int], float]):
        if not callable(fn):
            raise ValueError(f"damping must be a number, a DampingSchedule or a callable (got {fn!r})")
        self.fn = fn

    def value(self, step: int, epoch: int) -> float:
        return _check_positive(f"damping({step=}, {epoch=})", self.fn(step, epoch))

    def __repr__(self) -> str:
        return f"LambdaDamping({self.fn!r})"


DampingLike = Union[float, DampingSchedule, Callable[[int, int], float]]


def make_damping(damping: DampingLike) -> DampingSchedule:
    """Turn a number, a schedule or a callable into a :class:`DampingSchedule`."""
    if isinstance(damping, DampingSchedule):
        return damping
    if isinstance(damping, (int, float)) and not isinstance(damping, bool):
        return ConstantDamping(damping)
    if callable(damping):
        return LambdaDamping(damping)
    raise ValueError(f"damping must be a number > 0, a DampingSchedule or a callable (step, epoch) -> float "
                     f"(got {damping!r})")
