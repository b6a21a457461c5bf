"""lightning-seng: SENG (Sketchy Empirical Natural Gradient) for PyTorch and PyTorch Lightning.

The public API, all importable from the top level (``from lightning_seng import SENG, SENGCallback``):

- ``SENG`` (:mod:`lightning_seng.preconditioner`, torch only): the preconditioner, for any training loop.
- ``ConstantDamping``, ``ExponentialDamping``, ``LambdaDamping``, ``DampingSchedule``, ``make_damping``
  (:mod:`lightning_seng.schedules`, torch only): schedules for ``damping=``.
- ``SENGCallback`` (:mod:`lightning_seng.callback`, Lightning): ``Trainer(callbacks=[SENGCallback()])``.
- ``SENGStrategy`` (:mod:`lightning_seng.strategy`, Lightning): DDP with SENG's distributed modes, for a
  ``pytorch_lightning`` Trainer; :mod:`lightning_seng.lightning` has the one for ``lightning.pytorch``.
- ``SENGOptimizerMixin`` (:mod:`lightning_seng.mixin`, Lightning and Hydra): optimizer, scheduler and
  SENG callback from a LightningModule's hyper-parameters.

Both Lightning packages are served: ``pytorch_lightning`` and the unified ``lightning`` (``lightning.pytorch``);
``SENGCallback`` and ``SENGOptimizerMixin`` work with a Trainer of either (:mod:`lightning_seng._packages`).

The core imports torch only. The Lightning names are loaded on first access (PEP 562), so
``import lightning_seng`` neither needs nor imports Lightning. Importing the package also makes the strategy
names ``Trainer(strategy="seng_ddp")`` (local mode) and ``"seng_ddp_global"`` known to each Lightning package,
whether it is imported before or after ``lightning_seng``.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._registration import register_strategies_with_lightning
from .preconditioner import SENG
from .schedules import (ConstantDamping, DampingSchedule, ExponentialDamping, LambdaDamping, LevenbergMarquardt,
                        make_damping)

__version__ = "0.1.0"

# name -> module, imported on first access: these modules import Lightning.
_LIGHTNING_API = {
    "SENGCallback": "lightning_seng.callback",
    "SENGStrategy": "lightning_seng.strategy",
    "SENGOptimizerMixin": "lightning_seng.mixin",
}

__all__ = ["SENG", "SENGCallback", "SENGStrategy", "SENGOptimizerMixin", "ConstantDamping", "DampingSchedule",
           "ExponentialDamping", "LambdaDamping", "LevenbergMarquardt", "make_damping", "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _LIGHTNING_API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(_LIGHTNING_API[name])
    except ImportError as err:
        other = (" (with the `lightning` package alone: lightning_seng.lightning.SENGStrategy)"
                 if name == "SENGStrategy" else "")
        raise ImportError(f"lightning_seng.{name} needs PyTorch Lightning ({err}); install it with "
                          f"`pip install pytorch-lightning`{other}, or use lightning_seng.SENG in a plain PyTorch "
                          "loop") from err
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LIGHTNING_API))


register_strategies_with_lightning()
