"""Damping schedules: λ as a function of the optimizer step and the epoch.

The paper decays the damping together with the learning rate; the exponential schedule here is
``λ_k = λ_0 · r^(t / T)`` with ``t`` the epoch, or the fractional epoch ``t = (step + step_offset) /
steps_per_epoch`` when ``steps_per_epoch`` is given (a per-step decay, as in the authors' ImageNet recipe).
Any callable ``(step, epoch) -> float`` works as well.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union


class DampingSchedule:
    """Base class: ``value(step, epoch)`` returns the damping λ > 0.

    ``step`` counts SENG's steps from 0 (the step about to be taken); ``epoch`` is the integer epoch.
    A schedule built with ``steps_per_epoch`` reads time as the fractional epoch
    ``t = (step + step_offset) / steps_per_epoch`` instead (:meth:`fractional_epoch`); with
    ``steps_per_epoch="auto"`` the Lightning callback supplies the count at fit start
    (:meth:`set_steps_per_epoch`), and a plain loop must pass an int.
    """

    steps_per_epoch: Union[int, str, None] = None
    step_offset: int = 0
    _resolved_steps: Optional[int] = None

    def value(self, step: int, epoch: int) -> float:
        raise NotImplementedError

    def _init_time(self, steps_per_epoch: Union[int, str, None], step_offset: int) -> None:
        if steps_per_epoch not in (None, "auto"):
            _check_count("steps_per_epoch", steps_per_epoch, 1, "None, 'auto' or an int >= 1")
        self.steps_per_epoch = steps_per_epoch
        self.step_offset = _check_count("step_offset", step_offset, 0, "an int >= 0")
        self._resolved_steps = steps_per_epoch if isinstance(steps_per_epoch, int) else None

    def set_steps_per_epoch(self, steps_per_epoch: int) -> None:
        """Resolve ``steps_per_epoch="auto"`` (optimizer steps in one epoch); other settings are kept."""
        steps = _check_count("steps_per_epoch", steps_per_epoch, 1, "an int >= 1")
        if self.steps_per_epoch == "auto":
            self._resolved_steps = steps

    def fractional_epoch(self, step: int, epoch: int) -> float:
        """``epoch`` without ``steps_per_epoch``, else ``(step + step_offset) / steps_per_epoch``."""
        if self.steps_per_epoch is None:
            return epoch
        if self._resolved_steps is None:
            raise ValueError("steps_per_epoch='auto' has not been resolved: SENGCallback sets it from the trainer "
                             "at fit start; in a plain loop pass steps_per_epoch=<optimizer steps per epoch>")
        return (step + self.step_offset) / self._resolved_steps

    def __call__(self, step: int, epoch: int) -> float:
        return self.value(step, epoch)


def _check_positive(key: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{key} must be a finite number > 0 (got {value!r})")
    return float(value)


def _check_count(key: str, value: int, minimum: int, allowed: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be {allowed} (got {value!r})")
    return value


class ConstantDamping(DampingSchedule):
    """``λ_k = λ_0``."""

    def __init__(self, damping: float):
        self.damping = _check_positive("damping", damping)

    def value(self, step: int, epoch: int) -> float:
        return self.damping

    def __repr__(self) -> str:
        return f"ConstantDamping({self.damping})"


class ExponentialDamping(DampingSchedule):
    """``λ = max(λ_0 · rate^(t / period), min_damping)``.

    ``t`` is the integer epoch by default, so λ changes only at epoch boundaries. With
    ``steps_per_epoch`` (an int, or ``"auto"`` to take it from the Lightning trainer) ``t`` is the
    fractional epoch ``(step + step_offset) / steps_per_epoch`` and λ changes at every step;
    ``step_offset=1`` counts the step's own batch as done (the SENG authors' ImageNet recipe:
    ``0.17 · 0.9^(t/10)``). ``staircase=True`` uses ``floor(t / period)`` (decay every ``period``
    epochs, as step LR schedules do).
    """

    def __init__(self, damping: float, rate: float, period: float = 1.0, min_damping: float = 0.0,
                 staircase: bool = False, steps_per_epoch: Union[int, str, None] = None, step_offset: int = 0):
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
        self._init_time(steps_per_epoch, step_offset)

    def value(self, step: int, epoch: int) -> float:
        exponent = self.fractional_epoch(step, epoch) / self.period
        if self.staircase:
            exponent = math.floor(exponent)
        return max(self.damping * self.rate ** exponent, self.min_damping)

    def __repr__(self) -> str:
        return (f"ExponentialDamping({self.damping}, rate={self.rate}, period={self.period}, "
                f"min_damping={self.min_damping}, staircase={self.staircase}, "
                f"steps_per_epoch={self.steps_per_epoch!r}, step_offset={self.step_offset})")


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


class LevenbergMarquardt(DampingSchedule):
    """λ adapted by the Levenberg–Marquardt rule from SENG's own quadratic model (Moré 1978; as in K-FAC).

    Every ``every`` steps SENG keeps the step's gradient ``g`` and parameters; after the optimizer moved them by
    ``δ`` and the loss was taken again on the same batch, :meth:`lightning_seng.SENG.adapt_damping` compares the
    loss change with the model's prediction

        ρ = (L(θ + δ) − L(θ)) / M(δ),   M(δ) = gᵀδ + ½ δᵀ(F + λI)δ,

    with ``F`` the committed curvature (``δᵀFδ = ‖Uδ‖²`` per layer; the identity for parameters that get
    ``g / (1 + λ)``). Then ``λ ← λ / ω`` if ``ρ < lower`` (or the new loss is not finite), ``λ ← λ · ω`` if
    ``ρ > upper``, with ``ω = decay^every``, kept within ``[min_damping, max_damping]``. A step the model
    predicts no decrease for (``M(δ) ≥ 0``) leaves λ alone. With a fixed learning rate this is a trust region
    on the step: SENG's step outside the span of ``U`` is about ``lr·g/λ``.
    """

    def __init__(self, damping: float = 1.0, every: int = 5, decay: float = 0.95, lower: float = 0.25,
                 upper: float = 0.75, min_damping: float = 1e-4, max_damping: float = 1e4):
        self.damping = _check_positive("damping", damping)
        self.every = _check_count("every", every, 1, "an int >= 1")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
            raise ValueError(f"decay must be a number in (0, 1) (got {decay!r})")
        self.decay = float(decay)
        if not (isinstance(lower, (int, float)) and isinstance(upper, (int, float)) and 0 <= lower < upper):
            raise ValueError(f"lower and upper must be numbers with 0 <= lower < upper (got lower={lower!r}, "
                             f"upper={upper!r})")
        self.lower, self.upper = float(lower), float(upper)
        self.min_damping = _check_positive("min_damping", min_damping)
        self.max_damping = _check_positive("max_damping", max_damping)
        if not self.min_damping <= self.damping <= self.max_damping:
            raise ValueError(f"damping must lie within [min_damping, max_damping] (got damping={damping!r}, "
                             f"min_damping={min_damping!r}, max_damping={max_damping!r})")
        self.current = self.damping

    def value(self, step: int, epoch: int) -> float:
        return self.current

    def due(self, step: int) -> bool:
        """Whether step ``step`` is measured (every ``every``-th)."""
        return step % self.every == 0

    def update(self, rho: float) -> float:
        """Move λ by the ratio ``rho`` of actual to predicted loss change (``nan``: no information); returns λ."""
        omega = self.decay ** self.every
        if rho < self.lower:  # -inf (a non-finite new loss) included; nan compares False both ways
            self.current = min(self.current / omega, self.max_damping)
        elif rho > self.upper:
            self.current = max(self.current * omega, self.min_damping)
        return self.current

    def state_dict(self) -> dict:
        return {"current": self.current}

    def load_state_dict(self, state: dict) -> None:
        self.current = float(state["current"])

    def __repr__(self) -> str:
        return (f"LevenbergMarquardt({self.damping}, every={self.every}, decay={self.decay}, lower={self.lower}, "
                f"upper={self.upper}, min_damping={self.min_damping}, max_damping={self.max_damping})")


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
