"""One decorator that turns a task function into a cycleml Hydra app."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from cycleml.cli_args import check_no_bare_words, check_readable
from cycleml.config_schema import check_config
from cycleml.configs_path import config_dir
from cycleml.errors import CycleMLError
from cycleml.override_hints import check_overrides
from cycleml.redaction import redact, redacted_output

log = logging.getLogger(__name__)

# an override of each primary config, for the error naming a plain word on its command line
OVERRIDE_EXAMPLES = {
    "train": "trainer.max_epochs=3",
    "eval": "ckpt_path=checkpoints/best.ckpt",
    "compare": "sort=val/acc",
    "export": "export.quantize=int8",
    "predict": "batch_size=64",
    "serve": "port=8080",
    "data_gather": "output=data/gathered",
    "data_clean": "overwrite=true",
    "data_diff": "limit=20",
    "registry": "format=json",
    "monitor": "window.size=500",
    "pipeline": "trigger=drift",
    "ab": "format=json",
}


def user_error(error: BaseException) -> CycleMLError | None:
    """The :class:`CycleMLError` behind ``error``, also when Hydra's instantiate wrapped it."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, CycleMLError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def exit_with_user_error(config_name: str, err: CycleMLError, logged: bool = True) -> NoReturn:
    """Report a user error in one line (passwords redacted) and exit with status 2;
    ``logged`` also writes it to the job's log."""
    message = redact(str(err))
    if logged:
        log.error("%s", message)
    print(f"cycleml {config_name}: error: {message}", file=sys.stderr)
    raise SystemExit(2) from None


# run folders that existed before this process's run started (noted by the UserChecks
# callback before Hydra creates the folder): a command whose configs give every run the
# same folder (`cycleml experiment`, `cycleml registry`) shares it with earlier runs
_EARLIER_RUN_FOLDERS: set[Path] = set()


def note_run_folder(folder: Path) -> None:
    """Note, before a single run starts, whether its run folder is there already."""
    if folder.is_dir():
        _EARLIER_RUN_FOLDERS.add(folder.resolve())


def _remove_failed_run_folder(folder: Path) -> None:
    """A failed single run leaves no folder holding only its config and log, when the
    run made that folder: one that earlier runs share (their log) is kept."""
    from cycleml.training.summary import remove_if_stub

    if folder.resolve() in _EARLIER_RUN_FOLDERS:
        return
    if remove_if_stub(folder):
        log.info("removed %s: the run failed before writing any result", folder)


def hydra_app(
    config_name: str, command: str | None = None
) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """Wrap ``task(cfg)`` as a Hydra app on ``configs/<config_name>.yaml``.

    A misspelled group or option on the command line is named before Hydra starts.
    The composed config is checked (``config_schema``) before the task runs. A
    :class:`CycleMLError` in a single run is printed as one line naming the problem
    and exits with status 2 (``cycleml <command>: error: …``; ``command`` defaults to
    the config's name); in a multirun it propagates so that the sweeper can
    record the job as failed and go on.
    """
    shown = command or config_name

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @functools.wraps(task)
        def run(cfg: DictConfig) -> Any:
            try:
                # also here, not only in the UserChecks callback: a multirun job's own
                # sweep values are composed after that callback ran
                check_config(cfg, config_name)
                return task(cfg)
            except Exception as raised:
                err = user_error(raised)
                multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
                if HydraConfig.initialized() and not multirun:
                    _remove_failed_run_folder(Path(HydraConfig.get().runtime.output_dir))
                if err is None or multirun:
                    raise
                exit_with_user_error(shown, err)

        app = hydra.main(version_base="1.3", config_path=config_dir(), config_name=config_name)(run)

        @functools.wraps(task)
        def main(*args: Any, **kwargs: Any) -> Any:
            with redacted_output():
                try:
                    check_no_bare_words(
                        sys.argv[1:], OVERRIDE_EXAMPLES.get(config_name, "key=value")
                    )
                    check_readable(sys.argv[1:])
                    check_overrides(config_name, sys.argv[1:])
                except CycleMLError as err:
                    exit_with_user_error(shown, err, logged=False)
                return app(*args, **kwargs)

        return main

    return decorate
