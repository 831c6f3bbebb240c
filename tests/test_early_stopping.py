"""Early stopping sized to the run: patience from max_epochs, off on a small validation split."""

from __future__ import annotations

import hydra
import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from cycleml.errors import ConfigError
from cycleml.training.early_stopping import SizedEarlyStopping


class FlatModel(L.LightningModule):
    """A model whose validation scores never improve."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)

    def training_step(self, batch, _):
        return self.layer(batch[0]).sum()

    def validation_step(self, batch, _):
        self.log("val/acc", 0.5)
        self.log("val/loss", 1.0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class Items(L.LightningDataModule):
    def __init__(self, val_items: int) -> None:
        super().__init__()
        self.val_items = val_items

    def split_ids(self, split: str) -> list[str]:
        return [f"{split}/{i}" for i in range(self.val_items if split == "val" else 4)]

    def _loader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(4, 2)), batch_size=4)

    train_dataloader = val_dataloader = _loader


def epochs_run(early_stopping: L.Callback, val_items: int, max_epochs: int = 30) -> int:
    trainer = L.Trainer(
        max_epochs=max_epochs, callbacks=[early_stopping], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(FlatModel(), datamodule=Items(val_items))
    return trainer.current_epoch


def test_the_default_early_stopping_lets_a_small_data_run_finish(make_cfg, caplog):
    early_stopping = hydra.utils.instantiate(make_cfg("train").callbacks.early_stopping)
    with caplog.at_level("INFO", logger="cycleml.training.early_stopping"):
        assert epochs_run(early_stopping, val_items=37) == 30
    assert (
        caplog.text.count("early stopping: off (37 validation items, fewer than min_val_items=200)")
        == 1
    )


def test_patience_is_a_share_of_the_epoch_budget(caplog):
    early_stopping = SizedEarlyStopping(patience_fraction=0.4, min_patience=5, min_val_items=200)
    with caplog.at_level("INFO", logger="cycleml.training.early_stopping"):
        # the first best epoch, then 12 without gain
        assert epochs_run(early_stopping, val_items=500) == 1 + 12
    assert early_stopping.patience == 12
    assert "early stopping: on val/acc (max), patience 12 of 30 epochs" in caplog.text
    short = SizedEarlyStopping(patience_fraction=0.4, min_patience=5)
    epochs_run(short, val_items=500, max_epochs=6)
    assert short.patience == 5
    with pytest.raises(ConfigError, match="patience_fraction=0"):
        SizedEarlyStopping(patience_fraction=0)
