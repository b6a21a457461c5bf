"""What ``SENGStrategy`` adds to Lightning's DDP, written once for both Lightning packages.

A strategy, unlike a callback, is wired into its Trainer's internals (accelerator, launcher, precision classes
of the same package), so each package gets its own class: :class:`lightning_seng.strategy.SENGStrategy`
extends ``pytorch_lightning``'s ``DDPStrategy`` and :class:`lightning_seng.lightning.SENGStrategy` extends
``lightning.pytorch``'s. Both are ``class SENGStrategy(SENGStrategyBase, DDPStrategy)``: this module holds
their behaviour and imports no Lightning package; the package is reached through ``super()``. See :mod:`lightning_seng.strategy` for the modes and checkpoints.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Union

import torch.distributed as dist
from lightning_utilities.core.rank_zero import rank_zero_warn

from .distributed import SENG_MODES, Communicator, make_comm

# Checkpoint key of the per-rank SENG callback states: [{callback state_key: state} for each rank].
PER_RANK_KEY = "seng_per_rank_callback_states"

# Lightning strategy name -> seng_mode, registered in the StrategyRegistry of each package.
STRATEGY_NAMES = {"seng_ddp": "local", "seng_ddp_global": "global"}
_DESCRIPTIONS = {"local": "DDP with SENG in local mode (directions averaged)",
                 "global": "DDP with SENG in global mode (curvature of the global batch)"}


class SENGStrategyBase:
    """DDP whose ``seng_comm`` combines SENG's curvature across ranks in ``seng_mode``.

    Args:
        seng_mode: ``"local"`` (the paper's: average of the ranks' directions) or ``"global"``
            (exact SENG on the global batch).
        seng_batch_size_hint: ``global`` mode: samples per rank assumed when balancing the layers'
            estimated costs over the owner ranks.
        **kwargs: passed to the Lightning package's ``DDPStrategy`` (``timeout``, ``start_method``,
            ``find_unused_parameters``, ...).
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
    def save_checkpoint(self, checkpoint: Dict[str, Any], filepath: Union[str, os.PathLike],
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

    def load_checkpoint(self, checkpoint_path: Union[str, os.PathLike],
                        weights_only: Optional[bool] = None) -> Dict[str, Any]:
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
    def register_strategies(cls, strategy_registry: Any) -> None:
        """``seng_ddp`` and ``seng_ddp_global`` in ``strategy_registry`` (a package's ``StrategyRegistry``)."""
        for name, mode in STRATEGY_NAMES.items():
            strategy_registry.register(name, cls, description=_DESCRIPTIONS[mode], override=True, seng_mode=mode)
