"""The Hydra plugin class; the work happens in ``_core`` (imported on use, not at discovery)."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class OptunaSweeper(Sweeper):
    """Runs the trials of an Optuna study through Hydra's launcher (see ``config.py``)."""

    def __init__(self, **settings: Any) -> None:
        from ._core import OptunaSweep

        self.sweep_impl = OptunaSweep(**settings)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.sweep_impl.setup(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        return self.sweep_impl.sweep(arguments)
