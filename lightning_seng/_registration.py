"""``Trainer(strategy="seng_ddp")`` after a plain ``import lightning_seng``, without importing Lightning there.

Lightning resolves strategy names through ``pytorch_lightning.strategies.StrategyRegistry``; importing
:mod:`lightning_seng.strategy` adds ``seng_ddp`` and ``seng_ddp_global`` to it. That module imports Lightning
(seconds), which a plain PyTorch user of the core should not pay for. So ``import lightning_seng`` calls
:func:`register_strategies_with_lightning`: it imports the strategy module at once when Lightning is already
loaded, and otherwise right after the first ``import pytorch_lightning`` finishes.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from typing import Any

LIGHTNING = "pytorch_lightning"
STRATEGY_MODULE = "lightning_seng.strategy"


def register_strategies_with_lightning() -> None:
    if sys.modules.get(LIGHTNING) is not None:
        importlib.import_module(STRATEGY_MODULE)
    elif not any(isinstance(finder, _AfterLightningImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterLightningImport())


class _AfterLightningImport(importlib.abc.MetaPathFinder):
    """Finds ``pytorch_lightning`` through the other finders and imports the strategy module after it runs.

    The wrapped ``exec_module`` runs only on a real import (``importlib.util.find_spec`` alone does not
    register), and once Lightning's own ``__init__`` has finished, so the strategy module sees it whole.
    """

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        if fullname != LIGHTNING:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader.exec_module = self._then_register(spec.loader.exec_module)
        return spec

    def _then_register(self, exec_module):
        def exec_module_then_register(module) -> None:
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            importlib.import_module(STRATEGY_MODULE)

        return exec_module_then_register
