"""The shipped sweep configs compose: hparams_search, pruners, samplers, launchers."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from cycleml.configs_path import config_dir
from cycleml.sweeps.search_space import parse_search_space


def compose_train(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir(), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_optuna_search_selects_our_sweeper_with_a_stable_sweep_folder() -> None:
    cfg = compose_train("hparams_search=optuna", "paths.log_dir=/logs")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.startswith("hydra_plugins.cycleml_optuna_sweeper.")
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sweeper.sampler.seed == 42
    assert sweeper.pruner._target_ == "optuna.pruners.MedianPruner"
    assert sweeper.direction == "maximize" and sweeper.storage is None
    assert sweeper.max_failure_rate > 0
    assert OmegaConf.select(cfg, "hydra.sweeper.metric") == cfg.optimized_metric == "val/acc"
    # no timestamp: rerunning the same command finds the same folder and study
    assert cfg.hydra.sweep.dir == "/logs/train/sweeps/train_optuna"
    assert cfg.callbacks.optuna_pruning._target_ == "cycleml.sweeps.pruning.OptunaPruning"
    assert cfg.hydra.callbacks.trial_threads._target_ == "cycleml.sweeps.resources.TrialThreads"


def test_study_name_names_the_folder() -> None:
    cfg = compose_train("hparams_search=optuna", "paths.log_dir=/l", "hydra.sweeper.study_name=lr")
    assert cfg.hydra.sweep.dir == "/l/train/sweeps/lr"


def test_every_searched_key_exists_and_a_sampled_trial_composes() -> None:
    cfg = compose_train("hparams_search=optuna")
    parser = OverridesParser.create()
    space = parse_search_space(OmegaConf.to_container(cfg.hydra.sweeper.params), [], parser)
    assert set(space.distributions) == {
        "model.optimizer.lr",
        "model.optimizer.weight_decay",
        "model.net.width",
        "model.net.dropout",
        "data.batch_size",
    }
    for key in space.distributions:
        assert OmegaConf.select(cfg, key) is not None, key
    low = {}
    for name, dist in space.distributions.items():
        low[name] = dist.choices[-1] if hasattr(dist, "choices") else dist.high
    trial = compose_train("hparams_search=optuna", *space.overrides(low))
    assert trial.model.net.width == 64
    assert trial.data.batch_size == 128
    assert trial.model.optimizer.lr == pytest.approx(3e-2)


@pytest.mark.parametrize(
    ("choice", "target"),
    [
        ("median", "optuna.pruners.MedianPruner"),
        ("hyperband", "optuna.pruners.HyperbandPruner"),
        ("none", "optuna.pruners.NopPruner"),
    ],
)
def test_pruner_is_chosen_by_config_group(choice: str, target: str) -> None:
    cfg = compose_train("hparams_search=optuna", f"hydra/sweeper/pruner={choice}")
    assert cfg.hydra.sweeper.pruner._target_ == target
    if choice == "hyperband":
        assert "n_warmup_steps" not in cfg.hydra.sweeper.pruner


def test_random_sampler_replaces_tpe_entirely() -> None:
    cfg = compose_train("hparams_search=optuna", "hydra/sweeper/sampler=random")
    assert OmegaConf.to_container(cfg.hydra.sweeper.sampler) == {
        "_target_": "optuna.samplers.RandomSampler",
        "seed": 42,
    }


def test_parallel_launcher_runs_as_many_trials_as_the_sweeper_launches() -> None:
    cfg = compose_train(
        "hparams_search=optuna", "hydra/launcher=parallel", "hydra.sweeper.n_jobs=3"
    )
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs == 3
    grid = compose_train("hydra/launcher=parallel")
    assert grid.hydra.launcher.n_jobs == -1


@pytest.mark.parametrize("launcher", ["slurm", "submitit_slurm"])
def test_slurm_launcher_composes_with_the_usual_fields(launcher: str, tmp_path: Path) -> None:
    cfg = compose_train(
        "hparams_search=optuna",
        f"paths.log_dir={tmp_path}",
        f"hydra/launcher={launcher}",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=30",
        "hydra.sweeper.n_jobs=8",
    )
    slurm = cfg.hydra.launcher
    assert slurm._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert slurm.partition == "gpu" and slurm.timeout_min == 30
    for field in ("gpus_per_node", "cpus_per_task", "mem_gb", "nodes", "tasks_per_node", "setup"):
        assert field in slurm
    assert str(slurm.submitit_folder).startswith(str(tmp_path / "train" / "sweeps"))
    if launcher == "slurm":
        assert slurm.array_parallelism == 8
        assert slurm.gpus_per_node == 1 and slurm.cpus_per_task == 8
