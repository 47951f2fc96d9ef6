"""Shared pieces of the bundled models: argument checks, the optimizer helper and ``ClassifierModule``."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from lightning_sparse._checks import check_positive_int

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = (None, "cosine")


def check_optimizer_args(optimizer: str, lr: float, weight_decay: float, scheduler: str | None) -> None:
    """Validates the arguments of :func:`build_optimizer` early, in a model's ``__init__``.

    Raises:
        ValueError: if ``optimizer`` or ``scheduler`` is unknown, ``lr <= 0`` or ``weight_decay < 0``.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")


def build_optimizer(
    module: L.LightningModule, optimizer: str, lr: float, weight_decay: float, momentum: float, scheduler: str | None
) -> Any:
    """What ``configure_optimizers`` returns: the optimizer, plus a per-step cosine schedule when asked.

    ``"cosine"`` anneals the learning rate to 0 over ``trainer.estimated_stepping_batches`` optimizer steps.

    Args:
        module: the LightningModule (attached to a trainer when ``scheduler="cosine"``).
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (with ``momentum``).
        lr: learning rate.
        weight_decay: weight decay of every parameter.
        momentum: SGD momentum (ignored by Adam / AdamW).
        scheduler: ``None`` or ``"cosine"``.

    Raises:
        ValueError: if ``scheduler="cosine"`` and the run has no finite number of steps.

    Example::

        from lightning_sparse.models.base import build_optimizer

        def configure_optimizers(self):
            return build_optimizer(self, "sgd", lr=0.1, weight_decay=5e-4, momentum=0.9, scheduler="cosine")
    """
    params = module.parameters()
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if scheduler is None:
        return opt
    total = module.trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise ValueError("scheduler='cosine' needs a finite run: set max_epochs or max_steps, or pass scheduler=None")
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(total)))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


class ClassifierModule(L.LightningModule):
    """Base of the bundled image classifiers: cross entropy, accuracy, and the optimizer from constructor args.

    Subclasses build their layers, implement ``forward(x) -> logits`` and call ``self.save_hyperparameters()``.
    Logs ``train_loss``, ``val_loss``, ``val_acc`` (progress bar), ``test_loss`` and ``test_acc``.

    Args:
        num_classes: number of classes.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"``.
        lr: learning rate.
        weight_decay: weight decay.
        momentum: SGD momentum (``optimizer="sgd"`` only).
        scheduler: ``None`` or ``"cosine"`` (per step, over the whole run).

    Raises:
        ValueError: if ``num_classes`` is not a positive integer or an optimizer argument is invalid.

    Example::

        from torch import nn
        from lightning_sparse.models.base import ClassifierModule

        class Linear(ClassifierModule):
            def __init__(self, lr: float = 1e-2):
                super().__init__(num_classes=10, lr=lr)
                self.save_hyperparameters()
                self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

            def forward(self, x):
                return self.net(x)
    """

    def __init__(
        self,
        num_classes: int = 10,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: str | None = "cosine",
    ) -> None:
        super().__init__()
        check_positive_int(num_classes=num_classes)
        check_optimizer_args(optimizer, lr, weight_decay, scheduler)
        self.optimizer_name, self.lr, self.weight_decay = optimizer, lr, weight_decay
        self.momentum, self.scheduler_name = momentum, scheduler
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, acc: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}_loss", F.cross_entropy(logits, y), sync_dist=True)
        acc(logits, y)
        self.log(f"{stage}_acc", acc, prog_bar=stage == "val")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc)

    def configure_optimizers(self) -> Any:
        return build_optimizer(
            self, self.optimizer_name, self.lr, self.weight_decay, self.momentum, self.scheduler_name
        )
