"""lightning-seng for the unified ``lightning`` package (``import lightning as L``, ``lightning.pytorch``).

``lightning.pytorch`` is a separate copy of PyTorch Lightning with its own classes (:mod:`lightning_seng._packages`).
What differs for it is the strategy class only: ``SENGCallback`` and ``SENGOptimizerMixin`` serve both packages,
and this module hands out the same objects as ``lightning_seng`` (loaded on first access, so that the strategy
registration run on ``import lightning`` does not import ``pytorch_lightning`` too)::

    import lightning as L
    from lightning_seng.lightning import SENGCallback, SENGStrategy   # SENGStrategy: a lightning.pytorch DDPStrategy

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=SENGStrategy(seng_mode="global"),
                        callbacks=[SENGCallback(damping=0.5)])

The names ``L.Trainer(strategy="seng_ddp")`` and ``"seng_ddp_global"`` build this class once ``lightning_seng`` is
imported (before or after ``lightning``); in a ``lightning.pytorch.cli.LightningCLI`` YAML,
``trainer.strategy: {class_path: lightning_seng.lightning.SENGStrategy, init_args: {seng_mode: global}}``.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

from ._strategy_base import SENGStrategyBase


class SENGStrategy(SENGStrategyBase, DDPStrategy):
    """``lightning.pytorch``'s ``DDPStrategy`` with SENG's ``seng_mode``; arguments in :class:`SENGStrategyBase`."""


SENGStrategy.register_strategies(StrategyRegistry)


__all__ = ["SENGCallback", "SENGOptimizerMixin", "SENGStrategy"]


def __getattr__(name: str) -> Any:
    if name in ("SENGCallback", "SENGOptimizerMixin"):
        import lightning_seng

        return getattr(lightning_seng, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
