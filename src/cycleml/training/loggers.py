"""Trackers that keep a resumed run's history: CSV rows and the W&B step continue."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.logger import _add_prefix
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from cycleml.redaction import redacted_argv


class HistoryKeepingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued.

    Lightning deletes the file when its folder already holds one, so a resumed run lost
    every row from before the interruption. Here the rows are kept, except those at or
    after the first step logged again (written after the checkpoint the run resumed from).
    """

    def _check_log_dir_exists(self) -> None:
        self._continued = self._fs.isfile(self.metrics_file_path)
        if self._continued:
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = sorted(next(csv.reader(file), []))

    def save(self) -> None:
        if self._continued and self.metrics:
            self._continued = False
            self._drop_rows_from(min(int(row["step"]) for row in self.metrics))
        super().save()

    def _drop_rows_from(self, step: int) -> None:
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            rows = [row for row in csv.DictReader(file) if _step(row) < step]
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)


def _step(row: Mapping[str, str]) -> float:
    try:
        return float(row.get("step") or "nan")
    except ValueError:
        return float("nan")


class HistoryKeepingCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives a resume and is flushed at checkpoints.

    Flushing with each checkpoint means a killed run loses no row from before the
    checkpoint it resumes from.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> HistoryKeepingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = HistoryKeepingWriter(log_dir=self.log_dir)
        return self._experiment

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self.save()


class StepKeepingWandbLogger(WandbLogger):
    """``WandbLogger`` that logs at the trainer's global step.

    W&B numbers history rows itself, from 0 in each launch: a resumed offline run started
    again at ``_step`` 0. Given the trainer's step, the history continues where the
    checkpoint left off.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            # W&B warns about the setting on every start, even when it is unset
            self._wandb_init.pop("anonymous", None)

    @property
    def experiment(self) -> Any:
        # W&B records the command line in the run's metadata when the run starts; a
        # password in an override (a database URL) must not be stored there
        if self._experiment is None:
            with redacted_argv():
                return super().experiment
        return super().experiment

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if step is None or self._wandb_init.get("sync_tensorboard"):
            super().log_metrics(metrics, step)
            return
        metrics = _add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR)
        self.experiment.log({**metrics, "trainer/global_step": step}, step=step)
