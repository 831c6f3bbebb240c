"""What `cycleml train` prints: little on the console, one line per epoch in train.log."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TINY = [
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "torch_threads=1",
]


def _train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["WANDB_MODE"] = "offline"  # as W&B's own default offline config would, no silencing
    result = subprocess.run(
        [sys.executable, "-m", "cycleml", "train", *TINY, *overrides],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_default_run_is_quiet_and_logs_each_epoch(tmp_path):
    result = _train(tmp_path)  # the default W&B logger and callbacks
    stderr = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(stderr) <= 3, result.stderr
    console = result.stdout + result.stderr
    for noise in ("wandb:", "litlogger", "deprecated", "GPU available", "Test metric"):
        assert noise not in console, noise
    (run_dir,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    assert f"run {run_dir} finished: val/acc " in result.stdout

    log = (run_dir / "train.log").read_text()
    epochs = re.findall(
        r"epoch (\d)/2: train/loss [\d.]+, val/loss [\d.]+, val/acc [\d.]+ \([\d.]+ s\)", log
    )
    assert epochs == ["1", "2"], log
    assert "GPU available" in log  # the log file keeps everything


@pytest.mark.slow
def test_verbose_shows_everything_once(tmp_path):
    result = _train(tmp_path, "verbose=true")
    console = result.stdout + result.stderr
    assert console.count("GPU available") == 1  # not twice (Lightning's handler and Hydra's)
    assert "wandb:" in result.stderr and "Test metric" in result.stdout
