"""The Lightning pruning callback against a real study in SQLite, and its config wiring."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import optuna
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from torch.utils.data import DataLoader, TensorDataset

from cycleml.configs_path import config_dir
from cycleml.errors import ConfigError
from cycleml.sweeps.pruning import OptunaPruning, sweep_pruner


class ScriptedModule(L.LightningModule):
    """A tiny model whose validation metric follows a script, one value per epoch."""

    def __init__(self, scores: list[float]) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.scores = scores

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", self.scores[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), batch_size=4)


def trainer(callback: OptunaPruning, tmp_path: Path, epochs: int = 3) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )


def median_pruner() -> optuna.pruners.MedianPruner:
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)


@pytest.fixture
def study(tmp_path: Path) -> tuple[str, optuna.Study]:
    """A study with two finished trials that scored 0.9 at every epoch."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    for _ in range(2):
        trial = study.ask()
        for epoch in range(3):
            trial.report(0.9, epoch)
        study.tell(trial, 0.9)
    return url, study


def callback_for(url: str, number: int, monitor: str = "val/acc") -> OptunaPruning:
    return OptunaPruning(
        monitor=monitor, trial_number=number, study_name="s", storage=url, pruner=median_pruner()
    )


def test_lagging_trial_is_pruned_after_its_first_epoch(study, tmp_path):
    url, s = study
    trial = s.ask()
    with pytest.raises(optuna.TrialPruned, match=f"trial {trial.number} pruned at step 0"):
        trainer(callback_for(url, trial.number), tmp_path).fit(
            ScriptedModule([0.2, 0.95, 0.95]), loader(), loader()
        )
    reported = optuna.load_study(study_name="s", storage=url).trials[trial.number]
    assert reported.intermediate_values == {0: pytest.approx(0.2)}


def test_promising_trial_reports_every_epoch_and_trains_to_the_end(study, tmp_path):
    url, s = study
    trial = s.ask()
    fit = trainer(callback_for(url, trial.number), tmp_path)
    fit.fit(ScriptedModule([0.91, 0.93, 0.97]), loader(), loader())
    assert fit.current_epoch == 3
    reported = optuna.load_study(study_name="s", storage=url).trials[trial.number]
    assert reported.intermediate_values == {
        0: pytest.approx(0.91),
        1: pytest.approx(0.93),
        2: pytest.approx(0.97),
    }


def test_outside_a_sweep_the_callback_does_nothing(tmp_path):
    fit = trainer(OptunaPruning(monitor="val/acc"), tmp_path, epochs=2)
    fit.fit(ScriptedModule([0.0, 0.0]), loader(), loader())
    assert fit.current_epoch == 2


def test_unlogged_metric_is_a_config_error_naming_it(study, tmp_path):
    url, s = study
    trial = s.ask()
    with pytest.raises(ConfigError, match="'val/f1' is not logged; logged: val/acc"):
        trainer(callback_for(url, trial.number, monitor="val/f1"), tmp_path).fit(
            ScriptedModule([0.5, 0.5, 0.5]), loader(), loader()
        )


def test_hparams_search_config_builds_the_callback_with_the_sweepers_pruner(tmp_path):
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "hparams_search=optuna",
                "hydra/sweeper/pruner=hyperband",
                "trainer.max_epochs=7",
                "++optuna_trial.number=4",
                f"paths.log_dir={tmp_path}",
            ],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    try:
        callback = instantiate(cfg.callbacks.optuna_pruning)
        pruner = sweep_pruner()
    finally:
        HydraConfig.instance().cfg = None
    assert isinstance(callback, OptunaPruning)
    assert callback.trial_number == 4 and callback.monitor == "val/acc"
    assert callback.study_name == "train_optuna"
    assert callback.storage is None
    assert callback.sweep_dir == str(tmp_path / "train" / "sweeps" / "train_optuna")
    assert callback.pruner is None
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)
    assert pruner._max_resource == 7
