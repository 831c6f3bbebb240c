"""Sharing one machine among trials that run at the same time: devices and CPU threads."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cycleml.errors import ConfigError

log = logging.getLogger(__name__)

# where a trial finds its CPU thread budget (set by the sweeper, read by TrialThreads)
THREADS_KEY = "optuna_trial.cpu_threads"


def split_devices(devices: Sequence[Any], slots: int) -> list[list[Any]]:
    """Deal ``devices`` (e.g. GPU ids) out to ``slots`` trials running at once, evenly.

    ``split_devices([0, 1, 2, 3], 2) == [[0, 1], [2, 3]]``. Fewer devices than slots is
    an error: two trials would share a device.
    """
    devices = list(devices)
    if slots < 1:
        raise ConfigError(f"cannot split devices among {slots} trials")
    if len(devices) < slots:
        raise ConfigError(
            f"{len(devices)} device(s) {devices} cannot be split among {slots} parallel trials; "
            "lower hydra.sweeper.n_jobs or list more devices"
        )
    share = len(devices) // slots
    return [devices[i * share : (i + 1) * share] for i in range(slots)]


def cpu_threads_per_trial(slots: int, cpus: int | None = None) -> int:
    """The CPU threads each of ``slots`` simultaneous trials may use (at least one)."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, cpus // max(1, slots))


class TrialThreads(Callback):
    """Hydra callback: limit a job's torch CPU threads to its share of the machine.

    The sweeper puts the share in ``optuna_trial.cpu_threads`` when trials run in
    parallel; jobs without it are left alone.
    """

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        threads = OmegaConf.select(config, THREADS_KEY)
        if not threads:
            return
        try:
            import torch
        except ImportError:
            return
        torch.set_num_threads(int(threads))
        log.info("this trial uses %d CPU thread(s)", int(threads))
