"""The Optuna sweeper plugin end to end, on a tiny Hydra app with a fake per-epoch loop.

The app reports its score every "epoch" to its trial (as the training callback does),
can fail on purpose, and records what it was given; sweeps run it as a real command
line (a subprocess) or in-process through Hydra.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from optuna.trial import TrialState

from cycleml.sweeps.results import load_sweep

APP = textwrap.dedent(
    '''
    """A toy objective with an epoch loop that reports to its sweep trial."""
    import json
    import math
    import os
    import time
    from pathlib import Path

    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from cycleml.sweeps.study import storage_url
    from cycleml.sweeps.trial_reporter import TrialReporter


    def task(cfg):
        hc = HydraConfig.get()
        out = Path(hc.runtime.output_dir)
        number = OmegaConf.select(cfg, "optuna_trial.number")
        record = {"run_id": f"run{number}", "wandb_id": f"wb{number}", "start": time.time()}
        if cfg.get("assigned") is not None:
            record["assigned"] = OmegaConf.to_container(cfg.assigned)
        if cfg.record_threads:
            import torch

            record["threads"] = torch.get_num_threads()
        reporter = None
        if number is not None:
            sweeper = hc.sweeper
            url = storage_url(sweeper.storage, hc.sweep.dir)
            reporter = TrialReporter(sweeper.study_name, url, number, instantiate(sweeper.pruner))
        if number in cfg.fail_trials:
            raise ValueError(f"trial {number} fails on purpose")
        value = 0.0
        try:
            for epoch in range(cfg.epochs):
                time.sleep(cfg.epoch_seconds)
                value = (1 - math.exp(-(epoch + 1))) * (4 - (cfg.x - 1) ** 2) + cfg.y
                if reporter is not None:
                    reporter.report(value, epoch)
        finally:
            record["end"] = time.time()
            (out / "run_info.json").write_text(json.dumps(record))
        return value


    @hydra.main(version_base="1.3", config_path=".", config_name="toy")
    def main(cfg):
        return task(cfg)


    if __name__ == "__main__":
        main()
    '''
)

CONFIG = textwrap.dedent(
    """
    defaults:
      - override hydra/sweeper: cycleml_optuna
      - _self_
    x: 0.0
    y: 1
    epochs: 4
    epoch_seconds: 0.0
    fail_trials: []
    record_threads: false
    hydra:
      sweep:
        dir: ${oc.env:TOY_SWEEP_DIR}
        subdir: trial_${optuna_trial.number}
      callbacks:
        trial_threads:
          _target_: cycleml.sweeps.resources.TrialThreads
      sweeper:
        study_name: toy
        metric: score
        direction: maximize
        n_trials: 8
        max_failure_rate: 0.5
        sampler: {_target_: optuna.samplers.TPESampler, seed: 0, n_startup_trials: 4}
        pruner: {_target_: optuna.pruners.MedianPruner, n_startup_trials: 2, n_warmup_steps: 0}
        params:
          x: interval(-2.0, 3.0)
          y: choice(0, 1, 2)
    """
)

# the same app under Hydra's basic sweeper (grid sweeps)
GRID_CONFIG = textwrap.dedent(
    """
    x: 0.0
    y: 1
    epochs: 2
    epoch_seconds: 0.0
    fail_trials: []
    record_threads: false
    hydra:
      sweep:
        dir: ${oc.env:TOY_SWEEP_DIR}
    """
)


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "toy_app.py").write_text(APP)
    (app_dir / "toy.yaml").write_text(CONFIG)
    (app_dir / "grid.yaml").write_text(GRID_CONFIG)
    return app_dir


def sweep_command(toy: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(toy / "toy_app.py"), "-m", *overrides]


def environment(sweep_dir: Path) -> dict[str, str]:
    return {**os.environ, "TOY_SWEEP_DIR": str(sweep_dir), "HYDRA_FULL_ERROR": "1"}


def run_sweep(toy: Path, sweep_dir: Path, *overrides: str, check: bool = True):
    result = subprocess.run(
        sweep_command(toy, *overrides),
        cwd=toy,
        env=environment(sweep_dir),
        capture_output=True,
        text=True,
        timeout=180,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"sweep failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def load_study(sweep_dir: Path, name: str = "toy") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")


def states(study: optuna.Study) -> list[TrialState]:
    return [t.state for t in study.get_trials(deepcopy=False)]


def test_sweep_prunes_records_results_and_returns_the_best_value(toy, tmp_path, monkeypatch):
    sweep_dir = tmp_path / "sweep"
    monkeypatch.setenv("TOY_SWEEP_DIR", str(sweep_dir))
    spec = importlib.util.spec_from_file_location("toy_app_inprocess", toy / "toy_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(toy), version_base="1.3"):
        returned = GlobalHydra.instance().hydra.multirun(
            config_name="toy", task_function=module.task, overrides=[]
        )
    GlobalHydra.instance().clear()
    # the sweep leaves no job's Hydra config behind in this process
    assert not HydraConfig.initialized()

    study = load_study(sweep_dir)
    found = states(study)
    assert len(found) == 8
    assert set(found) <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert found.count(TrialState.PRUNED) >= 1
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert all(len(t.intermediate_values) < 4 for t in pruned)

    assert returned == pytest.approx(study.best_value)
    best = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    assert best["best_trial"] == study.best_trial.number
    assert best["best_value"] == pytest.approx(study.best_value)
    assert best["metric"] == "score"
    assert best["overrides"] == [
        f"x={study.best_params['x']!r}",
        f"y={study.best_params['y']}",
    ]
    assert best["wandb_id"] == f"wb{study.best_trial.number}"

    table = load_sweep(sweep_dir)
    assert table is not None and len(table) == 8
    assert table.attrs["metric"] == "score"
    assert list(table.columns[:5]) == ["trial", "state", "score", "epochs", "duration_s"]
    assert {"param.x", "param.y", "wandb_id", "run_dir"} <= set(table.columns)
    assert table.iloc[0]["trial"] == study.best_trial.number
    assert sorted(table["wandb_id"]) == sorted(f"wb{n}" for n in range(8))
    assert (table["state"] == "pruned").sum() == found.count(TrialState.PRUNED)
    assert Path(table.iloc[0]["run_dir"]) == sweep_dir / f"trial_{study.best_trial.number}"


@pytest.mark.slow
def test_killed_sweep_resumes_in_the_same_study_and_reruns_the_interrupted_trial(toy, tmp_path):
    sweep_dir = tmp_path / "sweep"
    overrides = ("epoch_seconds=0.5", "hydra.sweeper.n_trials=5")
    proc = subprocess.Popen(
        sweep_command(toy, *overrides),
        cwd=toy,
        env=environment(sweep_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 90
    try:
        while time.time() < deadline:
            time.sleep(0.1)
            assert proc.poll() is None, "the sweep ended before it could be interrupted"
            if not (sweep_dir / "optuna.db").exists():
                continue
            try:
                found = states(load_study(sweep_dir))
            except Exception:  # the study is being created
                continue
            finished = [s for s in found if s in (TrialState.COMPLETE, TrialState.PRUNED)]
            if len(finished) >= 2 and TrialState.RUNNING in found:
                break
        else:
            pytest.fail("the sweep did not reach 2 finished trials in time")
    finally:
        proc.kill()
        proc.wait(timeout=30)

    before = load_study(sweep_dir).trials
    interrupted = [t for t in before if t.state == TrialState.RUNNING]
    assert len(interrupted) == 1
    kept = {t.number: t.value for t in before if t.state == TrialState.COMPLETE}

    run_sweep(toy, sweep_dir, *overrides)

    after = load_study(sweep_dir)
    assert len(optuna.get_all_study_summaries(f"sqlite:///{sweep_dir / 'optuna.db'}")) == 1
    done = [t for t in after.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == 5
    lost = after.trials[interrupted[0].number]
    assert lost.state == TrialState.FAIL and lost.user_attrs["interrupted"] is True
    rerun = [t for t in after.trials if t.user_attrs.get("rerun_of") == lost.number]
    assert len(rerun) == 1 and rerun[0].params == interrupted[0].params
    for number, value in kept.items():
        assert after.trials[number].value == value
    table = pd.read_csv(sweep_dir / "leaderboard.csv")
    assert (table["state"] == "interrupted").sum() == 1
    assert table["state"].isin(["complete", "pruned"]).sum() == 5
    # resuming does not replay the seeded sampler's first draws
    first_draws = [t.params for t in after.trials[:2]]
    later = [t.params for t in after.trials[len(before) :] if "rerun_of" not in t.user_attrs]
    assert later and all(p not in first_draws for p in later)


def test_failed_trial_is_recorded_and_the_sweep_goes_on(toy, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_sweep(toy, sweep_dir, "fail_trials=[1]", "hydra.sweeper.n_trials=5")
    study = load_study(sweep_dir)
    assert states(study)[1] == TrialState.FAIL
    assert "trial 1 fails on purpose" in study.trials[1].user_attrs["error"]
    assert len(study.trials) == 5
    assert all(s != TrialState.FAIL for s in states(study)[2:])
    table = load_sweep(sweep_dir)
    failed = table[table["state"] == "failed"]
    assert list(failed["trial"]) == [1]
    assert failed.iloc[0]["error"].startswith("ValueError: trial 1 fails on purpose")
    assert "trial 1 failed" in result.stderr + result.stdout


def test_too_many_failures_stop_the_sweep_with_a_clear_error(toy, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_sweep(
        toy,
        sweep_dir,
        "fail_trials=[0,1,2]",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.max_failure_rate=0.25",
        check=False,
    )
    assert result.returncode != 0
    assert "2 of 4 trials failed, more than max_failure_rate=0.25" in result.stderr
    assert states(load_study(sweep_dir)) == [TrialState.FAIL, TrialState.FAIL]
    # once the cause is fixed, the same sweep goes on: earlier failures stay recorded
    # and count towards n_trials, but not again towards max_failure_rate
    run_sweep(toy, sweep_dir, "hydra.sweeper.n_trials=4", "hydra.sweeper.max_failure_rate=0.25")
    assert states(load_study(sweep_dir)) == [TrialState.FAIL] * 2 + [TrialState.COMPLETE] * 2


@pytest.mark.slow
def test_parallel_trials_run_at_once_with_their_own_devices_and_threads(toy, tmp_path):
    sweep_dir = tmp_path / "sweep"
    run_sweep(
        toy,
        sweep_dir,
        "epoch_seconds=0.3",
        "record_threads=true",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.devices=[a,b,c,d]",
        "hydra.sweeper.devices_key=assigned",
        "hydra.sweeper.cpu_threads=1",
    )
    records = [
        json.loads((sweep_dir / f"trial_{n}" / "run_info.json").read_text()) for n in range(4)
    ]
    for first, second in ((0, 1), (2, 3)):
        a, b = records[first], records[second]
        assert sorted([a["assigned"], b["assigned"]]) == [["a", "b"], ["c", "d"]]
        # the two trials of a batch overlap in time: they ran in parallel
        assert a["start"] < b["end"] and b["start"] < a["end"]
    assert {r["threads"] for r in records} == {1}
    assert len(load_study(sweep_dir).trials) == 4


def test_storage_url_from_config_keeps_the_study_elsewhere(toy, tmp_path):
    sweep_dir = tmp_path / "sweep"
    database = tmp_path / "studies" / "all.db"
    url = f"sqlite:///{database}"
    run_sweep(toy, sweep_dir, f"hydra.sweeper.storage='{url}'", "hydra.sweeper.n_trials=3")
    assert database.is_file()
    assert not (sweep_dir / "optuna.db").exists()
    study = optuna.load_study(study_name="toy", storage=url)
    assert len(study.trials) == 3
    info = yaml.safe_load((sweep_dir / "sweep.yaml").read_text())
    assert info["storage"] == url and info["n_trials"] == 3


@pytest.mark.postgres
@pytest.mark.skipif(
    not os.environ.get("CYCLEML_TEST_POSTGRES_URL"), reason="CYCLEML_TEST_POSTGRES_URL not set"
)
def test_study_in_postgresql(toy, tmp_path):
    url = os.environ["CYCLEML_TEST_POSTGRES_URL"]
    name = f"toy_{os.getpid()}_{int(time.time())}"
    try:
        run_sweep(
            toy,
            tmp_path / "sweep",
            f"hydra.sweeper.storage='{url}'",
            f"hydra.sweeper.study_name={name}",
            "hydra.sweeper.n_trials=3",
        )
        run_sweep(
            toy,
            tmp_path / "sweep",
            f"hydra.sweeper.storage='{url}'",
            f"hydra.sweeper.study_name={name}",
            "hydra.sweeper.n_trials=5",
        )
        study = optuna.load_study(study_name=name, storage=url)
        assert len(study.trials) == 5
    finally:
        optuna.delete_study(study_name=name, storage=url)


def test_grid_sweeps_with_the_basic_sweeper_keep_working(toy, tmp_path):
    sweep_dir = tmp_path / "grid"
    run_sweep(
        toy,
        sweep_dir,
        "--config-name=grid",
        "x=1.0,2.0",
        "y=3,4",
    )
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    overrides = [yaml.safe_load((p / ".hydra" / "overrides.yaml").read_text()) for p in jobs]
    assert overrides == [
        ["x=1.0", "y=3"],
        ["x=1.0", "y=4"],
        ["x=2.0", "y=3"],
        ["x=2.0", "y=4"],
    ]
    assert not (sweep_dir / "optuna.db").exists()
