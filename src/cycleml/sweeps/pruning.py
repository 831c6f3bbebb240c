"""Lightning callback: report the optimised metric to the sweep trial every epoch, stop early."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import optuna
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from cycleml.errors import ConfigError
from cycleml.sweeps.study import storage_url
from cycleml.sweeps.trial_reporter import TrialReporter

log = logging.getLogger(__name__)


class OptunaPruning(L.Callback):
    """After each validation, report ``monitor`` to the trial; raise ``TrialPruned`` to stop it.

    Outside a sweep (``trial_number`` null) it does nothing, so a config with this
    callback also trains normally. The sweeper records a trial that raised
    ``TrialPruned`` as pruned, not failed. Under DDP, rank 0 reports and every rank
    stops together.

    Args:
        monitor: the logged metric to report, e.g. ``val/acc``.
        trial_number: the trial this run is (the sweeper's ``optuna_trial.number``).
        study_name: the study's name.
        storage: the study's SQLAlchemy URL; null means the SQLite file in ``sweep_dir``.
        sweep_dir: the sweep's folder.
        pruner: the Optuna pruner deciding when to stop; null: the sweep's own
            (``hydra.sweeper.pruner``), or none at all outside a Hydra sweep.
    """

    def __init__(
        self,
        monitor: str,
        trial_number: int | None = None,
        study_name: str | None = None,
        storage: str | None = None,
        sweep_dir: str | None = None,
        pruner: optuna.pruners.BasePruner | None = None,
    ) -> None:
        super().__init__()
        self.monitor = monitor
        self.trial_number = trial_number
        self.study_name = study_name
        self.storage = storage
        self.sweep_dir = sweep_dir
        self.pruner = pruner
        self._reporter: TrialReporter | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.trial_number is None or not trainer.is_global_zero or self._reporter:
            return
        if not self.study_name or not (self.storage or self.sweep_dir):
            raise ConfigError(
                "callbacks.optuna_pruning: a trial_number needs study_name and storage or sweep_dir"
            )
        url = storage_url(self.storage, Path(self.sweep_dir or "."))
        pruner = self.pruner or sweep_pruner()
        self._reporter = TrialReporter(self.study_name, url, self.trial_number, pruner)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.trial_number is None or trainer.sanity_checking:
            return
        # rank 0 decides; every rank learns the decision, so all stop together
        outcome = self._report(trainer) if trainer.is_global_zero else ("", "")
        kind, message = trainer.strategy.broadcast(outcome)
        if kind == "pruned":
            raise optuna.TrialPruned(message)
        if kind == "error":
            raise ConfigError(message)

    def _report(self, trainer: L.Trainer) -> tuple[str, str]:
        value: Any = trainer.callback_metrics.get(self.monitor)
        if value is None:
            logged = ", ".join(sorted(trainer.callback_metrics)) or "none"
            return "error", (
                f"callbacks.optuna_pruning.monitor '{self.monitor}' is not logged; logged: {logged}"
            )
        assert self._reporter is not None
        try:
            self._reporter.report(value, trainer.current_epoch)
        except optuna.TrialPruned as pruned:
            log.info("%s", pruned)
            return "pruned", str(pruned)
        return "", ""


def sweep_pruner() -> optuna.pruners.BasePruner | None:
    """The pruner configured for the running Hydra sweep (``hydra.sweeper.pruner``), if any."""
    if not HydraConfig.initialized():
        return None
    node = OmegaConf.select(HydraConfig.get(), "sweeper.pruner")
    if node is None:
        return None
    # a resolved copy: the Hydra node is read-only and may interpolate the job's config
    return hydra.utils.instantiate(OmegaConf.to_container(node, resolve=True))
