"""Small LightningModules and data modules for the tests that run under both Lightning packages (``pl_package``).

A LightningModule must derive from the ``LightningModule`` of its Trainer's package, so each body here (plain
methods, no Lightning base) is mixed with each installed package's base class by :func:`for_package`. Those
classes are attributes of this module (``ClassifierSteps_lightning_pytorch`` ...), so a LightningCLI config can
name them by ``class_path``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_seng._registration import STRATEGY_MODULES


class ClassifierSteps:
    """A plain classifier that knows nothing about SENG: cross-entropy on ``net(x)``, SGD with momentum."""

    def __init__(self, net: nn.Module | None = None, lr: float = 0.1, momentum: float = 0.9) -> None:
        super().__init__()
        self.net = net if net is not None else nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.lr, self.momentum = lr, momentum

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class RandomData:
    """``samples`` seeded random inputs ``(samples, 6)`` and labels in ``[0, 3)``, in batches of ``batch_size``."""

    def __init__(self, samples: int = 32, batch_size: int = 8) -> None:
        super().__init__()
        self.samples, self.batch_size = samples, batch_size

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(2)
        data = TensorDataset(torch.randn(self.samples, 6, generator=g), torch.randint(3, (self.samples,), generator=g))
        return DataLoader(data, batch_size=self.batch_size, shuffle=False)


def for_package(body: type, package: ModuleType, base: str = "LightningModule") -> type:
    """``body`` on ``package``'s ``base`` class (``LightningModule``, ``LightningDataModule``), created once."""
    name = f"{body.__name__}_{package.__name__.replace('.', '_')}"
    if name not in globals():
        globals()[name] = type(name, (body, getattr(package, base)), {"__module__": __name__})
    return globals()[name]


def seng_strategy_class(package: ModuleType) -> type:
    """The ``SENGStrategy`` class built on ``package``'s ``DDPStrategy``."""
    return importlib.import_module(STRATEGY_MODULES[package.__name__]).SENGStrategy
