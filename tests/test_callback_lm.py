"""SENGCallback under a Levenberg–Marquardt damping: the feedback pass runs training_step again on the same batch
without gradients, its logging muted and the model's buffers put back, and the damping adapts as in a plain loop."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_seng import SENG, LevenbergMarquardt
from lightning_seng.callback import SENGCallback

BATCH = 8


def _net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 3))


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(2)
    return TensorDataset(torch.randn(4 * BATCH, 6, generator=g), torch.randint(3, (4 * BATCH,), generator=g))


class Logged(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls = 0

    def training_step(self, batch, batch_idx):
        self.calls += 1
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _fit(module, callback, **kwargs):
    trainer = pl.Trainer(callbacks=[callback], accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, max_epochs=1, **kwargs)
    trainer.fit(module, DataLoader(_data(), batch_size=BATCH, shuffle=False))
    return trainer


def test_feedback_matches_a_plain_loop_and_restores_the_buffers():
    module = Logged(_net())
    plain_net = copy.deepcopy(module.net)
    callback = SENGCallback(damping=LevenbergMarquardt(1.0, every=2), update_freq=2)
    _fit(module, callback)
    assert module.calls == 4 + 2  # every second step ran training_step once more

    seng = SENG(plain_net, damping=LevenbergMarquardt(1.0, every=2), update_freq=2)
    opt = torch.optim.SGD(plain_net.parameters(), lr=0.05, momentum=0.9)
    rhos = []
    for x, y in DataLoader(_data(), batch_size=BATCH, shuffle=False):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(plain_net(x), y)
        loss.backward()
        seng.step()
        opt.step()
        if seng.damping_feedback_due:
            saved = [b.clone() for b in plain_net.buffers()]
            with torch.no_grad():
                after = nn.functional.cross_entropy(plain_net(x), y)
                for b, s in zip(plain_net.buffers(), saved):
                    b.copy_(s)
            rhos.append(seng.adapt_damping(loss.item(), after.item()))
    assert callback.seng.damping == pytest.approx(seng.damping, rel=1e-12)
    assert callback.seng.stats["lm_rho"] == pytest.approx(rhos[-1], rel=1e-9)
    # the BatchNorm statistics saw each batch once, as in the plain loop
    for a, b in zip(module.net.buffers(), plain_net.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_gradient_accumulation_is_refused_by_name():
    with pytest.raises(ValueError, match="accumulate_grad_batches=2"):
        _fit(Logged(_net()), SENGCallback(damping=LevenbergMarquardt(1.0)), accumulate_grad_batches=2)


def test_the_feedback_pass_logs_nothing():
    """The step's logged loss is the one before the optimizer step, not the feedback pass's."""
    module = Logged(_net())
    x, y = next(iter(DataLoader(_data(), batch_size=BATCH, shuffle=False)))
    before = nn.functional.cross_entropy(copy.deepcopy(module.net)(x), y)
    trainer = _fit(module, SENGCallback(damping=LevenbergMarquardt(1.0, every=1)), max_steps=1)
    assert module.calls == 2
    assert float(trainer.callback_metrics["train_loss"]) == pytest.approx(float(before), rel=1e-6)


class Manual(Logged):
    def __init__(self, net):
        super().__init__(net)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.manual_backward(loss)
        opt.step()
        return loss


def test_manual_optimization_is_told_to_call_adapt_damping_and_keeps_its_damping():
    module = Manual(_net())
    callback = SENGCallback(damping=LevenbergMarquardt(1.0, every=1))
    with pytest.warns(UserWarning, match="manual optimization.*adapt_damping"):
        _fit(module, callback)
    assert callback.seng.damping == 1.0 and not callback.seng.damping_feedback_due
