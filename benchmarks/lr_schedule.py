"""One learning-rate schedule for every optimizer, set every iteration (torch's ``LambdaLR``).

With ``t`` the fractional epoch (steps done / steps per epoch), ``w`` the warm-up epochs and
``T`` the decay horizon in epochs, the factor on the optimizer's base lr is

    warm-up (t < w):  (t + 1/steps_per_epoch) / w        linear from ~0 to 1
    constant:         1
    cosine:           (1 + cos(pi * min(s, 1))) / 2,    s = (t - w) / (T - w)
    poly:             (1 - min(s, 1)) ** power           (the SENG authors' lr·(1 − e/70)^6)

The same object wraps SENG's SGD, K-FAC's SGD and the first-order peers, so every optimizer
sees the same shape of schedule around its own tuned base learning rate.
"""
from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "cosine", "poly")


def check_schedule(cfg) -> None:
    """Validate a ``schedule`` config block: ``name``, ``warmup_epochs``, ``power``,
    ``decay_epochs`` (null: the run's epoch budget)."""
    if cfg.name not in SCHEDULES:
        raise ValueError(f"schedule.name must be one of {list(SCHEDULES)} (got {cfg.name!r})")
    if float(cfg.warmup_epochs) < 0:
        raise ValueError(f"schedule.warmup_epochs must be >= 0 (got {cfg.warmup_epochs!r})")
    if float(cfg.power) <= 0:
        raise ValueError(f"schedule.power must be > 0 (got {cfg.power!r})")
    if cfg.decay_epochs is not None and float(cfg.decay_epochs) <= float(cfg.warmup_epochs):
        raise ValueError(f"schedule.decay_epochs must be null or > warmup_epochs "
                         f"(got {cfg.decay_epochs!r})")


def lr_factor(step: int, steps_per_epoch: float, name: str, warmup_epochs: float,
              decay_epochs: float, power: float) -> float:
    """The factor on the base learning rate for the step after ``step`` steps were taken."""
    t = step / steps_per_epoch
    if warmup_epochs > 0 and t < warmup_epochs:
        return (t + 1.0 / steps_per_epoch) / warmup_epochs
    if name == "constant":
        return 1.0
    s = min((t - warmup_epochs) / max(decay_epochs - warmup_epochs, 1e-12), 1.0)
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * s))
    return (1.0 - s) ** power


def attach(opt: torch.optim.Optimizer, cfg, steps_per_epoch: float,
           budget_epochs: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` on ``opt`` following schedule block ``cfg``; call ``.step()`` after every
    optimizer step. ``budget_epochs`` is the decay horizon when ``cfg.decay_epochs`` is null."""
    decay = float(budget_epochs if cfg.decay_epochs is None else cfg.decay_epochs)
    name, warmup, power = str(cfg.name), float(cfg.warmup_epochs), float(cfg.power)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(step, steps_per_epoch, name, warmup, decay, power))
