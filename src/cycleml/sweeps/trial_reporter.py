"""A training job's line back to its sweep trial: report the metric, learn whether to stop."""

from __future__ import annotations

import logging
import math
from typing import Any

import optuna

from cycleml.sweeps.study import describe_url, open_storage, trial_handle

log = logging.getLogger(__name__)


class TrialReporter:
    """Reports one trial's intermediate values to its study in persistent storage.

    The trial is opened from the storage by number, so this works the same in the
    sweep's own process and in a job that a launcher started elsewhere. ``pruner``
    decides when the trial is unpromising (none: never).
    """

    def __init__(
        self,
        study_name: str,
        storage: str,
        trial_number: int,
        pruner: optuna.pruners.BasePruner | None = None,
    ) -> None:
        rdb = open_storage(storage)
        study = optuna.load_study(
            study_name=study_name,
            storage=rdb,
            # the sampler is not used for reporting; the pruner is
            sampler=optuna.samplers.RandomSampler(),
            pruner=pruner or optuna.pruners.NopPruner(),
        )
        self.trial = trial_handle(study, rdb, int(trial_number))
        self.number = int(trial_number)
        log.info(
            "reporting to trial %d of study '%s' in %s",
            self.number,
            study_name,
            describe_url(storage),
        )

    def report(self, value: Any, step: int) -> None:
        """Record ``value`` at ``step``; raise :class:`optuna.TrialPruned` if the trial should stop."""
        value = float(value)
        if math.isnan(value):
            log.warning("trial %d: metric is NaN at step %d; not reported", self.number, step)
            return
        self.trial.report(value, step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(
                f"trial {self.number} pruned at step {step} (value {value:.6g})"
            )
