"""A NaN batch inside a Lightning ``Trainer.fit`` with ``SENGCallback``: the refresh is skipped, the
factors are kept, one warning, counters in ``seng.stats``, the run completes with finite weights; in full
precision and under ``bf16-mixed``. (On CPU Lightning turns ``16-mixed`` into ``bf16-mixed``, so its
GradScaler path is not exercised here; the plain-loop fp16 + GradScaler checks are in ``test_amp.py``.)"""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("pytorch_lightning")
callback_module = pytest.importorskip("lightning_seng.callback")

NAN_BATCHES = (2, 4)   # both refresh steps with update_freq=2


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3))
        self.kept = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def _seng(self):
        return next(cb for cb in self.trainer.callbacks if isinstance(cb, callback_module.SENGCallback)).seng

    def _grams(self):
        return {name: layer.curvature.gram.clone() for name, layer in self._seng().layers.items()
                if layer.curvature is not None}

    def on_train_batch_start(self, batch, batch_idx):
        if batch_idx in NAN_BATCHES:
            self.kept[batch_idx] = self._grams()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if batch_idx in NAN_BATCHES:
            after = self._grams()
            before = self.kept[batch_idx]
            self.kept[batch_idx] = bool(before) and before.keys() == after.keys() and all(
                torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_nan_batch_in_trainer_is_skipped_and_training_completes(caplog, precision):
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    for b in NAN_BATCHES:
        x[b * 8 + 3, 1] = float("nan")
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)
    model = Tiny()
    callback = callback_module.SENGCallback(damping=0.5, update_freq=2)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                         precision=precision)
    trainer.fit(model, loader)

    seng = callback.seng
    assert trainer.global_step == 8 and seng.step_count == 8
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.kept == {b: True for b in NAN_BATCHES}          # factors kept across each NaN step
    assert seng.stats["skipped_refreshes"] == 2 and seng.stats["nonfinite_steps"] == 2
    assert all(layer.curvature is not None for layer in seng.layers.values())
    assert all(layer.curvature.gram.dtype == torch.float32 for layer in seng.layers.values())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and r.name.startswith("lightning_seng") and "non-finite" in r.getMessage()]
    assert len(warnings) == 1, warnings
