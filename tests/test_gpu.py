"""GPU training with mixed precision; skipped where no CUDA device is present."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from cycleml.training.train import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU (torch.cuda.is_available() is False on this machine)",
    ),
]

# what the probe saw during the last training run of this module
SEEN: dict[str, list] = {}


class TrainingProbe(L.Callback):
    """Records where the module's weights lived, the dtype of the module's output
    (bf16/fp16 under mixed precision) and the mean training loss of each epoch."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        SEEN.update(devices=[], dtypes=[], losses=[], precision=[trainer.precision])
        SEEN["devices"].append(next(pl_module.parameters()).device.type)

        def record(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
            if pl_module.training:
                SEEN["dtypes"].append(output.dtype)

        pl_module.register_forward_hook(record)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_losses: list[float] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: dict, *_: object
    ) -> None:
        self.epoch_losses.append(float(outputs["loss"]))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        SEEN["losses"].append(sum(self.epoch_losses) / len(self.epoch_losses))


def test_gpu_mixed_precision_training(make_cfg):
    bf16 = torch.cuda.is_bf16_supported()
    precision = "bf16-mixed" if bf16 else "16-mixed"
    cfg = make_cfg(
        "train", "trainer=gpu", f"trainer.precision={precision}", "trainer.max_epochs=4",
        "logger=csv", "callbacks.progress_bar=null", "callbacks.early_stopping=null",
        fast=False,
    )  # fmt: skip
    with open_dict(cfg):
        cfg.callbacks.probe = {"_target_": f"{__name__}.TrainingProbe"}
    metrics = train(cfg)
    assert SEEN["devices"] == ["cuda"]
    assert SEEN["precision"] == [precision]
    assert set(SEEN["dtypes"]) == {torch.bfloat16 if bf16 else torch.float16}
    losses = SEEN["losses"]
    assert len(losses) == 4 and losses[-1] < 0.7 * losses[0], losses
    assert metrics["test/acc"] > 0.8
