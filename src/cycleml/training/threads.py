"""How many CPU threads PyTorch may use without oversubscribing a shared machine."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cgroup_quota() -> float | None:
    """The cgroup v2 CPU limit in CPUs (``cpu.max`` = "quota period"), None when unlimited."""
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        return int(quota) / int(period)
    except (OSError, ValueError):  # no cgroup v2 file, or "max" (no limit)
        return None


def current_load() -> float:
    """The 1-minute load average (runnable processes), 0 where the OS does not report it."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def choose_torch_threads(available: int, load: float) -> int:
    """Threads for the CPUs left free by ``load``: at least 1, never more than ``available``.

    PyTorch's default (one thread per core) makes its threads wait for each other when
    other processes hold some of the cores; the threads then spin instead of working.
    """
    free = available - max(0.0, load)
    return max(1, min(available, math.floor(free + 0.5)))


def torch_threads_for_run(requested: int | None) -> tuple[int, str]:
    """The thread count for a run and why: ``requested`` when given, otherwise chosen."""
    if requested:
        return int(requested), "torch_threads"
    available, load = available_cpus(), current_load()
    threads = choose_torch_threads(available, load)
    return threads, f"{available} CPU(s) available, load average {load:.2f}"
