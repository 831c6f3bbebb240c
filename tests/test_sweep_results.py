"""Sweep results from a real study in SQLite: leaderboard, best trial, plot, `cycleml compare`."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from cycleml.errors import ConfigError
from cycleml.sweeps.results import (
    leaderboard,
    load_sweep,
    plot_sweep,
    write_results,
    write_sweep_info,
)
from cycleml.sweeps.study import INTERRUPTED, counts, open_storage, open_study, requeue_interrupted

SPACE = {
    "model.optimizer.lr": FloatDistribution(1e-4, 1e-1, log=True),
    "model.net.width": CategoricalDistribution([16, 32, 64]),
}


def add_trial(study, scores, state, **attrs):
    """Run one trial by hand: the next enqueued parameters, these scores, this end state."""
    trial = study.ask(SPACE)
    for key, value in {"wandb_id": f"wb{trial.number}", **attrs}.items():
        trial.set_user_attr(key, value)
    for step, score in enumerate(scores):
        trial.report(score, step)
    if state == TrialState.COMPLETE:
        study.tell(trial, scores[-1])
    elif state != TrialState.RUNNING:
        study.tell(trial, state=state)
    return trial


@pytest.fixture
def sweep(tmp_path: Path):
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = open_study("s", storage, "maximize")
    for lr, width in ((1e-3, 32), (3e-2, 64), (2e-4, 16), (1e-2, 16), (5e-3, 32)):
        study.enqueue_trial({"model.optimizer.lr": lr, "model.net.width": width})
    add_trial(study, [0.5, 0.8, 0.9], TrialState.COMPLETE, overrides=["a=1"])
    add_trial(study, [0.6, 0.95, 0.97], TrialState.COMPLETE, overrides=["a=2"])
    add_trial(study, [0.2], TrialState.PRUNED)
    add_trial(study, [], TrialState.FAIL, error="ValueError: boom\ntraceback")
    add_trial(study, [0.4], TrialState.RUNNING)
    write_sweep_info(
        tmp_path,
        {
            "study_name": "s",
            "metric": "val/acc",
            "direction": "maximize",
            "search_space": {"model.optimizer.lr": {"log": True}, "model.net.width": {}},
        },
    )
    return tmp_path, storage, study


def test_leaderboard_lists_every_trial_best_first(sweep) -> None:
    _, _, study = sweep
    table = leaderboard(study, "val/acc")
    assert list(table["trial"]) == [1, 0, 2, 3, 4]
    assert list(table["state"]) == ["complete", "complete", "pruned", "failed", "running"]
    assert table["val/acc"].iloc[:3].tolist() == pytest.approx([0.97, 0.9, 0.2])
    assert table["epochs"].tolist() == [3, 3, 1, 0, 1]
    assert table["param.model.net.width"].tolist() == [64, 32, 16, 16, 32]
    assert table["wandb_id"].tolist() == ["wb1", "wb0", "wb2", "wb3", "wb4"]
    assert table.loc[table["trial"] == 3, "error"].item() == "ValueError: boom"
    assert table["duration_s"].iloc[0] >= 0


def test_minimized_metric_puts_the_smallest_first(tmp_path: Path) -> None:
    study = open_study("m", open_storage(f"sqlite:///{tmp_path / 'm.db'}"), "minimize")
    for value in (0.3, 0.1, 0.2):
        trial = study.ask({"x": FloatDistribution(0, 1)})
        study.tell(trial, value)
    assert leaderboard(study, "val/loss")["val/loss"].tolist() == [0.1, 0.2, 0.3]


def test_results_files_hold_the_best_trial_and_read_back(sweep) -> None:
    folder, _, study = sweep
    best = write_results(folder, study, "val/acc")
    assert best == pytest.approx(0.97)
    summary = yaml.safe_load((folder / "best.yaml").read_text())
    assert summary["best_trial"] == 1
    assert summary["overrides"] == ["a=2"]
    assert summary["params"] == {"model.optimizer.lr": pytest.approx(3e-2), "model.net.width": 64}
    assert summary["wandb_id"] == "wb1"
    table = load_sweep(folder)
    assert table is not None and len(table) == 5
    assert table.attrs["metric"] == "val/acc"
    assert table.attrs["log_params"] == ["model.optimizer.lr"]
    png = plot_sweep(folder, table)
    assert png == folder / "sweep.png"
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 100 and image.shape[1] > 300


def test_no_best_file_while_no_trial_completed(tmp_path: Path) -> None:
    study = open_study("e", open_storage(f"sqlite:///{tmp_path / 'e.db'}"), "maximize")
    trial = study.ask({"x": FloatDistribution(0, 1)})
    study.tell(trial, state=TrialState.PRUNED)
    assert write_results(tmp_path, study, "val/acc") is None
    assert not (tmp_path / "best.yaml").exists()
    assert pd.read_csv(tmp_path / "leaderboard.csv")["state"].tolist() == ["pruned"]


def test_a_folder_of_plain_runs_is_not_a_sweep(tmp_path: Path) -> None:
    pd.DataFrame({"run_id": ["a"], "val/acc": [0.5]}).to_csv(tmp_path / "leaderboard.csv")
    assert load_sweep(tmp_path) is None
    assert load_sweep(tmp_path / "missing") is None


def test_interrupted_trials_are_closed_requeued_and_not_counted(sweep) -> None:
    _, storage, study = sweep
    assert counts(study) == (4, 1)
    assert requeue_interrupted(study, storage) == [4]
    trials = study.get_trials()
    assert trials[4].state == TrialState.FAIL and trials[4].user_attrs[INTERRUPTED]
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert len(waiting) == 1
    assert waiting[0].user_attrs["rerun_of"] == 4
    assert counts(study) == (4, 1)
    nxt = study.ask(SPACE)
    assert nxt.params == trials[4].params


def test_existing_study_with_the_other_direction_is_refused(sweep) -> None:
    _, storage, _ = sweep
    with pytest.raises(ConfigError, match="created to maximize, not minimize"):
        open_study("s", storage, "minimize")
    with pytest.raises(ConfigError, match="use one of maximize, minimize"):
        open_study("s", storage, "up")


def test_cycleml_compare_shows_a_sweep_and_writes_its_plot(sweep, capsys) -> None:
    compare = pytest.importorskip("cycleml.training.compare")
    folder, _, study = sweep
    write_results(folder, study, "val/acc")
    compare.run_compare(folder)
    out = capsys.readouterr().out
    assert "val/acc" in out and "pruned" in out and "wb1" in out
    assert (folder / "sweep.png").is_file()
