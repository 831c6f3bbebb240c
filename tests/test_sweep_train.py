"""`cycleml train -m hparams_search=optuna` on digits: prune, interrupt, resume, compare."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

pytest.importorskip("cycleml.training.train")

STUDY = "digits_test"
# tiny epochs: 3 epochs of 4 batches; a wide learning-rate range so some trials lag
SWEEP = [
    "train",
    "-m",
    "hparams_search=optuna",
    "logger=csv",
    "augment=none",
    "test=false",
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=4",
    f"hydra.sweeper.study_name={STUDY}",
    "hydra.sweeper.n_trials=8",
    "hydra.sweeper.pruner.n_startup_trials=1",
    "hydra.sweeper.pruner.n_warmup_steps=0",
    "model.optimizer.lr=tag(log, interval(1e-5, 1e-1))",
]


def environment(root: Path) -> dict[str, str]:
    return {**os.environ, "CYCLEML_ROOT": str(root), "WANDB_MODE": "offline"}


def study_states(url: str) -> list[TrialState]:
    study = optuna.load_study(study_name=STUDY, storage=url)
    return [t.state for t in study.get_trials(deepcopy=False)]


@pytest.mark.slow
def test_digits_sweep_survives_a_kill_prunes_and_reports(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "logs" / "train" / "sweeps" / STUDY
    url = f"sqlite:///{sweep_dir / 'optuna.db'}"
    command = [sys.executable, "-m", "cycleml", *SWEEP]
    env = environment(tmp_path)

    started = time.time()
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        while time.time() - started < 600:
            time.sleep(0.5)
            assert proc.poll() is None, "the sweep ended before it could be interrupted"
            if not (sweep_dir / "optuna.db").exists():
                continue
            try:
                found = study_states(url)
            except Exception:  # the study is being created
                continue
            finished = [s for s in found if s in (TrialState.COMPLETE, TrialState.PRUNED)]
            if len(finished) >= 2 and TrialState.RUNNING in found:
                break
        else:
            pytest.fail("the sweep did not reach 2 finished trials in time")
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert study_states(url).count(TrialState.RUNNING) == 1

    # the same command again continues the study
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    elapsed = time.time() - started
    assert result.returncode == 0, result.stderr[-4000:]
    print(f"8-trial digits sweep with one kill and resume: {elapsed:.0f} s")

    study = optuna.load_study(study_name=STUDY, storage=url)
    trials = study.get_trials()
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == 8
    assert sum(t.state == TrialState.PRUNED for t in trials) >= 1
    interrupted = [t for t in trials if t.user_attrs.get("interrupted")]
    assert len(interrupted) == 1
    assert any(t.user_attrs.get("rerun_of") == interrupted[0].number for t in trials)
    assert not any(t.state == TrialState.RUNNING for t in trials)

    best = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    assert best["best_value"] == pytest.approx(study.best_value)
    assert best["metric"] == "val/acc"
    assert any(o.startswith("model.optimizer.lr=") for o in best["overrides"])
    assert "hparams_search=optuna" not in best["overrides"]
    best_dir = Path(best["run_dir"])
    summary = json.loads((best_dir / "summary.json").read_text())
    assert summary["metrics"]["val/acc"] == pytest.approx(best["best_value"])

    table = pd.read_csv(sweep_dir / "leaderboard.csv")
    assert table["state"].isin(["complete", "pruned"]).sum() == 8
    for row in table[table["state"].isin(["complete", "pruned"])].itertuples():
        info = json.loads((Path(row.run_dir) / "run_info.json").read_text())
        assert row.wandb_id == info["wandb_id"]
    pruned = table[table["state"] == "pruned"]
    assert (pruned["epochs"] < 3).all()

    shown = subprocess.run(
        [sys.executable, "-m", "cycleml", "compare", str(sweep_dir)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "pruned" in shown.stdout and "param.model.optimizer.lr" in shown.stdout
    assert (sweep_dir / "sweep.png").stat().st_size > 10_000
