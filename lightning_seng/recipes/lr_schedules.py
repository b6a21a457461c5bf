r"""Learning-rate schedules set at every optimizer step (``scheduler=poly``), built on ``torch.optim.lr_scheduler.LambdaLR``.

:func:`warmup_poly` is linear warm-up followed by polynomial decay, with optional step drops. With
``k`` the optimizer step (from 0), ``S`` the optimizer steps per epoch and ``η`` a parameter group's
learning rate (``optimizer.lr``), time is the fractional epoch ``t = (k + step_offset) / S`` and

.. math::

    \mathrm{lr}_k = \begin{cases}
        η_0 + (η - η_0)\, t / W & t < W \\
        η\, \max\bigl(0,\ 1 - (t - W) / D\bigr)^{p} & t \ge W
    \end{cases}
    \;\cdot\; γ^{\#\{m \in \text{milestones}\,:\, \lfloor k / S \rfloor \ge m\}}

with ``W = warmup_epochs``, ``η_0 = warmup_start_lr``, ``D = decay_epochs``, ``p = power``. The SENG
authors' recipes are two instances (values and provenance in ``conf/recipe/``):

- CIFAR-10: ``η (1 - e/70)^6``, ``e = epoch + (batch + 1)/batches``: ``W = 0, D = 70, p = 6, step_offset = 1``;
- ImageNet: ``W = 5`` from ``η_0 = 0.01`` to ``η = 0.145``, then ``D = 60, p = 6``, divided by 10
  from epoch 40 on (``milestones = [40], gamma = 0.1``), ``step_offset = 1``.
"""

from __future__ import annotations

import math
from typing import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _number(key: str, value, minimum: float, strict: bool) -> float:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value > minimum if strict else value >= minimum))
    if not ok:
        raise ValueError(f"{key} must be a finite number {'>' if strict else '>='} {minimum:g} (got {value!r})")
    return float(value)


def _int(key: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be an int >= {minimum} (got {value!r})")
    return value


class WarmupPolyFactor:
    """``LambdaLR`` factor of one parameter group: ``lr_k / base_lr`` (formula in the module docstring).

    A callable object rather than a closure, so that ``LambdaLR.state_dict`` saves it with checkpoints.
    """

    def __init__(self, base_lr: float, steps_per_epoch: int, decay_epochs: float, power: float,
                 warmup_epochs: float = 0.0, warmup_start_lr: float = 0.0, step_offset: int = 0,
                 milestones: Sequence[int] = (), gamma: float = 0.1):
        self.steps_per_epoch = _int("steps_per_epoch", steps_per_epoch, 1)
        self.decay_epochs = _number("decay_epochs", decay_epochs, 0, strict=True)
        self.power = _number("power", power, 0, strict=True)
        self.warmup_epochs = _number("warmup_epochs", warmup_epochs, 0, strict=False)
        self.warmup_start_lr = _number("warmup_start_lr", warmup_start_lr, 0, strict=False)
        self.step_offset = _int("step_offset", step_offset, 0)
        if (isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence)
                or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in milestones)):
            raise ValueError(f"milestones must be a list of epochs, each an int >= 1 (got {milestones!r})")
        self.milestones = sorted(milestones)
        self.gamma = _number("gamma", gamma, 0, strict=True)
        if self.warmup_epochs > 0:
            self.base_lr = _number("optimizer.lr (with warmup_epochs > 0)", base_lr, 0, strict=True)
        else:
            self.base_lr = _number("optimizer.lr", base_lr, 0, strict=False)

    def lr(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (from 0)."""
        t = (step + self.step_offset) / self.steps_per_epoch
        W = self.warmup_epochs
        if t < W:
            lr = self.warmup_start_lr + (self.base_lr - self.warmup_start_lr) * t / W
        else:
            lr = self.base_lr * max(0.0, 1.0 - (t - W) / self.decay_epochs) ** self.power
        epoch = step // self.steps_per_epoch
        drops = sum(1 for m in self.milestones if epoch >= m)
        return lr * self.gamma ** drops

    def __call__(self, step: int) -> float:
        return self.lr(step) / self.base_lr if self.base_lr > 0 else 0.0

    def __repr__(self) -> str:
        return (f"WarmupPolyFactor(base_lr={self.base_lr}, steps_per_epoch={self.steps_per_epoch}, "
                f"decay_epochs={self.decay_epochs}, power={self.power}, warmup_epochs={self.warmup_epochs}, "
                f"warmup_start_lr={self.warmup_start_lr}, step_offset={self.step_offset}, "
                f"milestones={self.milestones}, gamma={self.gamma})")


def warmup_poly(optimizer: Optimizer, steps_per_epoch: int, decay_epochs: float, power: float,
                warmup_epochs: float = 0.0, warmup_start_lr: float = 0.0, step_offset: int = 0,
                milestones: Sequence[int] = (), gamma: float = 0.1) -> LambdaLR:
    """``LambdaLR`` with one :class:`WarmupPolyFactor` per parameter group (its ``lr`` is ``η``).

    Step it once per optimizer step (Lightning: ``interval: step``). ``steps_per_epoch`` is an int here;
    the Hydra config's ``steps_per_epoch: auto`` is resolved from the trainer by
    :func:`lightning_seng.mixin.build_scheduler`. Raises ``ValueError`` naming the key for bad values.
    """
    factors = [WarmupPolyFactor(group["lr"], steps_per_epoch, decay_epochs, power, warmup_epochs,
                                warmup_start_lr, step_offset, milestones, gamma) for group in optimizer.param_groups]
    return LambdaLR(optimizer, factors)
