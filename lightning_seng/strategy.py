"""SENGStrategy: Lightning's DDP strategy with the SENG communicator of a distributed mode.

DDP all-reduces the gradient; SENG then needs to know how to combine curvature across ranks
(DESIGN.md §1 "Distributed"). This strategy owns that choice and exposes the matching
:class:`~lightning_seng.distributed.Communicator` as ``seng_comm``, which
:class:`~lightning_seng.callback.SENGCallback` hands to :class:`~lightning_seng.SENG`::

    trainer = Trainer(accelerator="cpu", devices=2, strategy=SENGStrategy(seng_mode="global"),
                      callbacks=[SENGCallback(damping=0.5)])

or by name once ``lightning_seng`` is imported: ``Trainer(strategy="seng_ddp")`` (``local`` mode) and
``Trainer(strategy="seng_ddp_global")``; from Hydra,
``trainer.strategy: {_target_: lightning_seng.strategy.SENGStrategy, seng_mode: global}``.

This class is ``pytorch_lightning``'s. A ``lightning.pytorch`` Trainer (``import lightning as L``) takes
:class:`lightning_seng.lightning.SENGStrategy` instead, the same behaviour on that package's ``DDPStrategy``
(:mod:`lightning_seng._strategy_base`); both names are registered with both packages.

=========  ==========================================================================================
mode       direction on every rank
=========  ==========================================================================================
local      ``(1/W) Σ_r (F_r + λI)^{-1} g``: each rank's local-batch curvature, one all-reduce per step
global     ``(F + λI)^{-1} g`` with ``F`` from all ``W`` local batches: layers split among owner ranks
=========  ==========================================================================================

Checkpoints: SENG's curvature differs between ranks (local batches, or owned layers), so the
strategy stores every rank's SENG callback state in the checkpoint and gives each rank its own back
on resume. A checkpoint written by a different number of ranks resumes from rank 0's state.
"""

from __future__ import annotations

from pytorch_lightning.strategies import DDPStrategy, StrategyRegistry

from ._strategy_base import SENGStrategyBase


class SENGStrategy(SENGStrategyBase, DDPStrategy):
    """``pytorch_lightning``'s ``DDPStrategy`` with SENG's ``seng_mode``; arguments in :class:`SENGStrategyBase`."""


SENGStrategy.register_strategies(StrategyRegistry)
