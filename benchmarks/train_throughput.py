#!/usr/bin/env python
"""Training images/s of the full `cycleml train` loop against a bare PyTorch loop.

The cycleml side is the real thing: the Hydra config, the data module with its
albumentations pipeline, Lightning, the W&B (offline) logger, checkpoints and the
progress bar. Its throughput is timed over the training batches of epochs 2..N
(validation, which Lightning runs inside the epoch, and start-up excluded). The
baseline is a bare loop over the same network and optimizer on pre-loaded,
pre-normalised tensors in this process.

    python benchmarks/train_throughput.py [--epochs 3] [--models resnet18,cnn]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from cycleml.configs_path import config_dir
from cycleml.training.train import build_datamodule, build_model, train

SETUPS = {
    # ResNet-18 at 32x32 (about 75 MFLOPs per image), batch 64
    "resnet18": ["experiment=digits_resnet18"],
    # the default: small CNN at 16x16
    "cnn": ["experiment=digits"],
}


class TrainTimer(L.Callback):
    """Seconds and images of the training batches of every epoch after the first.

    The clock runs from the epoch's start to its last training batch's end: loading,
    augmentation, steps and logging count; the validation that follows does not.
    """

    last: TrainTimer | None = None  # the instance Hydra built for the latest run

    def __init__(self) -> None:
        TrainTimer.last = self
        self.seconds = 0.0
        self.images = 0
        self._start = 0.0
        self._end = 0.0
        self._count = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._count = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self._count += len(batch[1])
        self._end = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch >= 1:
            self.seconds += self._end - self._start
            self.images += self._count


def compose_cfg(overrides: list[str], out: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.log_dir = str(out / "logs")
        del cfg["hydra"]  # as in a real run: the task never sees the hydra node
    return cfg


def cycleml_throughput(overrides: list[str], epochs: int, out: Path) -> float:
    cfg = compose_cfg(
        [*overrides, f"trainer.max_epochs={epochs}", "test=false", "callbacks.early_stopping=null"],
        out,
    )
    with open_dict(cfg):
        cfg.callbacks.timer = {"_target_": f"{__name__}.TrainTimer"}
    train(cfg)
    return TrainTimer.last.images / TrainTimer.last.seconds


def bare_throughput(overrides: list[str], epochs: int, out: Path) -> float:
    cfg = compose_cfg(overrides, out)
    datamodule = build_datamodule(cfg)
    module = build_model(cfg, datamodule, "bench")
    net = module.net.train()
    train_ids = datamodule.split_ids("train")
    x, y = datamodule._dataset("train", augment=False).__getitems__(list(range(len(train_ids))))
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.model.optimizer.lr)
    batch = cfg.data.batch_size
    images, seconds = 0, 0.0
    for epoch in range(epochs):
        order = torch.randperm(len(y))
        start = time.perf_counter()
        for i in range(0, len(y), batch):
            idx = order[i : i + batch]
            loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if epoch >= 1:
            seconds += time.perf_counter() - start
            images += len(y)
    return images / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per measurement (>= 2)")
    parser.add_argument("--models", default="resnet18,cnn")
    parser.add_argument("--rounds", type=int, default=3, help="median over this many rounds")
    parser.add_argument(
        "overrides", nargs="*", help="extra overrides for both loops, e.g. data.num_workers=1"
    )
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    rows = []
    for name in args.models.split(","):
        overrides = [*SETUPS[name], *args.overrides]
        bares, fulls = [], []
        # alternate the two loops so that a busy moment of the machine hits both alike
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory() as tmp:
                bares.append(bare_throughput(overrides, args.epochs, Path(tmp) / "bare"))
                fulls.append(cycleml_throughput(overrides, args.epochs, Path(tmp) / "full"))
        ratio = statistics.median(f / b for f, b in zip(fulls, bares, strict=True))
        rows.append(
            f"{name:<10} {statistics.median(fulls):>20,.0f} {statistics.median(bares):>16,.0f}"
            f" {ratio:>7.2f}"
        )
    # printed at the end: the progress bars above redraw the terminal
    print(
        f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, timed epochs: {args.epochs - 1}"
    )
    print(f"median of {args.rounds} rounds; load average {os.getloadavg()[0]:.2f}")
    print(f"{'model':<10} {'cycleml train img/s':>20} {'bare loop img/s':>16} {'ratio':>7}")
    print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
