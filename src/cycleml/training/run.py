"""Building blocks of a training run: resume resolution, run ids, callbacks and loggers."""

from __future__ import annotations

import logging
import os
import secrets
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from cycleml.errors import ConfigError
from cycleml.redaction import redact_values
from cycleml.training.summary import RUN_INFO, read_json, write_json

log = logging.getLogger(__name__)

LAST_CKPT = "checkpoints/last.ckpt"


@dataclass
class Resume:
    """Where an interrupted run continues from: its checkpoint and, if known, its folder."""

    ckpt_path: str | None = None
    run_dir: Path | None = None


def resolve_resume(ckpt_path: str | None, runs_dir: Path, current_dir: Path) -> Resume:
    """Turn ``ckpt_path`` (a .ckpt file, a run directory or ``last``) into a :class:`Resume`."""
    if ckpt_path is None or str(ckpt_path) == "":
        return Resume()
    if str(ckpt_path) == "last":
        candidates = [
            p.parent.parent
            for p in runs_dir.glob(f"*/{LAST_CKPT}")
            if p.parent.parent.resolve() != current_dir.resolve()
        ]
        if not candidates:
            raise ConfigError(f"ckpt_path=last: no earlier run with {LAST_CKPT} under '{runs_dir}'")
        run_dir = max(candidates, key=lambda d: (d / LAST_CKPT).stat().st_mtime)
        return Resume(str(run_dir / LAST_CKPT), run_dir)
    path = Path(ckpt_path)
    if path.is_dir():
        if not (path / LAST_CKPT).is_file():
            raise ConfigError(f"ckpt_path='{path}' is a folder without {LAST_CKPT}")
        return Resume(str(path / LAST_CKPT), path)
    if not path.is_file():
        raise ConfigError(
            f"ckpt_path='{path}' does not exist (a .ckpt file, a run folder or 'last')"
        )
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    return Resume(str(path), run_dir)


def new_run_id() -> str:
    """An 8-character id in W&B's alphabet, used for the run and its W&B run."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def start_run(output_dir: Path, resume: Resume) -> dict[str, Any]:
    """Write (or, when resuming, re-read) ``run_info.json`` and return it."""
    info = read_json(output_dir / RUN_INFO)
    if int(os.environ.get("LOCAL_RANK", "0")) > 0 and info.get("run_id"):
        # a DDP worker started again by the launcher: rank 0 has written the run's ids
        return info
    if resume.run_dir is not None and info.get("run_id"):
        log.info("resuming run %s in %s from %s", info["run_id"], output_dir, resume.ckpt_path)
        info["resumed_from"] = resume.ckpt_path
    else:
        info = {"run_id": new_run_id(), "output_dir": str(output_dir)}
        if resume.ckpt_path:
            info["resumed_from"] = resume.ckpt_path
    info["wandb_id"] = info["run_id"]
    write_json(output_dir / RUN_INFO, info)
    return info


def instantiate_callbacks(cfg: DictConfig | None) -> list[L.Callback]:
    """Every entry of the ``callbacks`` group that has a ``_target_``."""
    callbacks: list[L.Callback] = []
    for name, node in (cfg or {}).items():
        if isinstance(node, DictConfig) and "_target_" in node:
            callback = hydra.utils.instantiate(node)
            if not isinstance(callback, L.Callback):
                raise ConfigError(
                    f"callbacks.{name} is a {type(callback).__name__}, not a Callback"
                )
            callbacks.append(callback)
    return callbacks


def instantiate_loggers(cfg: DictConfig | None, run_id: str) -> list[Logger]:
    """Every entry of the ``logger`` group; W&B runs get the run's id so resume continues them."""
    loggers: list[Logger] = []
    for name, node in (cfg or {}).items():
        if not (isinstance(node, DictConfig) and "_target_" in node):
            continue
        extra: dict[str, Any] = {}
        if "wandb" in node._target_.lower():
            extra = {"id": node.get("id") or run_id, "resume": "allow"}
            Path(node.save_dir).mkdir(parents=True, exist_ok=True)
        logger = hydra.utils.instantiate(node, **extra)
        if not isinstance(logger, Logger):
            raise ConfigError(f"logger.{name} is a {type(logger).__name__}, not a Lightning Logger")
        loggers.append(logger)
    return loggers


def record_tracker_ids(output_dir: Path, info: dict[str, Any], loggers: list[Logger]) -> None:
    """Write the W&B run id actually used (a sweep agent may choose it) to run_info.json."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger" and logger.version != info.get("wandb_id"):
            info["wandb_id"] = logger.version
            write_json(output_dir / RUN_INFO, info)


def finish_loggers(loggers: list[Logger], exit_code: int = 0) -> None:
    """Close tracker runs, so that the next run in this process (a sweep) gets its own."""
    for logger in loggers:
        logger.finalize("success" if exit_code == 0 else "failed")
        if type(logger).__name__ == "WandbLogger":
            import wandb

            if wandb.run is not None:
                wandb.finish(exit_code=exit_code)


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as one flat dict (``model.optimizer.lr: 0.003``) for trackers."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            flat[prefix] = node

    walk(redact_values(OmegaConf.to_container(cfg, resolve=True)), "")
    return flat
