"""One log line per epoch with the main metrics, for the run's log file."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import lightning as L

log = logging.getLogger(__name__)


class EpochLog(L.Callback):
    """Logs ``epoch 3/25: train/loss 0.412, val/loss 0.318, val/acc 0.951 (4.1 s)``.

    A metric logged both per step and per epoch is read from its ``_epoch`` value;
    metrics that were not logged are left out.
    """

    def __init__(self, metrics: Sequence[str] = ("train/loss", "val/loss", "val/acc")) -> None:
        self.metrics = list(metrics)
        self._started = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.global_rank != 0:
            return
        values = trainer.callback_metrics
        parts = []
        for name in self.metrics:
            value = values.get(f"{name}_epoch", values.get(name))
            if value is not None:
                parts.append(f"{name} {float(value):.4g}")
        of = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        log.info(
            "epoch %d%s: %s (%.1f s)",
            trainer.current_epoch + 1,
            of,
            ", ".join(parts) or "no metrics logged",
            time.perf_counter() - self._started,
        )
