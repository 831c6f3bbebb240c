"""Fine-tuning warm-up: train the new head on a frozen backbone first, then everything.

A freshly initialised head sends large, random gradients into the pretrained layers;
a few epochs with the backbone frozen let the head settle before they change.
"""

from __future__ import annotations

import logging

import lightning as L

from cycleml.errors import ConfigError

log = logging.getLogger(__name__)


class BackboneWarmup(L.Callback):
    """Freeze the network's backbone for the first ``frozen_epochs`` epochs, then unfreeze.

    Works with any network that has ``set_backbone_trainable`` (``model=efficientnet_lite0``).
    """

    def __init__(self, frozen_epochs: int = 1) -> None:
        if frozen_epochs < 0:
            raise ConfigError(
                f"callbacks.backbone_warmup.frozen_epochs must be >= 0, got {frozen_epochs}"
            )
        self.frozen_epochs = frozen_epochs

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not hasattr(pl_module.net, "set_backbone_trainable"):
            raise ConfigError(
                f"callbacks.backbone_warmup needs a pretrained backbone; "
                f"{type(pl_module.net).__name__} has none"
            )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.net.probe:
            return  # model.net.freeze_backbone=true: a linear probe stays frozen
        # decided from the epoch, not remembered, so a resumed run is in the right state
        frozen = trainer.current_epoch < self.frozen_epochs
        if frozen != pl_module.net.freeze_backbone:
            pl_module.net.set_backbone_trainable(not frozen)
            log.info(
                "epoch %d: backbone %s", trainer.current_epoch, "frozen" if frozen else "unfrozen"
            )
