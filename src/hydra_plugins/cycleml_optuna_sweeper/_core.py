"""The sweep loop: ask the study for trials, launch them through Hydra, tell the outcomes.

Every outcome is recorded in the study's persistent storage before the next batch, so
a sweep stopped at any point continues where it was when the same command runs again.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from numbers import Real
from pathlib import Path
from typing import Any

import optuna
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from cycleml.errors import ConfigError, CycleMLError
from cycleml.redaction import redact, redact_values
from cycleml.sweeps.overrides import override
from cycleml.sweeps.resources import THREADS_KEY, cpu_threads_per_trial, split_devices
from cycleml.sweeps.results import leaderboard, write_results, write_sweep_info
from cycleml.sweeps.search_space import SearchSpace, parse_search_space
from cycleml.sweeps.study import (
    counts,
    describe_url,
    open_storage,
    open_study,
    requeue_interrupted,
    storage_url,
)

log = logging.getLogger(__name__)

# the override through which a job learns which trial it is
TRIAL_NUMBER_KEY = "optuna_trial.number"
# the config group that selects this sweeper (`hparams_search=optuna`)
SEARCH_CONFIG_OVERRIDE = "hparams_search="


class SweepAbortedError(CycleMLError):
    """Too many trials failed: the sweep stopped before ``n_trials``."""


class OptunaSweep:
    """Settings as in :class:`~hydra_plugins.cycleml_optuna_sweeper.config.OptunaSweeperConf`."""

    def __init__(
        self,
        study_name: str,
        storage: str | None,
        direction: str,
        metric: str,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        sampler: DictConfig | None,
        pruner: DictConfig | None,
        params: DictConfig | None,
        devices: Sequence[Any] | None,
        devices_key: str,
        cpu_threads: int | None,
    ) -> None:
        if n_trials < 1:
            raise ConfigError(f"hydra.sweeper.n_trials={n_trials}: needs at least 1")
        if n_jobs < 1:
            raise ConfigError(f"hydra.sweeper.n_jobs={n_jobs}: needs at least 1")
        if not 0.0 <= max_failure_rate <= 1.0:
            raise ConfigError(
                f"hydra.sweeper.max_failure_rate={max_failure_rate}: a fraction in [0, 1]"
            )
        self.study_name = str(study_name)
        self.storage = storage
        self.direction = str(direction)
        self.metric = str(metric)
        self.n_trials = int(n_trials)
        self.n_jobs = int(n_jobs)
        self.max_failure_rate = float(max_failure_rate)
        self.sampler_cfg = sampler
        self.pruner_cfg = pruner
        self.params = _container(params) or {}
        self.devices = _container(devices)
        self.devices_key = str(devices_key)
        self.cpu_threads = cpu_threads
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Any = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # ---- the loop -------------------------------------------------------------------

    def sweep(self, arguments: list[str]) -> float | None:
        assert self.config is not None and self.hydra_context is not None
        sweep_dir = self._sweep_dir()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        space = parse_search_space(self.params, arguments, parser)
        if not space.distributions:
            raise ConfigError(
                "nothing to search: set hydra.sweeper.params or pass a sweep such as "
                "'model.optimizer.lr=tag(log, interval(1e-4, 1e-1))'"
            )

        url = storage_url(self.storage, sweep_dir)
        storage = open_storage(url)
        existing = _existing_trials(storage, self.study_name)
        study = open_study(
            self.study_name, storage, self.direction, self._sampler(existing), self._pruner()
        )
        # the sweep's config with any password in it redacted
        (sweep_dir / "multirun.yaml").write_text(
            redact(OmegaConf.to_yaml(self.config)), encoding="utf-8"
        )
        write_sweep_info(sweep_dir, self._info(url, arguments, space))
        requeue_interrupted(study, storage)

        done, failed = counts(study)
        # failures of an earlier run stay in the study (and count towards n_trials), but
        # only this run's count against max_failure_rate: rerunning after a fix goes on
        failed_before = failed
        log.info(
            "study '%s' in %s: %d of %d trials done (%d failed)",
            self.study_name, describe_url(url), done, self.n_trials, failed,
        )  # fmt: skip
        slots = self._slot_overrides()
        while done < self.n_trials:
            size = min(self.n_jobs, self.n_trials - done)
            trials = [study.ask(space.distributions) for _ in range(size)]
            batch = self._batch(trials, space, slots)
            self._check_composes(study, trials, batch)
            results = self.launcher.launch(batch, initial_job_idx=trials[0].number)
            for trial, result in zip(trials, results, strict=True):
                self._record(study, trial, result)
            done, failed = counts(study)
            write_results(sweep_dir, study, self.metric)
            if failed - failed_before > self.max_failure_rate * self.n_trials:
                raise SweepAbortedError(
                    f"{failed - failed_before} of {self.n_trials} trials failed, more than "
                    f"max_failure_rate={self.max_failure_rate}; see the errors in "
                    f"{sweep_dir / 'leaderboard.csv'} and each trial's log. Once fixed, "
                    "the same command continues the study"
                )
        best = write_results(sweep_dir, study, self.metric)
        self._log_summary(study, sweep_dir, best)
        return best

    def _batch(
        self, trials: list[optuna.Trial], space: SearchSpace, slots: list[list[str]]
    ) -> list[list[str]]:
        batch = []
        for slot, trial in enumerate(trials):
            trial_overrides = space.overrides(trial.params)
            # what reruns this trial as a plain training run: without the search config
            rerun = [o for o in trial_overrides if not o.startswith(SEARCH_CONFIG_OVERRIDE)]
            trial.set_user_attr("overrides", rerun)
            batch.append([*trial_overrides, f"++{TRIAL_NUMBER_KEY}={trial.number}", *slots[slot]])
        return batch

    def _check_composes(
        self, study: optuna.Study, trials: list[optuna.Trial], batch: list[list[str]]
    ) -> None:
        """Compose every job's config first: a bad override fails the sweep, not N trials."""
        assert self.hydra_context is not None and self.config is not None
        try:
            for overrides in batch:
                self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        except Exception as err:
            for trial in trials:
                trial.set_user_attr("error", f"config: {err}")
                study.tell(trial, state=TrialState.FAIL)
            raise ConfigError(f"a trial's config does not compose: {err}") from err

    def _record(self, study: optuna.Study, trial: optuna.Trial, result: JobReturn) -> None:
        """Tell the study how the job ended: complete with its value, pruned, or failed."""
        run_dir = _run_dir(result)
        if run_dir is not None:
            trial.set_user_attr("run_dir", str(run_dir))
            wandb_id = _wandb_id(run_dir)
            if wandb_id:
                trial.set_user_attr("wandb_id", wandb_id)
        if result.status == JobStatus.FAILED:
            # the job's exception; `return_value` would re-raise it and print it as an error
            err = result._return_value
            if isinstance(err, optuna.TrialPruned):
                study.tell(trial, state=TrialState.PRUNED)
                log.info("trial %d pruned: %s", trial.number, err)
            else:
                self._fail(study, trial, f"{type(err).__name__}: {err}", err)
            return
        value = result.return_value
        if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(float(value)):
            self._fail(
                study,
                trial,
                f"the task returned {value!r}, not a number; set optimized_metric to a logged metric",
            )
            return
        study.tell(trial, float(value))
        log.info("trial %d: %s=%.6g", trial.number, self.metric, float(value))

    def _fail(
        self, study: optuna.Study, trial: optuna.Trial, error: str, err: Exception | None = None
    ) -> None:
        trial.set_user_attr("error", error[:2000])
        study.tell(trial, state=TrialState.FAIL)
        log.error("trial %d failed: %s", trial.number, error, exc_info=err)

    # ---- settings -------------------------------------------------------------------

    def _sweep_dir(self) -> Path:
        """The sweep folder, resolved as a job sees it (it may use ``${hydra:...}``)."""
        assert self.config is not None
        hydra_config = HydraConfig.instance()
        previous = hydra_config.cfg
        hydra_config.set_config(self.config)
        try:
            return Path(str(self.config.hydra.sweep.dir)).absolute()
        finally:
            hydra_config.cfg = previous

    def _sampler(self, existing: int) -> optuna.samplers.BaseSampler:
        if self.sampler_cfg is None:
            return optuna.samplers.TPESampler()
        cfg = OmegaConf.to_container(self.sampler_cfg, resolve=True)
        assert isinstance(cfg, dict)
        if existing and cfg.get("seed") is not None:
            # a resumed sweep must not replay the random draws of the first run
            cfg["seed"] = int(cfg["seed"]) + existing
            log.info("resuming: sampler seed %s (first seed + trials so far)", cfg["seed"])
        return instantiate(cfg)

    def _pruner(self) -> optuna.pruners.BasePruner:
        if self.pruner_cfg is None:
            return optuna.pruners.NopPruner()
        return instantiate(self.pruner_cfg)

    def _slot_overrides(self) -> list[list[str]]:
        """What each of the ``n_jobs`` simultaneous trials gets: its devices, its threads."""
        slots: list[list[str]] = [[] for _ in range(self.n_jobs)]
        if self.devices:
            for slot, share in zip(slots, split_devices(self.devices, self.n_jobs), strict=True):
                slot.append(override(f"++{self.devices_key}", share))
        if self.n_jobs > 1:
            assert self.config is not None
            if str(self.config.hydra.launcher.get("_target_", "")).endswith("BasicLauncher"):
                log.warning(
                    "n_jobs=%d with the basic launcher runs the trials one after another; "
                    "use hydra/launcher=parallel to run them at once",
                    self.n_jobs,
                )
            threads = self.cpu_threads or cpu_threads_per_trial(self.n_jobs)
            for slot in slots:
                slot.append(f"++{THREADS_KEY}={threads}")
        return slots

    def _info(self, url: str, arguments: list[str], space: SearchSpace) -> dict[str, Any]:
        return {
            "study_name": self.study_name,
            "storage": describe_url(url),
            "metric": self.metric,
            "direction": self.direction,
            "n_trials": self.n_trials,
            "n_jobs": self.n_jobs,
            "sampler": _target_name(self.sampler_cfg) or "optuna.samplers.TPESampler",
            "pruner": _target_name(self.pruner_cfg) or "optuna.pruners.NopPruner",
            "arguments": redact_values(list(arguments)),
            "fixed_overrides": redact_values(list(space.fixed)),
            "search_space": {
                name: _describe_distribution(dist) for name, dist in space.distributions.items()
            },
        }

    def _log_summary(self, study: optuna.Study, sweep_dir: Path, best: float | None) -> None:
        table = leaderboard(study, self.metric)
        states = table["state"].value_counts().to_dict() if len(table) else {}
        log.info("sweep finished: %s; results in %s", states, sweep_dir)
        if best is None:
            log.warning("no trial completed: no best value")
        else:
            log.info("best %s=%.6g (see %s)", self.metric, best, sweep_dir / "best.yaml")


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _existing_trials(storage: optuna.storages.BaseStorage, study_name: str) -> int:
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return 0
    return len(storage.get_all_trials(study_id, deepcopy=False))


def _target_name(cfg: Any) -> str | None:
    return str(cfg.get("_target_")) if cfg is not None and cfg.get("_target_") else None


def _describe_distribution(dist: optuna.distributions.BaseDistribution) -> dict[str, Any]:
    described = json.loads(optuna.distributions.distribution_to_json(dist))
    return {"distribution": described["name"], **described["attributes"]}


def _run_dir(result: JobReturn) -> Path | None:
    try:
        return Path(str(result.hydra_cfg.hydra.runtime.output_dir))  # type: ignore[union-attr]
    except Exception:
        return None


def _wandb_id(run_dir: Path) -> str | None:
    """The W&B run id the training job wrote to ``run_info.json``, if any."""
    try:
        info = json.loads((run_dir / "run_info.json").read_text())
    except (OSError, ValueError):
        return None
    return info.get("wandb_id") if isinstance(info, dict) else None
