"""Optimizer steps per epoch of a Lightning trainer, for schedules that count time in fractional epochs.

Both the learning-rate schedule (``scheduler.steps_per_epoch: auto``, resolved in
:mod:`lightning_seng.mixin`) and SENG's damping schedules (``steps_per_epoch="auto"``, resolved by
:class:`~lightning_seng.callback.SENGCallback`) ask the trainer rather than a hard-coded number, so
they follow the batch size, ``limit_train_batches``, ``accumulate_grad_batches`` and the number of
processes (each process sees ``1/world_size`` of the data). A Trainer of either Lightning package
(``pytorch_lightning`` or ``lightning.pytorch``) answers the same attributes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytorch_lightning as pl


def steps_per_epoch(trainer: pl.Trainer) -> int:
    """``ceil(num_training_batches / accumulate_grad_batches)``: the optimizer steps of one epoch.

    Reading ``trainer.estimated_stepping_batches`` makes Lightning load the training dataloader if
    it has not yet (Lightning's documented way to size a scheduler inside ``configure_optimizers``);
    then ``num_training_batches`` is the per-process batch count after ``limit_train_batches``.
    The last, partial accumulation window of an epoch also steps, hence the ceiling.
    """
    trainer.estimated_stepping_batches
    batches = trainer.num_training_batches
    if not math.isfinite(batches) or batches < 1:
        raise ValueError(f"steps_per_epoch='auto' needs a training dataloader with a length (Lightning reports "
                         f"{batches} batches per epoch): set steps_per_epoch to the optimizer steps per epoch")
    return math.ceil(int(batches) / trainer.accumulate_grad_batches)
