"""SENGOptimizerMixin: optimizer, scheduler and SENG callback from the module's hyper-parameters."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_seng.callback import SENGCallback
from lightning_seng.mixin import SENGOptimizerMixin

from .lightning_modules import for_package


class NetSteps(SENGOptimizerMixin):
    """A module with no optimizer code at all (mixed with a Lightning package's LightningModule)."""

    def __init__(self, optimizer=None, scheduler=None, seng=None):
        super().__init__()
        self.save_hyperparameters()
        self.layer = nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.layer(x), y)


class Net(NetSteps, pl.LightningModule):
    """NetSteps on pytorch_lightning."""


def test_default_is_sgd_with_momentum_and_no_seng():
    module = Net()
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["lr"] == 0.1
    assert module.configure_callbacks() == []


def test_optimizer_and_scheduler_from_dictconfig():
    module = Net(
        optimizer=OmegaConf.create({"_target_": "torch.optim.AdamW", "lr": 0.003, "betas": [0.8, 0.9]}),
        scheduler=OmegaConf.create({"_target_": "torch.optim.lr_scheduler.StepLR", "step_size": 3,
                                    "interval": "step", "frequency": 2}),
    )
    config = module.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.AdamW)
    assert config["optimizer"].defaults["betas"] == (0.8, 0.9)
    scheduler = config["lr_scheduler"]
    assert isinstance(scheduler["scheduler"], torch.optim.lr_scheduler.StepLR)
    assert scheduler["scheduler"].step_size == 3
    assert (scheduler["interval"], scheduler["frequency"]) == ("step", 2)
    assert scheduler["scheduler"].optimizer is config["optimizer"]


def test_seng_config_becomes_a_callback_with_its_knobs():
    damping = {"_target_": "lightning_seng.schedules.ExponentialDamping", "damping": 2.0, "rate": 0.5}
    module = Net(seng={"damping": damping, "update_freq": 7, "sketch_size": 32, "include": ["layer"]})
    (callback,) = module.configure_callbacks()
    assert isinstance(callback, SENGCallback)
    assert callback.seng_kwargs["update_freq"] == 7 and callback.seng_kwargs["sketch_size"] == 32
    assert callback.seng_kwargs["damping"](0, 2) == pytest.approx(0.5)
    assert callback.seng_kwargs["include"] == ["layer"]


def test_trainer_of_either_package_attaches_the_callback_and_preconditions(pl_package):
    module = for_package(NetSteps, pl_package)(seng={"damping": 0.4, "update_freq": 1})
    data = DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(2, (16,))), batch_size=8)
    trainer = pl_package.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, data)
    (callback,) = [c for c in trainer.callbacks if isinstance(c, SENGCallback)]
    assert callback.seng.step_count == 2 and callback.seng.damping == pytest.approx(0.4)
    assert list(callback.seng.layers) == ["layer"]


@pytest.mark.parametrize("hparams, pattern", [
    ({"optimizer": {"_target_": "torch.optim.SGD", "lr": -1.0}}, r"optimizer: cannot build torch.optim.SGD .*lr"),
    ({"optimizer": {"lr": 0.1}}, r"optimizer must have a '_target_'"),
    ({"scheduler": {"_target_": "torch.optim.lr_scheduler.StepLR", "step_size": 1, "interval": "batch"}},
     r"scheduler.interval must be one of \['epoch', 'step'\] \(got 'batch'\)"),
    ({"seng": {"update_freq": 0}}, r"seng: .*update_freq must be an int >= 1 \(got 0\)"),
    ({"seng": {"sketchsize": 3}}, r"seng: .*sketchsize"),
])
def test_bad_config_names_the_key(hparams, pattern):
    module = Net(**hparams)
    with pytest.raises(ValueError, match=pattern):
        module.configure_optimizers()
        module.configure_callbacks()
