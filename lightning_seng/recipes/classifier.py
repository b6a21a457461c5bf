"""Classifier: the LightningModule of the recipes (cross-entropy, accuracy from torchmetrics).

Optimizer, scheduler and SENG come from :class:`~lightning_seng.mixin.SENGOptimizerMixin`; the module
holds no optimizer code.
"""

from __future__ import annotations

from typing import Any, Mapping

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_seng.mixin import SENGOptimizerMixin


class Classifier(SENGOptimizerMixin, pl.LightningModule):
    """``net(x) (N, num_classes)`` trained with mean cross-entropy; logs ``{train,val,test}/{loss,acc}``.

    Args:
        net: the network.
        num_classes: number of classes (for the accuracy metrics).
        optimizer, scheduler, seng: configs read by :class:`SENGOptimizerMixin`.
        label_smoothing: cross-entropy label smoothing.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        seng: Mapping[str, Any] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1) (got {label_smoothing!r})")
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _shared_step(self, batch, stage: str, metric: MulticlassAccuracy) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        # SENG's default loss_reduction="mean" matches this mean-reduced loss.
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        metric(logits, y)
        # sync_dist: under DDP the epoch's loss is the mean over all ranks' batches (the accuracy metric syncs
        # itself), so every rank reports the same test loss
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test", on_step=False, on_epoch=True, batch_size=len(y),
                 sync_dist=True)
        self.log(f"{stage}/acc", metric, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train", self.train_acc)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "test", self.test_acc)
