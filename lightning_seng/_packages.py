"""PyTorch Lightning's two packages, and the callback bases they need.

PyTorch Lightning is published twice: standalone as ``pytorch_lightning`` (``pip install pytorch-lightning``,
this project's dependency) and inside the unified ``lightning`` package as ``lightning.pytorch``
(``import lightning as L``). They are two copies of one code base with separate classes and registries: a
``lightning.pytorch.Trainer`` takes only ``lightning.pytorch.strategies.Strategy`` instances as strategies and
resolves strategy names in ``lightning.pytorch.strategies.StrategyRegistry``; its ``LightningCLI`` validates
``trainer.callbacks`` against ``lightning.pytorch.Callback``, and the Trainer's own checks (a lone callback,
stateful callbacks) test against that class too. Nothing here imports Lightning at import time.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# import names: the standalone package (pip install pytorch-lightning) and the unified one's (pip install lightning)
PACKAGES = ("pytorch_lightning", "lightning.pytorch")


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
