"""Every shipped config composes: each primary config, each option of each of its config
groups (every experiment included), and each launcher and sweeper option; every
``_target_`` in the result names something importable."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object
from omegaconf import OmegaConf

from cycleml.configs_path import config_dir

CONFIGS = Path(config_dir())
PRIMARY = sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def groups_of(primary: str) -> list[str]:
    """The config groups named in a primary config's defaults list."""
    defaults = yaml.safe_load((CONFIGS / f"{primary}.yaml").read_text()).get("defaults", [])
    groups = []
    for entry in defaults:
        if isinstance(entry, dict):
            (key,) = entry
            group = key.removeprefix("optional ").removeprefix("override ").strip("/")
            if group not in ("hydra", "local") and (CONFIGS / group).is_dir():
                groups.append(group)
    return groups


def options_of(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def group_cases() -> Iterator[Any]:
    for primary in PRIMARY:
        for group in groups_of(primary):
            for option in options_of(group):
                yield pytest.param(primary, [f"{group}={option}"], id=f"{primary}-{group}={option}")
    for option in options_of("hydra/launcher"):
        yield pytest.param("train", [f"hydra/launcher={option}"], id=f"launcher={option}")
    for kind in ("pruner", "sampler"):
        for option in options_of(f"hydra/sweeper/{kind}"):
            overrides = ["hparams_search=optuna", f"hydra/sweeper/{kind}={option}"]
            yield pytest.param("train", overrides, id=f"sweeper-{kind}={option}")


def targets(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            yield node["_target_"]
        for value in node.values():
            yield from targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from targets(value)


def test_every_group_and_experiment_is_covered() -> None:
    """The cases below reach every option file, so a new one is tested too."""
    covered = {(group, option) for p in PRIMARY for group in groups_of(p) for option in
               options_of(group)}  # fmt: skip
    shipped = {
        (str(path.parent.relative_to(CONFIGS)), path.stem)
        for path in CONFIGS.rglob("*.yaml")
        if path.parent != CONFIGS
        and not str(path.parent.relative_to(CONFIGS)).startswith(("hydra", "sweeps"))
    }
    assert shipped <= covered, f"options no primary config uses: {sorted(shipped - covered)}"
    assert ("experiment", "text_sentiment") in covered and len(options_of("experiment")) >= 5


@pytest.mark.parametrize(("primary", "overrides"), list(group_cases()))
def test_config_option_composes_and_resolves(primary: str, overrides: list[str], tmp_path) -> None:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose(config_name=primary, overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        hydra_part = OmegaConf.to_container(cfg.hydra, resolve=False)
        job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        OmegaConf.update(job, "paths.output_dir", str(tmp_path), force_add=True)
        resolved = OmegaConf.to_container(job, resolve=True, throw_on_missing=False)
    finally:
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()
    assert resolved["task_name"]
    for target in {*targets(resolved), *targets(hydra_part)}:
        assert get_object(target) is not None, target
