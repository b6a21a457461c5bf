"""``Trainer(strategy="seng_ddp")`` after a plain ``import lightning_seng``, without importing Lightning there.

Each Lightning package resolves strategy names through its own ``StrategyRegistry``
(``pytorch_lightning.strategies`` and ``lightning.pytorch.strategies``); importing that package's strategy module
(:data:`STRATEGY_MODULES`) adds ``seng_ddp`` and ``seng_ddp_global`` to it. Those modules import Lightning
(seconds), which a plain PyTorch user of the core should not pay for. So ``import lightning_seng`` calls
:func:`register_strategies_with_lightning`: for each package it imports the strategy module at once when the
package is already loaded, and otherwise right after the first import of that package finishes.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from typing import Any

# Lightning package -> the lightning_seng module that defines its SENGStrategy and registers the names.
STRATEGY_MODULES = {"pytorch_lightning": "lightning_seng.strategy", "lightning.pytorch": "lightning_seng.lightning"}


def register_strategies_with_lightning() -> None:
    waiting = [package for package in STRATEGY_MODULES if sys.modules.get(package) is None]
    for package in STRATEGY_MODULES:
        if package not in waiting:
            importlib.import_module(STRATEGY_MODULES[package])
    if waiting and not any(isinstance(finder, _AfterLightningImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterLightningImport(waiting))


class _AfterLightningImport(importlib.abc.MetaPathFinder):
    """Finds the Lightning packages through the other finders and imports their strategy modules after they run.

    The wrapped ``exec_module`` runs only on a real import (``importlib.util.find_spec`` alone does not
    register), and once the package's own ``__init__`` has finished, so the strategy module sees it whole.
    The finder leaves ``sys.meta_path`` once every package it waits for has been imported.
    """

    def __init__(self, packages: list[str]) -> None:
        self.waiting = set(packages)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        if fullname not in self.waiting:
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
            spec.loader.exec_module = self._then_register(fullname, spec.loader.exec_module)
        return spec

    def _then_register(self, package: str, exec_module):
        def exec_module_then_register(module) -> None:
            exec_module(module)
            self.waiting.discard(package)
            if not self.waiting and self in sys.meta_path:
                sys.meta_path.remove(self)
            importlib.import_module(STRATEGY_MODULES[package])

        return exec_module_then_register
