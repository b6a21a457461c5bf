"""PyTorch Lightning's two packages, and which of them a Trainer comes from.

PyTorch Lightning is published twice: standalone as ``pytorch_lightning`` (``pip install pytorch-lightning``,
this project's dependency) and inside the unified ``lightning`` package as ``lightning.pytorch``
(``import lightning as L``). They are two copies of one code base with separate classes and registries: a
``lightning.pytorch.Trainer`` accepts only ``lightning.pytorch.Callback`` instances as callbacks, only
``lightning.pytorch.strategies.Strategy`` instances as strategies, and resolves strategy names in
``lightning.pytorch.strategies.StrategyRegistry``. Nothing here imports Lightning at import time.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

# import name -> the name users install it by
PACKAGES = {"pytorch_lightning": "pytorch-lightning", "lightning.pytorch": "lightning"}


def installed_packages() -> list[ModuleType]:
    """The Lightning packages that import in this environment, in the order of :data:`PACKAGES` (imports them).

    A package that is absent (or blocked with ``sys.modules[name] = None``) is left out; one that is present
    but fails to import raises its own error rather than being passed over.
    """
    packages = []
    for name in PACKAGES:
        try:
            packages.append(importlib.import_module(name))
        except ModuleNotFoundError as err:
            if err.name is None or not (name == err.name or name.startswith(err.name + ".")):
                raise
    return packages


def callback_bases() -> tuple[type, ...]:
    """The ``Callback`` class of every installed Lightning package: the bases of ``SENGCallback``.

    Both ``Callback`` classes are stateless collections of no-op hooks with the same names, so one class
    deriving from both is a callback of either Trainer, and of either ``LightningCLI``.
    """
    bases = tuple(package.Callback for package in installed_packages())
    if not bases:
        raise ModuleNotFoundError(f"no PyTorch Lightning package is installed (looked for {', '.join(PACKAGES)}); "
                                  "install it with `pip install pytorch-lightning` or `pip install lightning`",
                                  name="pytorch_lightning")
    return bases


def package_of(trainer: Any) -> ModuleType:
    """The Lightning package whose ``Trainer`` class ``trainer`` is an instance of."""
    for name in PACKAGES:
        package = sys.modules.get(name)
        if package is not None and isinstance(trainer, package.Trainer):
            return package
    raise TypeError(f"expected a Trainer of one of the Lightning packages {list(PACKAGES)} "
                    f"(got {type(trainer).__module__}.{type(trainer).__qualname__})")


def rank_zero_of(trainer: Any) -> ModuleType:
    """``<package>.utilities.rank_zero`` of ``trainer``'s package: its ``rank_zero_info`` logs to that package's
    logger, which is where its users look for Lightning's messages."""
    return importlib.import_module(f"{package_of(trainer).__name__}.utilities.rank_zero")
