"""lightning-seng: SENG (Sketchy Empirical Natural Gradient) for PyTorch and PyTorch Lightning.

The core (``SENG``, ``layers``, ``sketch``, ``schedules``) imports torch only; the Lightning pieces
live in :mod:`lightning_seng.callback`, :mod:`lightning_seng.strategy` and :mod:`lightning_seng.mixin`.
"""

from .preconditioner import SENG
from .schedules import ConstantDamping, DampingSchedule, ExponentialDamping, LambdaDamping, make_damping

__version__ = "0.1.0"

__all__ = ["SENG", "ConstantDamping", "DampingSchedule", "ExponentialDamping", "LambdaDamping", "make_damping",
           "__version__"]
