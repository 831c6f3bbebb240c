"""Early stopping sized to the run: patience a share of the epoch budget, off on small data.

A fixed patience on ``val/loss`` stops small-data runs long before their schedule ends:
with a few dozen validation items the loss is noisy and rises while accuracy still
improves. This callback watches what it is told (``val/acc`` by default), sets its
patience from ``max_epochs`` and stays off when the validation split is too small to
judge by, and logs what it chose.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping

from cycleml.errors import ConfigError

log = logging.getLogger(__name__)


class SizedEarlyStopping(EarlyStopping):
    """:class:`EarlyStopping` whose patience is ``patience_fraction`` of ``max_epochs``
    (at least ``min_patience``), switched off below ``min_val_items`` validation items."""

    def __init__(
        self,
        monitor: str = "val/acc",
        mode: str = "max",
        patience_fraction: float = 0.4,
        min_patience: int = 5,
        min_val_items: int = 200,
        **kwargs: Any,
    ) -> None:
        if not 0.0 < patience_fraction <= 1.0:
            raise ConfigError(
                f"callbacks.early_stopping.patience_fraction={patience_fraction} must be in (0, 1]"
            )
        super().__init__(monitor=monitor, mode=mode, patience=min_patience, **kwargs)
        self.patience_fraction = patience_fraction
        self.min_patience = min_patience
        self.min_val_items = min_val_items
        self.enabled = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return  # early stopping acts while fitting only
        max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 0
        self.patience = max(self.min_patience, math.ceil(self.patience_fraction * max_epochs))
        val_items = _val_items(trainer)
        self.enabled = val_items is None or val_items >= self.min_val_items
        if not self.enabled:
            log.info(
                "early stopping: off (%d validation items, fewer than min_val_items=%d); "
                "the run trains its %s epochs and keeps the best checkpoint",
                val_items, self.min_val_items, max_epochs or "scheduled",
            )  # fmt: skip
        else:
            log.info(
                "early stopping: on %s (%s), patience %d of %s epochs",
                self.monitor, self.mode, self.patience, max_epochs or "unlimited",
            )  # fmt: skip

    def _run_early_stopping_check(self, trainer: L.Trainer) -> None:
        if self.enabled:
            super()._run_early_stopping_check(trainer)


def _val_items(trainer: L.Trainer) -> int | None:
    """How many items the validation split holds, when the data module says."""
    datamodule = getattr(trainer, "datamodule", None)
    split_ids = getattr(datamodule, "split_ids", None)
    if split_ids is None:
        return None
    return len(split_ids("val"))
