"""Interrupting and resuming training runs: which run, which config, what history is kept."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
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


class SigintAtStep4(L.Callback):
    """Sends this thread a real SIGINT as the fifth batch starts. To the thread, not the
    process: a signal sent to the process may reach another of its threads first and
    be seen by the main thread only batches later (seen in long test runs), while this
    tests what happens from the moment it is seen."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 4:
            signal.raise_signal(signal.SIGINT)


@pytest.fixture(autouse=True)
def keep_sigint_handler() -> Iterator[None]:
    """Lightning ignores SIGINT once it handled one; give pytest its Ctrl-C back."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


def _interrupted(make_cfg, run_dir: Path, *overrides: str, by: str = "CtrlCInSecondEpoch") -> Path:
    """A run of 2 × 3 steps stopped by Ctrl-C at step 4, in ``run_dir``."""
    cfg = make_cfg("train", "trainer.max_epochs=2", *overrides)
    with open_dict(cfg):
        cfg.callbacks.ctrl_c = {"_target_": f"{__name__}.{by}"}
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


def test_sigint_stops_at_the_next_batch_boundary(make_cfg, tmp_path):
    # the signal only asks to stop: the batch under way finishes, then the state is saved
    before = signal.getsignal(signal.SIGINT)
    run_dir = _interrupted(make_cfg, tmp_path / "run", by="SigintAtStep4")
    assert _last_step(run_dir) == 5
    assert signal.getsignal(signal.SIGINT) is before  # handler given back


def test_sigint_stops_the_run_whatever_python_handler_was_set_before(make_cfg, tmp_path):
    # a host program's own handler: the run takes Ctrl-C over while it trains, then gives
    # the handler back
    def host_handler(signum, frame):
        raise AssertionError("the run should have taken SIGINT over")

    signal.signal(signal.SIGINT, host_handler)
    run_dir = _interrupted(make_cfg, tmp_path / "run", by="SigintAtStep4")
    assert _last_step(run_dir) == 5
    assert signal.getsignal(signal.SIGINT) is host_handler


def test_an_ignored_sigint_stays_ignored(make_cfg, tmp_path):
    # started with SIGINT ignored (nohup, `&`): the signal neither stops nor saves the run
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cfg = make_cfg("train", "trainer.max_epochs=2")
    with open_dict(cfg):
        cfg.callbacks.ctrl_c = {"_target_": f"{__name__}.SigintAtStep4"}
        cfg.callbacks.early_stopping = None
    cfg.paths.output_dir = str(tmp_path / "run")
    train(cfg)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["global_step"] == 6
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_a_handler_set_outside_python_is_left_alone(monkeypatch, tmp_path):
    # getsignal gives None for a handler a host program set in C: it could not be put
    # back after the run, so the run does not take SIGINT over
    from cycleml.training.interrupt import CheckpointOnInterrupt

    real_getsignal = signal.getsignal
    before = real_getsignal(signal.SIGINT)
    monkeypatch.setattr(signal, "getsignal", lambda signum: None)
    callback = CheckpointOnInterrupt(str(tmp_path))
    callback.on_train_start(None, None)  # type: ignore[arg-type]
    assert real_getsignal(signal.SIGINT) is before


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


def _wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline ``run-<id>.wandb`` file.

    The file is W&B's header (":W&B", magic, version) followed by a LevelDB-style log of
    ``Record`` protobufs: 32 KiB blocks of chunks (crc32, length, type: full/first/middle/last).
    """
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, offset, pending, rows = 32768, 7, b"", []
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a header is padding
            offset += block - offset % block
            continue
        length = int.from_bytes(data[offset + 4 : offset + 6], "little")
        kind = data[offset + 6]
        chunk = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or ".".join(i.nested_key): json.loads(i.value_json)
                             for i in record.history.item})  # fmt: skip
    return rows


def test_resume_keeps_csv_rows_and_continues_the_wandb_step(make_cfg, tmp_path):
    pytest.importorskip("wandb")
    run_dir = _interrupted(make_cfg, tmp_path / "run", "logger=many")
    _resume(make_cfg, run_dir, tmp_path / "second", "logger=many")

    with (run_dir / "csv" / "metrics.csv").open() as file:
        rows = list(csv.DictReader(file))
    val_epochs = [int(r["epoch"]) for r in rows if r.get("val/acc")]
    assert val_epochs == [0, 1]  # epoch 0 logged before Ctrl-C, epoch 1 after the resume
    assert any(r.get("test/acc") for r in rows)

    run_id = json.loads((run_dir / "run_info.json").read_text())["wandb_id"]
    first, second = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}*"))
    steps = [[row["_step"] for row in _wandb_history(next(run.glob("run-*.wandb")))]
             for run in (first, second)]  # fmt: skip
    assert steps[0] and steps[1]
    # the resumed launch goes on from the checkpoint's step instead of starting at 0 again
    assert max(steps[0]) <= 4 <= min(steps[1])
    assert steps[0] == sorted(steps[0]) and steps[1] == sorted(steps[1])


def _cycleml(*args: str) -> list[str]:
    return [sys.executable, "-m", "cycleml", *args]


def _signal_after_first_checkpoint(
    cwd: Path, signum: signal.Signals, *overrides: str
) -> tuple[int, str]:
    """Start `cycleml train` in ``cwd``, send it ``signum`` once it saved last.ckpt."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    output = cwd / "first_launch.out"  # a file, so that a full pipe never blocks the run
    with output.open("w") as out:
        process = subprocess.Popen(
            _cycleml("train", *overrides), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        runs = cwd / "logs" / "train" / "runs"
        deadline = time.time() + 240
        while time.time() < deadline and not list(runs.glob("*/checkpoints/last.ckpt")):
            time.sleep(0.1)
        process.send_signal(signum)
        process.wait(timeout=120)
    return process.returncode, output.read_text()


@pytest.mark.slow
def test_sigint_then_ckpt_path_last_alone_resumes_the_run(tmp_path):
    """A real `cycleml train model=resnet18 data.channels=3 …` stopped by SIGINT, resumed by
    `cycleml train ckpt_path=last` without repeating its command line."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    returncode, output = _signal_after_first_checkpoint(
        tmp_path, signal.SIGINT,
        "model=resnet18", "data.channels=3", "data.image_size=16", "logger=csv",
        "trainer.max_epochs=3", "trainer.limit_train_batches=6", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "callbacks.early_stopping=null", "torch_threads=1",
    )  # fmt: skip
    assert returncode == 130, output[-3000:]
    runs = tmp_path / "logs" / "train" / "runs"
    (run_dir,) = runs.iterdir()
    assert f"resume with: cycleml train ckpt_path={run_dir}" in output
    assert 6 <= _last_step(run_dir) < 18 and not (run_dir / "summary.json").exists()

    refused = subprocess.run(
        _cycleml("train", "ckpt_path=last", "data.image_size=32", "trainer.max_epochs=3"),
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr[-3000:]
    (message,) = refused.stderr.strip().splitlines()
    assert "data.image_size=32" in message and "max_epochs" not in message

    resumed = subprocess.run(
        _cycleml("train", "ckpt_path=last"),
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"ckpt_path=last: resuming {run_dir}" in resumed.stdout
    assert list(runs.iterdir()) == [run_dir]  # no stub folder from the resume
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 3 * 6
    assert summary["config"]["data"]["channels"] == 3 and summary["model"] == "resnet18"
    with (run_dir / "csv" / "metrics.csv").open() as file:
        val_epochs = [int(r["epoch"]) for r in csv.DictReader(file) if r.get("val/acc")]
    assert val_epochs == [0, 1, 2]
    log = (run_dir / "train.log").read_text()
    assert "ckpt_path=last: resuming" in log  # the resume's log continues in the run's log


@pytest.mark.slow
def test_killed_training_resumes_and_keeps_its_csv_rows(tmp_path):
    """SIGKILL a real `cycleml train` after its first checkpoint; `ckpt_path=last` finishes it
    and metrics.csv still holds the epochs from before the kill."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    _signal_after_first_checkpoint(
        tmp_path, signal.SIGKILL,
        "logger=csv", "trainer.max_epochs=4", "callbacks.early_stopping=null",
        "callbacks.progress_bar=null",
    )  # fmt: skip
    (run_dir,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    killed_at = _last_step(run_dir)
    assert 0 < killed_at < 4 * 20 and not (run_dir / "summary.json").exists()

    resumed = subprocess.run(
        _cycleml("train", "ckpt_path=last"),
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 4 * 20  # 20 batches of 64 per epoch on digits
    assert summary["metrics"]["test/acc"] > 0.9
    with (run_dir / "csv" / "metrics.csv").open() as file:
        val_epochs = [int(r["epoch"]) for r in csv.DictReader(file) if r.get("val/acc")]
    assert val_epochs == [0, 1, 2, 3]


def _saved_run(make_cfg, tmp_path: Path, *overrides: str) -> Path:
    """A run folder whose .hydra/config.yaml holds the config composed from ``overrides``."""
    from omegaconf import OmegaConf

    run_dir = tmp_path / "saved"
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(make_cfg("train", *overrides, fast=False), run_dir / ".hydra" / "config.yaml")
    return run_dir


def test_resume_config_is_the_runs_own_with_overrides_on_top(make_cfg, tmp_path):
    from cycleml.training.resume_config import config_for_resume

    run_dir = _saved_run(make_cfg, tmp_path, "model=resnet18", "data.channels=3")
    given = ["ckpt_path=last", "trainer.max_epochs=7", "logger=csv", "data.batch_size=32",
             "model=resnet18"]  # fmt: skip
    now = make_cfg("train", *given, fast=False)
    cfg = config_for_resume(now, run_dir, given, {"model": "resnet18", "logger": "csv"})
    assert cfg.model.net.name == "resnet18" and cfg.data.channels == 3  # from the run
    assert cfg.trainer.max_epochs == 7 and cfg.data.batch_size == 32  # given now
    assert "csv" in cfg.logger and "wandb" not in cfg.logger
    assert cfg.ckpt_path == "last" and cfg.paths == now.paths


@pytest.mark.parametrize(
    "override",
    ["data.image_size=32", "model=cnn", "++model.net.width=64", "data.split_seed=3",
     "experiment=digits", "model.optimizer.lr=0.5"],
)  # fmt: skip
def test_resume_refuses_to_change_model_or_data_shape(make_cfg, tmp_path, override):
    from cycleml.training.resume_config import config_for_resume

    run_dir = _saved_run(make_cfg, tmp_path, "model=resnet18", "data.channels=3")
    given = ["ckpt_path=last", "trainer.max_epochs=7", override]
    choices = {"model": "resnet18", "experiment": None}
    if override.startswith(("model=", "experiment=")):
        group, choice = override.split("=")
        choices[group] = choice
    now = make_cfg("train", *given, fast=False)
    with pytest.raises(ConfigError, match="cannot change") as refused:
        config_for_resume(now, run_dir, given, choices)
    assert override in str(refused.value) and "max_epochs" not in str(refused.value)


def test_resume_may_change_how_data_is_loaded(make_cfg, tmp_path):
    from cycleml.training.resume_config import config_for_resume

    run_dir = _saved_run(make_cfg, tmp_path)
    given = ["ckpt_path=last", "data.num_workers=0", "data.eval_batch_size=64"]
    now = make_cfg("train", *given, fast=False)
    cfg = config_for_resume(now, run_dir, given, {})
    assert cfg.data.eval_batch_size == 64 and cfg.data.num_workers == 0


@pytest.mark.parametrize("content", ["text", "plain dict", "code"])
def test_resume_from_a_file_that_is_no_training_checkpoint_is_refused(tmp_path, content):
    from cycleml.training.run import resolve_resume

    path = tmp_path / "other.ckpt"
    if content == "text":
        path.write_text("not a checkpoint")
    elif content == "plain dict":
        torch.save({"weights": torch.zeros(2)}, path)
    else:
        torch.save({"state_dict": {}, "pytorch-lightning_version": "2", "x": Path("/")}, path)
    with pytest.raises(ConfigError, match="other.ckpt") as refused:
        resolve_resume(str(path), tmp_path / "runs", tmp_path / "now")
    expected = {
        "text": "not a readable",
        "plain dict": "not a training checkpoint",
        "code": "refused",
    }
    assert expected[content] in str(refused.value)
