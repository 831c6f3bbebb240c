"""Image training end to end: every model on every image source, summary, resume, tracking."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from cycleml.training.train import train


@pytest.mark.parametrize(
    ("model", "extra"),
    [
        ("cnn", []),
        ("resnet18", ["data.channels=3", "data.image_size=32"]),
    ],
)
@pytest.mark.parametrize("data", ["digits", "image_folder"])
def test_fast_dev_run_each_model_and_source(make_cfg, demo_images, model, extra, data):
    overrides = [f"model={model}", f"data={data}", "debug=fdr", *extra]
    if data == "image_folder":
        overrides.append(f"data.path={demo_images}")
    cfg = make_cfg("train", *overrides, fast=False)
    metrics = train(cfg)
    # one step of an untrained network over the data's classes: its test loss is that of
    # a uniform guess, ln(classes) (a wrong class count, NaN or mislabelled batch is not)
    uniform = math.log(10 if data == "digits" else 4)
    assert abs(metrics["test/loss"] - uniform) < 0.25, metrics
    assert abs(metrics["train/loss"] - uniform) < 0.75, metrics


def test_timm_backbone_fast_dev_run(make_cfg):
    pytest.importorskip("timm", reason="timm is optional (pip install timm)")
    cfg = make_cfg("train", "model=timm", "model.net.name=resnet10t", "debug=fdr", fast=False)
    metrics = train(cfg)
    assert abs(metrics["test/loss"] - math.log(10)) < 0.25, metrics  # a uniform guess


@pytest.mark.parametrize(
    ("trainer", "expected"),
    [("cpu", ("cpu", 1, None)), ("gpu", ("gpu", 1, None)), ("ddp", ("gpu", -1, "ddp")),
     ("ddp_sim", ("cpu", 2, "ddp"))],
)  # fmt: skip
def test_trainer_configs_compose(make_cfg, trainer, expected):
    cfg = make_cfg("train", f"trainer={trainer}")
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.get("strategy")) == expected
    if trainer in ("gpu", "ddp"):
        assert cfg.trainer.precision == "bf16-mixed"


def test_summary_records_run(make_cfg, tmp_path):
    metrics = train(make_cfg("train"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["metrics"]["test/acc"] == pytest.approx(metrics["test/acc"])
    assert {"val/acc", "val/f1", "test/precision", "test/recall"} <= set(summary["metrics"])
    assert len(summary["dataset_fingerprint"]) == 16
    assert summary["packages"]["torch"] == torch.__version__.split("+")[0] or summary["packages"][
        "torch"
    ].startswith(torch.__version__.split("+")[0])
    assert summary["config"]["model"]["optimizer"]["lr"] == 0.003
    assert Path(summary["best_checkpoint"]).is_file()
    assert summary["global_step"] == 3
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert summary["run_id"] == info["run_id"]


def test_fingerprint_depends_on_data_not_order(make_cfg):
    from cycleml.training.train import build_datamodule

    first = build_datamodule(make_cfg("train"))
    again = build_datamodule(make_cfg("train"))
    resized = build_datamodule(make_cfg("train", "data.image_size=12"))
    assert first.fingerprint == again.fingerprint
    assert first.fingerprint != resized.fingerprint


class StopAfterFirstEpoch(L.Callback):
    """Ends fit after one epoch, as an interruption would (checkpoints already written)."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.should_stop = True


def _interrupted_run(make_cfg, *overrides: str):
    cfg = make_cfg("train", "trainer.max_epochs=2", "test=false", *overrides)
    with open_dict(cfg):
        cfg.callbacks.stop = {"_target_": f"{__name__}.StopAfterFirstEpoch"}
        cfg.callbacks.early_stopping = None
    return cfg


def _last_step(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]


def test_resume_from_run_dir_continues_global_step(make_cfg, tmp_path):
    run_dir = tmp_path / "run"
    train(_interrupted_run(make_cfg))
    assert _last_step(run_dir) == 3
    first_id = json.loads((run_dir / "run_info.json").read_text())["run_id"]

    cfg = make_cfg("train", "trainer.max_epochs=2", f"ckpt_path={run_dir}")
    cfg.paths.output_dir = str(tmp_path / "second")  # a new Hydra run folder
    train(cfg)
    # continued in the interrupted run's folder, from its step, with its id
    assert _last_step(run_dir) == 6
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 6
    assert summary["run_id"] == first_id


def test_resume_last_picks_newest_run(make_cfg, tmp_path):
    cfg = _interrupted_run(make_cfg)
    cfg.paths.output_dir = str(tmp_path / "logs" / "train" / "runs" / "a")
    train(cfg)
    cfg = make_cfg("train", "trainer.max_epochs=2", "test=false", "ckpt_path=last")
    cfg.paths.output_dir = str(tmp_path / "logs" / "train" / "runs" / "b")
    train(cfg)
    assert _last_step(tmp_path / "logs" / "train" / "runs" / "a") == 6
    assert not (tmp_path / "logs" / "train" / "runs" / "b" / "checkpoints").exists()


def test_wandb_offline_run_and_resume_keep_the_same_id(make_cfg, tmp_path):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    train(_interrupted_run(make_cfg, "logger=wandb"))
    run_id = json.loads((run_dir / "run_info.json").read_text())["wandb_id"]
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert offline, list((run_dir / "wandb").iterdir())
    assert list(offline[0].glob("run-*.wandb"))
    cfg = make_cfg("train", "logger=wandb", "trainer.max_epochs=2", f"ckpt_path={run_dir}")
    train(cfg)
    # one offline run folder per launch, both with the run's id (W&B adds "-1" to the
    # second folder's name when both launches started within the same second)
    runs = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}*"))
    assert len(runs) == 2, runs
    assert all(list(run.glob(f"run-{run_id}.wandb")) for run in runs)
    assert json.loads((run_dir / "summary.json").read_text())["wandb_id"] == run_id


def test_csv_and_many_loggers_write_metrics(make_cfg, tmp_path):
    train(make_cfg("train", "logger=many", "test=false"))
    metrics_csv = (tmp_path / "run" / "csv" / "metrics.csv").read_text()
    assert "val/acc" in metrics_csv.splitlines()[0]
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_augmentation_is_reproducible_and_train_only(make_cfg):
    from cycleml.training.train import build_datamodule

    dm = build_datamodule(make_cfg("train"))
    a = dm.train_dataloader().dataset
    b = build_datamodule(make_cfg("train")).train_dataloader().dataset
    assert torch.equal(a[5][0], b[5][0])
    a.set_epoch(1)
    assert not torch.equal(a[5][0], b[5][0])
    val = dm.val_dataloader().dataset
    assert torch.equal(val[3][0], val[3][0]) and val.transform is None
    no_aug = build_datamodule(make_cfg("train", "augment=none")).train_dataloader().dataset
    assert no_aug.transform is None


def test_splits_are_disjoint_stratified_and_reproducible(make_cfg):
    from cycleml.training.train import build_datamodule

    dm = build_datamodule(make_cfg("train"))
    ids = {s: set(dm.split_ids(s)) for s in ("train", "val", "test")}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"]
    assert sum(len(v) for v in ids.values()) == 1797
    _, test_labels = dm.split_arrays("test")
    assert set(test_labels.tolist()) == set(range(10))
    other = build_datamodule(make_cfg("train", "data.split_seed=1"))
    assert set(other.split_ids("test")) != ids["test"]
    assert set(build_datamodule(make_cfg("train")).split_ids("test")) == ids["test"]


@pytest.mark.slow
def test_killed_training_resumes_with_ckpt_path_last(tmp_path):
    """SIGKILL a real `cycleml train` after its first checkpoint; `ckpt_path=last` finishes it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "WANDB_MODE": "offline"}
    args = [
        sys.executable,
        "-m",
        "cycleml",
        "train",
        "logger=csv",
        "trainer.max_epochs=4",
        "callbacks.early_stopping=null",
        "callbacks.progress_bar=null",
    ]
    first = subprocess.Popen(
        args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    runs = tmp_path / "logs" / "train" / "runs"
    deadline = time.time() + 240
    while time.time() < deadline and not list(runs.glob("*/checkpoints/last.ckpt")):
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    (run_dir,) = [p.parent.parent for p in runs.glob("*/checkpoints/last.ckpt")]
    killed_at = _last_step(run_dir)
    assert 0 < killed_at < 4 * 20 and not (run_dir / "summary.json").exists()

    resumed = subprocess.run(
        [*args, "ckpt_path=last"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 4 * 20  # 20 batches of 64 per epoch on digits
    assert summary["metrics"]["test/acc"] > 0.9


@pytest.mark.slow
def test_ddp_sim_trains_with_two_cpu_processes(tmp_path):
    """trainer=ddp_sim: two real processes (gloo); one run folder, one summary, one run id."""
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "cycleml", "train", "trainer=ddp_sim", "logger=csv",
         "trainer.max_epochs=2", "callbacks.progress_bar=null"],
        cwd=tmp_path, env={**os.environ, "WANDB_MODE": "offline"},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (summary_path,) = (tmp_path / "logs" / "train" / "runs").glob("*/summary.json")
    summary = json.loads(summary_path.read_text())
    # 1,259 training digits, 2 processes × batch 64 → 10 steps per epoch
    assert summary["global_step"] == 2 * 10
    info = json.loads((summary_path.parent / "run_info.json").read_text())
    assert summary["run_id"] == info["run_id"]
