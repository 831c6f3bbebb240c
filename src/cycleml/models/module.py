"""The LightningModule shared by every classifier (images and text)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MaxMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from cycleml.errors import ConfigError
from cycleml.models.checkpoint_file import read_checkpoint

STAGES = ("train", "val", "test")


def classification_metrics(num_classes: int) -> MetricCollection:
    """Accuracy (micro) and macro precision, recall and F1."""
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "precision": MulticlassPrecision(num_classes, average="macro"),
            "recall": MulticlassRecall(num_classes, average="macro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
        }
    )


class ClassifierModule(L.LightningModule):
    """Cross-entropy classification of whatever ``net`` maps to logits.

    Metrics are logged as ``train/…``, ``val/…`` and ``test/…`` (``acc``, ``precision``,
    ``recall``, ``f1``, ``loss``) plus ``val/acc_best``. The hyperparameters carry
    everything needed downstream (see docs/architecture.md, "Checkpoint").
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "step",
        backbone_lr_scale: float | None = None,
        label_smoothing: float = 0.0,
        compile: bool = False,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        model_config: dict[str, Any] | None = None,
        data_spec: dict[str, Any] | None = None,
        run_id: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        if scheduler_interval not in ("step", "epoch"):
            raise ConfigError(
                f"model.scheduler_interval must be 'step' or 'epoch', got '{scheduler_interval}'"
            )
        if backbone_lr_scale is not None and not hasattr(net, "backbone_parameters"):
            raise ConfigError(
                f"model.backbone_lr_scale needs a network with a pretrained backbone; "
                f"{type(net).__name__} has none (set it to null)"
            )
        self.net = net
        self._forward = net.forward
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        if num_classes is None:
            num_classes = len(class_names) if class_names else None
        if not num_classes:
            raise ConfigError("ClassifierModule needs num_classes or class_names")
        # keyed "<stage>_": a plain "train" key would shadow nn.Module.train
        self.metrics = nn.ModuleDict(
            {f"{s}_": classification_metrics(num_classes).clone(prefix=f"{s}/") for s in STAGES}
        )
        self.val_acc_best = MaxMetric()

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(x)

    def setup(self, stage: str) -> None:
        # compile the bound forward, not the module, so checkpoint keys stay plain
        if self.hparams.compile and stage == "fit":
            self._forward = torch.compile(self.net.forward)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(
            logits, y, label_smoothing=self.hparams.label_smoothing if stage == "train" else 0.0
        )
        self.metrics[f"{stage}_"].update(logits.detach(), y)
        # a plain tensor, not a Metric: the progress bar (rank 0 only) must never trigger a
        # cross-process sync; val/test losses are averaged over processes at epoch end
        self.log(
            f"{stage}/loss",
            loss.detach(),
            on_step=stage == "train",
            on_epoch=True,
            prog_bar=True,
            sync_dist=stage != "train",
            batch_size=len(y),
        )
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: tuple[Tensor, Tensor] | Tensor, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return torch.softmax(self(x).float(), dim=-1)

    def _log_epoch_metrics(self, stage: str) -> dict[str, Tensor]:
        values = self.metrics[f"{stage}_"].compute()
        self.log_dict(values, prog_bar=stage != "train")
        self.metrics[f"{stage}_"].reset()
        return values

    def on_train_epoch_end(self) -> None:
        self._log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        values = self._log_epoch_metrics("val")
        if not self.trainer.sanity_checking:
            self.val_acc_best(values["val/acc"])
            self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self._param_groups())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(
            optimizer=optimizer, **self._schedule_length(), **self._group_max_lr(optimizer)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "interval": self.hparams.scheduler_interval,
                "monitor": "val/loss",
            },
        }

    def _param_groups(self) -> Any:
        """All parameters, or with ``backbone_lr_scale`` two groups: the backbone at that
        fraction of the optimizer's learning rate, then the head at the full rate. Frozen
        parameters stay in their group, so a backbone unfrozen mid-run starts learning."""
        scale = self.hparams.backbone_lr_scale
        if scale is None:
            return self.parameters()
        base_lr = getattr(self.optimizer_factory, "keywords", {}).get("lr")
        if base_lr is None:
            raise ConfigError("model.backbone_lr_scale needs model.optimizer.lr to be set")
        return [
            {"params": self.net.backbone_parameters(), "lr": base_lr * scale},
            {"params": self.net.head_parameters(), "lr": base_lr},
        ]

    def _group_max_lr(self, optimizer: torch.optim.Optimizer) -> dict[str, list[float]]:
        """OneCycle's one ``max_lr`` would flatten the groups' rates: scale it per group."""
        given = getattr(self.scheduler_factory, "keywords", {})
        max_lr = given.get("max_lr")
        base_lr = getattr(self.optimizer_factory, "keywords", {}).get("lr")
        if len(optimizer.param_groups) < 2 or not isinstance(max_lr, (int, float)) or not base_lr:
            return {}
        return {"max_lr": [max_lr * group["lr"] / base_lr for group in optimizer.param_groups]}

    def _schedule_length(self) -> dict[str, int]:
        """Fill in a scheduler's length (OneCycle's total_steps, cosine's T_max) from the trainer."""
        func = getattr(self.scheduler_factory, "func", self.scheduler_factory)
        given = getattr(self.scheduler_factory, "keywords", {})
        params = inspect.signature(func).parameters
        steps = int(self.trainer.estimated_stepping_batches)
        length = steps if self.hparams.scheduler_interval == "step" else self.trainer.max_epochs
        # tiny runs: a floor keeps every phase of a warm-up schedule (OneCycle) non-empty
        floor = 10
        pct = given.get("pct_start", getattr(params.get("pct_start"), "default", None))
        if isinstance(pct, (int, float)) and pct > 0:
            floor = max(floor, math.ceil(2 / pct))
        return {
            name: max(floor, length)
            for name in ("total_steps", "T_max")
            if name in params and given.get(name) is None
        }

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str = "cpu") -> ClassifierModule:
        """Rebuild a trained classifier from a checkpoint alone, in eval mode.

        The network is re-created from the saved ``model_config`` (without its
        pretrained weights, which the checkpoint's weights replace).
        """
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"checkpoint '{path}' does not exist")
        checkpoint = read_checkpoint(path, map_location)
        hparams = checkpoint.get("hyper_parameters", {})
        model_config = hparams.get("model_config")
        if not model_config:
            raise ConfigError(
                f"checkpoint '{path}' has no model_config; was it written by cycleml?"
            )
        net_config = dict(model_config["net"])
        if "weights_path" in net_config:
            net_config["weights_path"] = None
        if "pretrained" in net_config:
            net_config["pretrained"] = False
        net = hydra.utils.instantiate(net_config)
        keep = set(inspect.signature(cls.__init__).parameters) - {"self", "net", "optimizer"}
        module = cls(
            net=net,
            optimizer=torch.optim.SGD,
            **{k: v for k, v in hparams.items() if k in keep and k != "scheduler"},
        )
        module.load_state_dict(checkpoint["state_dict"])
        return module.eval()
