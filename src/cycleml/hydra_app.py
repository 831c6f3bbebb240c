"""One decorator that turns a task function into a cycleml Hydra app."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from cycleml.configs_path import config_dir
from cycleml.errors import CycleMLError

log = logging.getLogger(__name__)


def user_error(error: BaseException) -> CycleMLError | None:
    """The :class:`CycleMLError` behind ``error``, also when Hydra's instantiate wrapped it."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, CycleMLError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _remove_failed_run_folder(folder: Path) -> None:
    """A failed single run leaves no folder holding only its config and log."""
    from cycleml.training.summary import remove_if_stub

    if remove_if_stub(folder):
        log.info("removed %s: the run failed before writing any result", folder)


def hydra_app(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """Wrap ``task(cfg)`` as a Hydra app on ``configs/<config_name>.yaml``.

    A :class:`CycleMLError` in a single run is printed as one line naming the problem
    and exits with status 2; in a multirun it propagates so that the sweeper can
    record the job as failed and go on.
    """

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @functools.wraps(task)
        def run(cfg: DictConfig) -> Any:
            try:
                return task(cfg)
            except Exception as raised:
                err = user_error(raised)
                multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
                if HydraConfig.initialized() and not multirun:
                    _remove_failed_run_folder(Path(HydraConfig.get().runtime.output_dir))
                if err is None or multirun:
                    raise
                log.error("%s", err)
                print(f"cycleml {config_name}: error: {err}", file=sys.stderr)
                raise SystemExit(2) from None

        return hydra.main(version_base="1.3", config_path=config_dir(), config_name=config_name)(
            run
        )

    return decorate
