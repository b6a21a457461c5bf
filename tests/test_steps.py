"""steps_per_epoch='auto': the LR scheduler (mixin) and the damping schedule (callback) count steps from the trainer."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_seng.callback import SENGCallback
from lightning_seng.mixin import build_scheduler
from tests.test_mixin import Net

POLY = {"_target_": "lightning_seng.recipes.lr_schedules.warmup_poly", "steps_per_epoch": "auto", "decay_epochs": 4,
        "power": 2, "warmup_epochs": 1, "warmup_start_lr": 0.01, "step_offset": 1, "interval": "step"}
IMAGENET_DAMPING = {"_target_": "lightning_seng.schedules.ExponentialDamping", "damping": 0.17, "rate": 0.9,
                    "period": 10, "steps_per_epoch": "auto", "step_offset": 1}


class Record(Callback):
    """The learning rate and SENG's damping of every optimizer step."""

    def __init__(self):
        self.lrs, self.dampings = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        seng = [c for c in trainer.callbacks if isinstance(c, SENGCallback)]
        if seng:  # the damping of the step just taken
            self.dampings.append(seng[0].seng.stats["damping"])


def _fit(module, samples=10, batch_size=4, **trainer_kwargs):
    data = DataLoader(TensorDataset(torch.randn(samples, 4), torch.randint(2, (samples,))), batch_size=batch_size)
    record = Record()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=[record], **trainer_kwargs)
    trainer.fit(module, data)
    return trainer, record


def poly_lr(k, steps):
    t = (k + 1) / steps
    return 0.01 + (0.1 - 0.01) * t if t < 1 else 0.1 * (1 - (t - 1) / 4) ** 2


def test_poly_scheduler_counts_optimizer_steps_per_epoch_from_the_trainer():
    # 10 samples at batch 4: 3 batches; accumulating 2 gives 2 optimizer steps per epoch (the last one partial)
    trainer, record = _fit(Net(optimizer={"_target_": "torch.optim.SGD", "lr": 0.1}, scheduler=POLY),
                           max_epochs=3, accumulate_grad_batches=2)
    assert trainer.global_step == 6
    assert record.lrs == pytest.approx([poly_lr(k, 2) for k in range(6)], rel=1e-12)


def test_limit_train_batches_changes_the_steps_per_epoch():
    _, record = _fit(Net(optimizer={"_target_": "torch.optim.SGD", "lr": 0.1}, scheduler=POLY),
                     samples=40, max_epochs=2, limit_train_batches=3)
    assert record.lrs == pytest.approx([poly_lr(k, 3) for k in range(6)], rel=1e-12)


def test_damping_schedule_moves_every_step_with_the_trainers_steps_per_epoch():
    module = Net(seng={"damping": IMAGENET_DAMPING, "update_freq": 2})
    _, record = _fit(module, max_epochs=2)
    expected = [0.17 * 0.9 ** (((k + 1) / 3) / 10) for k in range(6)]
    assert record.dampings == pytest.approx(expected, rel=1e-14)
    assert len(set(record.dampings)) == 6


def test_auto_steps_without_a_trainer_names_the_key():
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"scheduler.steps_per_epoch='auto' needs the trainer's steps per epoch"):
        build_scheduler(POLY, optimizer)
    scheduler = build_scheduler(POLY, optimizer, steps_per_epoch=5)
    assert scheduler["interval"] == "step" and scheduler["scheduler"].lr_lambdas[0].steps_per_epoch == 5
