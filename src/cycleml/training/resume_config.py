"""The config of a resumed run: the run's saved config, with the resume's overrides on top."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from cycleml.errors import ConfigError
from cycleml.training.console import CONSOLE

log = logging.getLogger(__name__)

SAVED_CONFIG = ".hydra/config.yaml"
SAVED_HYDRA = ".hydra/hydra.yaml"
# data keys that change how batches are loaded, not what they hold
DATA_LOADING_KEYS = {
    "batch_size", "eval_batch_size", "num_workers", "decode_workers", "pin_memory",
    "persistent_workers",
}  # fmt: skip
_ABSENT = object()


def resume_overrides() -> tuple[list[str], dict[str, Any]]:
    """The command line's overrides and config group choices of this Hydra run."""
    if not HydraConfig.initialized():
        return [], {}
    hydra_cfg = HydraConfig.get()
    return list(hydra_cfg.overrides.task), dict(hydra_cfg.runtime.choices)


def changes_checkpoint_shape(key: str) -> bool:
    """Whether ``key`` shapes the network or its data: the checkpoint could not be loaded."""
    parts = key.split(".")
    if parts[0] == "model":
        return True
    return parts[0] == "data" and parts[-1] not in DATA_LOADING_KEYS


def config_for_resume(
    cfg: DictConfig, source_dir: Path, overrides: list[str], choices: dict[str, Any]
) -> DictConfig:
    """``source_dir``'s saved config with ``overrides`` (composed into ``cfg``) applied on top.

    Overrides that change the model or the shape of the data are refused, naming them;
    ``paths`` and ``ckpt_path`` are this launch's.
    """
    saved_path = source_dir / SAVED_CONFIG
    if not saved_path.is_file():
        log.info("%s has no %s: resuming with the config given now", source_dir, SAVED_CONFIG)
        return cfg
    saved = OmegaConf.load(saved_path)
    saved_hydra = source_dir / SAVED_HYDRA
    saved_choices = (
        dict(OmegaConf.select(OmegaConf.load(saved_hydra), "hydra.runtime.choices") or {})
        if saved_hydra.is_file()
        else {}
    )
    refused: list[str] = []
    applied: list[str] = []
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key == "ckpt_path" or key.split("/")[0].split(".")[0] == "hydra":
            continue
        text = override.input_line or key
        if (
            key in choices
            and OmegaConf.select(cfg, key.replace("/", "."), default=_ABSENT) is _ABSENT
        ):
            # a group packaged elsewhere (experiment=, debug=): its keys are not known here
            if choices.get(key) != saved_choices.get(key):
                refused.append(text)
            continue
        key = key.replace("/", ".")
        new = OmegaConf.select(cfg, key)
        old = OmegaConf.select(saved, key)
        if override.is_delete():
            new = None
        if _plain(new) == _plain(old):
            continue
        if changes_checkpoint_shape(key):
            refused.append(text)
            continue
        with open_dict(saved):
            if override.is_delete():
                _delete(saved, key)
            else:
                OmegaConf.update(saved, key, new, merge=False, force_add=True)
        applied.append(text)
    if refused:
        raise ConfigError(
            "cannot change the model or the data shape of a resumed run: "
            f"{' '.join(refused)} (the checkpoint was trained with the run's own; "
            "start a new run to change them)"
        )
    with open_dict(saved):
        saved.paths = cfg.paths
        saved.ckpt_path = cfg.get("ckpt_path")
    log.info(
        "resuming with the config in %s%s",
        saved_path,
        f", with {' '.join(applied)}" if applied else "",
        extra=CONSOLE,
    )
    return saved


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node) if OmegaConf.is_config(node) else node


def _delete(cfg: DictConfig, key: str) -> None:
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if parent is not None and leaf in parent:
        del parent[leaf]
