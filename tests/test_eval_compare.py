"""`cycleml eval` writes its reports; `cycleml compare` ranks runs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from cycleml.errors import ConfigError, DataError
from cycleml.training.compare import run_compare
from cycleml.training.evaluate import evaluate, worst_errors
from cycleml.training.train import train


@pytest.fixture
def trained_run(make_cfg, tmp_path):
    train(make_cfg("train", "trainer.limit_train_batches=5"))
    return tmp_path / "run"


def test_eval_writes_metrics_report_and_plots(make_cfg, trained_run, tmp_path):
    cfg = make_cfg("eval", f"ckpt_path={trained_run}", "num_errors=16")
    cfg.paths.output_dir = str(tmp_path / "eval")
    metrics = evaluate(cfg)
    out = tmp_path / "eval"
    written = json.loads((out / "metrics.json").read_text())
    assert written["metrics"] == pytest.approx(metrics)
    assert 0 < metrics["test/acc"] <= 1
    summary = json.loads((trained_run / "summary.json").read_text())
    # the same checkpoint on the same split gives the same accuracy as training's test
    assert metrics["test/acc"] == pytest.approx(summary["metrics"]["test/acc"], abs=1e-6)
    rows = list(csv.DictReader((out / "per_class_report.csv").open()))
    assert [r["class"] for r in rows] == [str(i) for i in range(10)]
    from cycleml.training.train import build_datamodule

    test_size = len(build_datamodule(make_cfg("train")).split_ids("test"))
    assert sum(int(r["support"]) for r in rows) == test_size
    for name in ("confusion_matrix.png", "worst_errors.png"):
        with Image.open(out / name) as image:
            assert image.size[0] > 100


def test_eval_of_missing_checkpoint_names_it(make_cfg, tmp_path):
    from cycleml.errors import ConfigError

    with pytest.raises(ConfigError, match="nope.ckpt"):
        evaluate(make_cfg("eval", f"ckpt_path={tmp_path}/nope.ckpt"))


def test_worst_errors_orders_confident_mistakes_first():
    y_true = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    order, pred, conf = worst_errors(y_true, probs, limit=5)
    assert order.tolist() == [1, 3]
    assert pred.tolist() == [0, 1]
    assert conf.tolist() == pytest.approx([0.8, 0.6])


def _summary(folder, run_id, acc):
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(
        json.dumps(
            {
                "run_id": run_id,
                "model": "SmallCNN",
                "data": "DigitsDataModule",
                "dataset_fingerprint": "abc",
                "metrics": {"test/acc": acc, "val/acc": acc - 0.01, "train/loss_step": 1.0},
            }
        )
    )


def test_compare_sorts_and_writes_csv(tmp_path, capsys):
    _summary(tmp_path / "a", "run-a", 0.91)
    _summary(tmp_path / "b", "run-b", 0.97)
    _summary(tmp_path / "nested" / "c", "run-c", 0.95)
    run_compare(tmp_path)
    printed = capsys.readouterr().out
    assert printed.index("run-b") < printed.index("run-c") < printed.index("run-a")
    rows = list(csv.DictReader((tmp_path / "leaderboard.csv").open()))
    assert [r["run_id"] for r in rows] == ["run-b", "run-c", "run-a"]
    assert "train/loss_step" not in rows[0]
    run_compare(tmp_path, sort="val/acc", ascending=True, out=tmp_path / "x.csv")
    rows = list(csv.DictReader((tmp_path / "x.csv").open()))
    assert [r["run_id"] for r in rows] == ["run-a", "run-c", "run-b"]


def test_compare_explains_empty_folder_and_unknown_metric(tmp_path):
    with pytest.raises(DataError, match="no runs"):
        run_compare(tmp_path)
    _summary(tmp_path / "a", "run-a", 0.9)
    with pytest.raises(ConfigError, match="cannot sort by 'test/nope'"):
        run_compare(tmp_path, sort="test/nope")


def test_compare_is_a_hydra_app_that_keeps_its_plain_form(tmp_path):
    """`cycleml compare logs/train --sort … --metrics …` and `folder=… sort=…` are the
    same run; `--cfg job` shows the config; a user error is one line, exit 2."""
    import subprocess
    import sys

    _summary(tmp_path / "logs" / "a", "run-a", 0.91)
    _summary(tmp_path / "logs" / "b", "run-b", 0.97)

    def cycleml(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "cycleml.cli", "compare", *args]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)

    plain = cycleml("logs", "--sort", "val/acc", "--ascending", "--metrics", "val/acc,test/acc")
    assert plain.returncode == 0, plain.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "logs" / "leaderboard.csv").open()))
    assert [r["run_id"] for r in rows] == ["run-a", "run-b"]
    assert [c for c in rows[0] if "/" in c] == ["val/acc", "test/acc"]
    hydra_form = cycleml("folder=logs", "sort=test/acc", "out=board.csv")
    assert hydra_form.returncode == 0, hydra_form.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "board.csv").open()))
    assert [r["run_id"] for r in rows] == ["run-b", "run-a"]
    assert list((tmp_path / "logs" / "compare" / "runs").iterdir())  # a Hydra run folder
    shown = cycleml("logs", "--cfg", "job")
    assert shown.returncode == 0 and "folder: logs" in shown.stdout
    bad = cycleml("logs", "--sort", "test/nope")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "cycleml compare: error: cannot sort by 'test/nope'" in bad.stderr
