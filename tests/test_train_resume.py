"""Interrupting and resuming training runs: which run, which config, what history is kept."""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from cycleml.errors import ConfigError
from cycleml.training.summary import write_summary
from cycleml.training.train import train


class CtrlCInSecondEpoch(L.Callback):
    """Raises KeyboardInterrupt, as Ctrl-C does, at the second batch of the second epoch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 1 and batch_idx == 1:
            raise KeyboardInterrupt


@pytest.fixture(autouse=True)
def keep_sigint_handler() -> Iterator[None]:
    """Lightning ignores SIGINT once it handled one; give pytest its Ctrl-C back."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


def _interrupted(make_cfg, run_dir: Path, *overrides: str) -> Path:
    """A run of 2 × 3 steps stopped by Ctrl-C at step 4, in ``run_dir``."""
    cfg = make_cfg("train", "trainer.max_epochs=2", *overrides)
    with open_dict(cfg):
        cfg.callbacks.ctrl_c = {"_target_": f"{__name__}.CtrlCInSecondEpoch"}
        cfg.callbacks.early_stopping = None
    cfg.paths.output_dir = str(run_dir)
    with pytest.raises(SystemExit) as stopped:
        train(cfg)
    assert stopped.value.code == 130
    return run_dir


def _last_step(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]


def _resume(make_cfg, ckpt_path: str | Path, output_dir: Path, *overrides: str) -> dict:
    cfg = make_cfg("train", "trainer.max_epochs=2", f"ckpt_path={ckpt_path}", *overrides)
    cfg.paths.output_dir = str(output_dir)  # the folder Hydra made for this launch
    return train(cfg)


def test_ctrl_c_saves_last_checkpoint_and_says_how_to_resume(make_cfg, tmp_path, caplog):
    run_dir = _interrupted(make_cfg, tmp_path / "run")
    assert _last_step(run_dir) == 4  # the step Ctrl-C stopped at, not the epoch's end (3)
    assert not (run_dir / "summary.json").exists()
    assert f"resume with: cycleml train ckpt_path={run_dir}" in caplog.text


def test_resume_from_run_dir_continues_global_step(make_cfg, tmp_path):
    run_dir = _interrupted(make_cfg, tmp_path / "run")
    first_id = json.loads((run_dir / "run_info.json").read_text())["run_id"]
    _resume(make_cfg, run_dir, tmp_path / "second")
    # continued in the interrupted run's folder, from its step, with its id
    assert _last_step(run_dir) == 6
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 6
    assert summary["run_id"] == first_id
    assert {"train/loss", "val/acc", "test/acc"} <= set(summary["metrics"])


def test_last_is_the_newest_unfinished_run_and_finished_runs_stay_as_they_are(
    make_cfg, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="cycleml")
    runs = tmp_path / "logs" / "train" / "runs"
    older = _interrupted(make_cfg, runs / "a")
    finished = runs / "b"
    cfg = make_cfg("train", "trainer.max_epochs=2")
    cfg.paths.output_dir = str(finished)
    train(cfg)
    before = (finished / "summary.json").read_text()

    _resume(make_cfg, "last", runs / "c")
    assert _last_step(older) == 6
    assert f"ckpt_path=last: resuming {older}" in caplog.text
    assert (finished / "summary.json").read_text() == before
    assert not (runs / "c" / "checkpoints").exists()

    # every run has finished now
    with pytest.raises(ConfigError, match="no unfinished run"):
        _resume(make_cfg, "last", runs / "d")
    with pytest.raises(ConfigError, match="has finished"):
        _resume(make_cfg, finished, runs / "d")
    assert (finished / "summary.json").read_text() == before


def test_checkpoint_file_of_a_finished_run_starts_a_new_run(make_cfg, tmp_path):
    finished = tmp_path / "logs" / "train" / "runs" / "a"
    cfg = make_cfg("train", "trainer.max_epochs=1")
    cfg.paths.output_dir = str(finished)
    train(cfg)
    before = (finished / "summary.json").read_text()
    new_run = tmp_path / "logs" / "train" / "runs" / "b"
    _resume(make_cfg, finished / "checkpoints" / "last.ckpt", new_run)
    assert (finished / "summary.json").read_text() == before
    assert _last_step(new_run) == 6  # went on from step 3 of the finished run
    first = json.loads((finished / "run_info.json").read_text())["run_id"]
    assert json.loads((new_run / "run_info.json").read_text())["run_id"] != first


def test_summary_only_grows(tmp_path, make_cfg):
    cfg = make_cfg("train")
    write_summary(tmp_path, cfg, "f" * 16, {"train/loss": 0.5, "val/acc": 0.9})
    write_summary(tmp_path, cfg, "f" * 16, {"test/acc": 0.8, "val/acc": 0.95})
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["metrics"] == {"test/acc": 0.8, "train/loss": 0.5, "val/acc": 0.95}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left
