"""The default torch thread count: the CPUs left free, never more than the process may use."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from cycleml.training import threads
from cycleml.training.threads import available_cpus, choose_torch_threads, torch_threads_for_run


@pytest.mark.parametrize(
    ("available", "load", "expected"),
    [
        (2, 0.0, 2),  # idle: every core
        (2, 1.3, 1),  # another process holds a core
        (2, 5.0, 1),  # overloaded: still one thread
        (8, 2.2, 6),
        (4, -1.0, 4),  # a bogus load never gives more than the available CPUs
        (1, 0.0, 1),
    ],
)
def test_choice_leaves_busy_cores_alone(available, load, expected):
    assert choose_torch_threads(available, load) == expected


def test_available_cpus_follow_affinity_and_quota(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "CGROUP_CPU_MAX", tmp_path / "missing")
    assert available_cpus() == 4
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # 1.5 CPUs
    monkeypatch.setattr(threads, "CGROUP_CPU_MAX", quota)
    assert available_cpus() == 2
    quota.write_text("max 100000\n")
    assert available_cpus() == 4


def test_explicit_value_wins_and_default_is_chosen(monkeypatch):
    assert torch_threads_for_run(3) == (3, "torch_threads")
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    monkeypatch.setattr(threads, "current_load", lambda: 1.4)
    assert torch_threads_for_run(None)[0] == 1


def test_train_sets_and_logs_the_chosen_threads(make_cfg, monkeypatch, caplog):
    from cycleml.training.train import _set_torch_threads

    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    monkeypatch.setattr(threads, "current_load", lambda: 1.6)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with caplog.at_level(logging.INFO, logger="cycleml"):
            _set_torch_threads(make_cfg("train"))
        assert torch.get_num_threads() == 1
        assert "torch uses 1 CPU thread(s) (2 CPU(s) available, load average 1.60)" in caplog.text
    finally:
        torch.set_num_threads(before)
