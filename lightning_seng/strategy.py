"""SENGStrategy: Lightning's DDP strategy with the SENG communicator of a distributed mode.

DDP all-reduces the gradient; SENG then needs to know how to combine curvature across ranks
(DESIGN.md §1 "Distributed"). This strategy owns that choice and exposes the matching
:class:`~lightning_seng.distributed.Communicator` as ``seng_comm``, which
:class:`~lightning_seng.callback.SENGCallback` hands to :class:`~lightning_seng.SENG`::

    trainer = Trainer(accelerator="cpu", devices=2, strategy=SENGStrategy(seng_mode="global"),
                      callbacks=[SENGCallback(damping=0.5)])

or by name, once this module is imported: ``Trainer(strategy="seng_ddp")`` (``local`` mode) and
``Trainer(strategy="seng_ddp_global")``; from Hydra,
``trainer.strategy: {_target_: lightning_seng.strategy.SENGStrategy, seng_mode: global}``.

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

from typing import Any, Dict, List, Optional

import torch.distributed as dist
from lightning_fabric.strategies.registry import _StrategyRegistry
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.strategies import DDPStrategy, StrategyRegistry
from pytorch_lightning.utilities.rank_zero import rank_zero_warn

from .distributed import SENG_MODES, Communicator, make_comm

# Checkpoint key of the per-rank SENG callback states: [{callback state_key: state} for each rank].
PER_RANK_KEY = "seng_per_rank_callback_states"


class SENGStrategy(DDPStrategy):
    """DDP whose ``seng_comm`` combines SENG's curvature across ranks in ``seng_mode``.

    Args:
        seng_mode: ``"local"`` (the paper's: average of the ranks' directions) or ``"global"``
            (exact SENG on the global batch).
        seng_batch_size_hint: ``global`` mode: samples per rank assumed when balancing the layers'
            estimated costs over the owner ranks.
        **kwargs: passed to :class:`~pytorch_lightning.strategies.DDPStrategy` (``timeout``,
            ``start_method``, ``find_unused_parameters``, ...).
    """

    strategy_name = "seng_ddp"

    def __init__(self, seng_mode: str = "local", seng_batch_size_hint: int = 128, **kwargs: Any) -> None:
        if seng_mode not in SENG_MODES:
            raise ValueError(f"seng_mode must be one of {list(SENG_MODES)} (got {seng_mode!r})")
        if isinstance(seng_batch_size_hint, bool) or not isinstance(seng_batch_size_hint, int) \
                or seng_batch_size_hint < 1:
            raise ValueError(f"seng_batch_size_hint must be an int >= 1 (got {seng_batch_size_hint!r})")
        super().__init__(**kwargs)
        self.seng_mode = seng_mode
        self.seng_batch_size_hint = seng_batch_size_hint
        self._seng_comm: Optional[Communicator] = None

    @property
    def seng_comm(self) -> Communicator:
        """The communicator for SENG on this rank (created once the process group is up, i.e. from
        ``Trainer.fit`` setup on; SENGCallback reads it at fit start)."""
        if self._seng_comm is None:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError("SENGStrategy.seng_comm is available once the process group is initialised "
                                   "(from the Trainer's setup on)")
            kwargs: Dict[str, Any] = {}
            if self.seng_mode == "global":
                kwargs = dict(loss_reduction=self._seng_loss_reduction(), batch_size_hint=self.seng_batch_size_hint)
            self._seng_comm = make_comm(self.seng_mode, **kwargs)
        return self._seng_comm

    def _seng_loss_reduction(self) -> str:
        """``global`` mode rescales the ranks' factors by how the loss was reduced; SENGCallback knows."""
        for callback in self._seng_callbacks():
            return callback.seng_kwargs["loss_reduction"]
        return "mean"

    def _seng_callbacks(self) -> List[Any]:
        from .callback import SENGCallback

        trainer = getattr(self.lightning_module, "_trainer", None) if self.lightning_module is not None else None
        if trainer is None:
            return []
        return [cb for cb in trainer.callbacks if isinstance(cb, SENGCallback)]

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, checkpoint: Dict[str, Any], filepath: _PATH,
                        storage_options: Optional[Any] = None) -> None:
        """Called on every rank: rank 0 writes, with every rank's SENG callback state attached."""
        keys = [cb.state_key for cb in self._seng_callbacks()]
        if keys and self.world_size > 1 and dist.is_initialized():
            local = {k: checkpoint["callbacks"][k] for k in keys if k in checkpoint.get("callbacks", {})}
            gathered: Optional[List[Any]] = [None] * self.world_size if self.is_global_zero else None
            dist.gather_object(local, gathered, dst=0)
            if self.is_global_zero:
                checkpoint = {**checkpoint, PER_RANK_KEY: gathered}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: Optional[bool] = None) -> Dict[str, Any]:
        """Every rank gets its own SENG callback state back (rank 0's if the world size changed)."""
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        per_rank = checkpoint.pop(PER_RANK_KEY, None)
        if per_rank is not None:
            if len(per_rank) == self.world_size:
                mine = per_rank[self.global_rank]
            else:
                rank_zero_warn(f"SENG: checkpoint written by {len(per_rank)} ranks, resumed on {self.world_size}; "
                               "every rank starts from rank 0's curvature until the next refresh")
                mine = per_rank[0]
            checkpoint.setdefault("callbacks", {}).update(mine)
        return checkpoint

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        strategy_registry.register("seng_ddp", cls, description="DDP with SENG in local mode (directions averaged)",
                                   override=True, seng_mode="local")
        strategy_registry.register("seng_ddp_global", cls, override=True, seng_mode="global",
                                   description="DDP with SENG in global mode (curvature of the global batch)")


SENGStrategy.register_strategies(StrategyRegistry)
