#!/usr/bin/env python
"""Seconds per epoch of the linear probe (`experiment=image_folder_probe`), with and
without the frozen backbone's feature cache, and whether both learn the same head.

Both paths fit the same data module from the same seed in this process, in alternating
turns (a busy moment of the machine hits both alike). An epoch is timed from its start
to the end of its validation, so the first epoch (which fills the cache) and the later
ones (which train the head only) are reported apart.

    python benchmarks/probe_feature_cache.py [--per-class 30] [--epochs 3] [--turns 2]
        [--pretrained]   # the installed ImageNet weights instead of random ones
"""

from __future__ import annotations

import argparse
import importlib.util
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
from cycleml.models.feature_cache import enable_feature_cache
from cycleml.training.train import build_datamodule, build_model

ROOT = Path(__file__).resolve().parents[1]


class EpochTimer(L.Callback):
    """Seconds of each epoch, training and validation included."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.seconds.append(time.perf_counter() - self._start)


def fit(cfg, datamodule, cached: bool, epochs: int) -> tuple[list[float], torch.Tensor, float]:
    L.seed_everything(0, workers=True)
    module = build_model(cfg, datamodule, "bench")
    if cached:
        enable_feature_cache(module.net)
    timer = EpochTimer()
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=datamodule)
    acc = float(trainer.callback_metrics["val/acc"])
    return timer.seconds, module.net.model.classifier.weight.detach().clone(), acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--pretrained", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location(
        "make_demo_images", ROOT / "scripts/make_demo_images.py"
    )
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    with tempfile.TemporaryDirectory() as tmp:
        folder = demo.make_demo_images(Path(tmp) / "images", per_class=args.per_class, seed=0)
        GlobalHydra.instance().clear()
        overrides = ["experiment=image_folder_probe", f"data.path={folder}", "logger=csv"]
        if not args.pretrained:
            overrides.append("model.net.pretrained=false")
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose("train", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(Path(tmp) / "run")
            del cfg["hydra"]
        datamodule = build_datamodule(cfg)
        print(
            f"{len(datamodule.split_ids('train'))} training, {len(datamodule.split_ids('val'))} "
            f"validation images at {datamodule.image_size}, {args.epochs} epochs"
        )
        later = {True: [], False: []}
        for turn in range(args.turns):
            runs = {}
            for cached in (False, True) if turn % 2 == 0 else (True, False):
                runs[cached] = fit(cfg, datamodule, cached, args.epochs)
                seconds = runs[cached][0]
                later[cached].append(statistics.mean(seconds[1:]))
                print(
                    f"turn {turn} {'cached  ' if cached else 'uncached'} seconds per epoch "
                    f"{[round(s, 2) for s in seconds]} val/acc {runs[cached][2]:.4f}",
                    flush=True,
                )
            gap = (runs[True][1] - runs[False][1]).abs().max().item()
            print(f"turn {turn}: largest head-weight difference cached vs uncached {gap:.2e}")
        ratios = [u / c for u, c in zip(later[False], later[True], strict=True)]
        print(
            f"epochs after the first: uncached / cached time per turn {[round(r) for r in ratios]}"
        )


if __name__ == "__main__":
    main()
