"""A 2-process Lightning Trainer fit with SENGStrategy + SENGCallback: the callback gets the strategy's
communicator, and a run resumed from a mid-training checkpoint ends bit-exactly where the uninterrupted
run ends, in both modes (every rank gets its own SENG state back), under each Lightning package."""

from __future__ import annotations

import importlib
import os
import tempfile
from datetime import timedelta

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_seng.callback import SENGCallback
from lightning_seng.distributed import GlobalComm, LocalComm

from ..lightning_modules import for_package, seng_strategy_class
from .dist_harness import run_lightning_on_ranks
from .nets import make_batch, make_net

STEPS_PER_EPOCH = 4   # 32 samples, 2 ranks, batch 4
UPDATE_FREQ = 3       # refreshes at steps 0, 3, 6: the resumed epoch starts on a stored curvature
# global mode trains a sum-reduced loss: the strategy must take the reduction from the callback
REDUCTION = {"local": "mean", "global": "sum"}


class _ModuleSteps:
    def __init__(self, reduction: str) -> None:
        super().__init__()
        self.net = make_net()
        self.reduction = reduction

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y, reduction=self.reduction)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1 if self.reduction == "mean" else 0.025, momentum=0.9)

    def train_dataloader(self):
        x, y = make_batch(2 * 2 * STEPS_PER_EPOCH * 2)
        return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)


def _fit(package, mode, root, max_epochs, ckpt_path=None, save_to=None):
    callback = SENGCallback(damping=0.3, update_freq=UPDATE_FREQ, loss_reduction=REDUCTION[mode])
    strategy = seng_strategy_class(package)(seng_mode=mode, timeout=timedelta(seconds=60))
    trainer = package.Trainer(accelerator="cpu", devices=2, precision="64-true", max_epochs=max_epochs,
                              strategy=strategy, callbacks=[callback], logger=False, enable_checkpointing=False,
                              enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    module = for_package(_ModuleSteps, package)(REDUCTION[mode])
    trainer.fit(module, ckpt_path=ckpt_path)
    assert callback.seng.comm is trainer.strategy.seng_comm
    assert isinstance(callback.seng.comm, LocalComm if mode == "local" else GlobalComm)
    assert callback.seng.comm.calls > 0
    assert getattr(callback.seng.comm, "loss_reduction", "mean") == REDUCTION[mode]
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return [p.detach().clone() for p in module.parameters()], callback.seng.step_count


def _fit_checkpoint_resume(rank, world_size, root, package_name):
    package = importlib.import_module(package_name)
    for mode in ("local", "global"):
        path = os.path.join(root, f"{mode}.ckpt")
        straight, steps = _fit(package, mode, root, max_epochs=2)
        _fit(package, mode, root, max_epochs=1, save_to=path)
        resumed, resumed_steps = _fit(package, mode, root, max_epochs=2, ckpt_path=path)
        assert steps == resumed_steps == 2 * STEPS_PER_EPOCH, (mode, steps, resumed_steps)
        for a, b in zip(resumed, straight):
            assert torch.equal(a, b), (mode, float((a - b).abs().max()))


def test_two_process_fit_resumes_from_checkpoint_bit_exactly_in_both_modes(pl_package):
    with tempfile.TemporaryDirectory() as root:
        run_lightning_on_ranks(_fit_checkpoint_resume, root, pl_package.__name__, timeout=150)
