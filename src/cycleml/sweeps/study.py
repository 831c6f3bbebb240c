"""The Optuna study of a sweep, in persistent storage so that rerunning a sweep resumes it."""

from __future__ import annotations

import logging
from pathlib import Path

import optuna
from optuna.storages import RDBStorage
from optuna.study import StudyDirection
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from cycleml.errors import ConfigError

log = logging.getLogger(__name__)

STORAGE_FILE = "optuna.db"
# user attribute of a trial that a stopped sweep left running; it is run again
INTERRUPTED = "interrupted"
DIRECTIONS = ("maximize", "minimize")


def storage_url(storage: str | None, sweep_dir: str | Path) -> str:
    """``storage`` (any SQLAlchemy URL), or an SQLite file in the sweep folder."""
    if storage:
        return str(storage)
    return f"sqlite:///{(Path(sweep_dir) / STORAGE_FILE).resolve()}"


def describe_url(url: str) -> str:
    """The URL with any password hidden, for logs and messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def open_storage(url: str) -> RDBStorage:
    """Optuna's relational storage at ``url``; an SQLite file waits for locks held by peers."""
    engine_kwargs = {}
    if url.startswith("sqlite"):
        # parallel trials write to the same file: wait for the lock instead of failing
        engine_kwargs = {"connect_args": {"timeout": 60}}
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
    try:
        return RDBStorage(url, engine_kwargs=engine_kwargs)
    except Exception as err:
        raise ConfigError(f"cannot open the sweep storage '{describe_url(url)}': {err}") from err


def open_study(
    name: str,
    storage: RDBStorage,
    direction: str,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
    """Create the study ``name`` or load it if an earlier run of the sweep created it."""
    if direction not in DIRECTIONS:
        raise ConfigError(f"sweep direction '{direction}': use one of {', '.join(DIRECTIONS)}")
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        direction=direction,
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )
    if study.direction != StudyDirection[direction.upper()]:
        raise ConfigError(
            f"study '{name}' exists and was created to {study.direction.name.lower()}, "
            f"not {direction}; choose another study_name or the original direction"
        )
    return study


def trial_handle(study: optuna.Study, storage: RDBStorage, number: int) -> optuna.Trial:
    """A handle on trial ``number`` of ``study`` to report to, e.g. from a training job."""
    study_id = storage.get_study_id_from_name(study.study_name)
    return optuna.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, number))


def requeue_interrupted(study: optuna.Study, storage: RDBStorage) -> list[int]:
    """Close the trials a stopped run left running and queue their parameters again.

    They are recorded as failed with the ``interrupted`` attribute, which keeps them
    out of the failure count, and their parameters run again as new trials. Only one
    sweep process may drive a study at a time.
    """
    numbers = []
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial = trial_handle(study, storage, frozen.number)
        trial.set_user_attr(INTERRUPTED, True)
        study.tell(trial, state=TrialState.FAIL)
        study.enqueue_trial(dict(frozen.params), user_attrs={"rerun_of": frozen.number})
        numbers.append(frozen.number)
    if numbers:
        log.info("trials %s were interrupted; their parameters run again", numbers)
    return numbers


def counts(study: optuna.Study) -> tuple[int, int]:
    """(trials that ran to an end — complete, pruned or failed —, of which failed).

    Interrupted trials count as neither: their parameters are run again.
    """
    done = failed = 0
    for trial in study.get_trials(deepcopy=False):
        if trial.user_attrs.get(INTERRUPTED):
            continue
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            done += 1
        elif trial.state == TrialState.FAIL:
            done += 1
            failed += 1
    return done, failed
