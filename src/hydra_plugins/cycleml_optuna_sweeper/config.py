"""The sweeper's settings (``hydra.sweeper.*``), registered as ``hydra/sweeper=cycleml_optuna``."""

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.cycleml_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    # sampler and pruner stay configs: the sweeper builds them (and each job its pruner)
    _recursive_: bool = False
    # the study's name; with the default storage it also names the sweep folder
    study_name: str = "sweep"
    # SQLAlchemy URL of the study; null: sqlite:///<hydra.sweep.dir>/optuna.db
    storage: str | None = None
    # maximize or minimize the value the task function returns
    direction: str = "maximize"
    # name of that value in the results (e.g. val/acc)
    metric: str = "value"
    # trials the study holds at the end: complete, pruned or failed
    n_trials: int = 20
    # trials launched together; they run at once with a parallel launcher
    n_jobs: int = 1
    # the sweep stops once more than this fraction of n_trials has failed
    max_failure_rate: float = 0.25
    # Optuna sampler and pruner (`_target_` configs); null: TPE sampler, no pruning
    sampler: Any = None
    pruner: Any = None
    # search space: key -> sweep in Hydra's override grammar (interval, choice, range, tag(log, ...))
    params: dict[str, Any] | None = None
    # devices dealt out among the n_jobs simultaneous trials, e.g. GPU ids [0, 1, 2, 3]
    devices: list[Any] | None = None
    # the override that receives each trial's share of the devices
    devices_key: str = "trainer.devices"
    # CPU threads per trial when n_jobs > 1; null: the machine's CPUs / n_jobs
    cpu_threads: int | None = None


ConfigStore.instance().store(
    group="hydra/sweeper",
    name="cycleml_optuna",
    node=OptunaSweeperConf,
    provider="cycleml",
)
