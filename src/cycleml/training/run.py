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
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from cycleml.errors import ConfigError
from cycleml.models.checkpoint_file import read_checkpoint
from cycleml.redaction import redact_values
from cycleml.training.console import CONSOLE
from cycleml.training.summary import RUN_INFO, SUMMARY, read_json, remove_if_stub, write_json

log = logging.getLogger(__name__)

LAST_CKPT = "checkpoints/last.ckpt"


@dataclass
class Resume:
    """Where training continues from.

    ``run_dir`` is the unfinished run that continues in its own folder; ``source_dir`` is
    the run whose saved config the training takes (the same run, or a finished run whose
    checkpoint starts a new one).
    """

    ckpt_path: str | None = None
    run_dir: Path | None = None
    source_dir: Path | None = None


def is_finished(run_dir: Path) -> bool:
    """A run is finished once it has written ``summary.json``; it is never rewritten."""
    return (run_dir / SUMMARY).is_file()


def resolve_resume(ckpt_path: str | None, runs_dir: Path, current_dir: Path) -> Resume:
    """Turn ``ckpt_path`` (a .ckpt file, a run directory or ``last``) into a :class:`Resume`.

    ``last`` is the newest unfinished run of the task. A finished run folder is refused;
    a checkpoint file of a finished run starts a new run from it.
    """
    resume = _resolve(ckpt_path, runs_dir, current_dir)
    if resume.ckpt_path is not None:
        check_training_checkpoint(resume.ckpt_path)
    return resume


def check_training_checkpoint(path: str | Path) -> None:
    """Refuse, with a :class:`ConfigError` naming the problem, a file that is not a
    Lightning training checkpoint (before Lightning reads it and fails with a traceback)."""
    checkpoint = read_checkpoint(path)
    missing = [key for key in ("pytorch-lightning_version", "state_dict") if key not in checkpoint]
    if missing:
        raise ConfigError(
            f"ckpt_path='{path}' is not a training checkpoint written by `cycleml train` "
            f"(it has no {' or '.join(missing)}; found keys: {', '.join(map(str, checkpoint)) or 'none'})"
        )


def _resolve(ckpt_path: str | None, runs_dir: Path, current_dir: Path) -> Resume:
    if ckpt_path is None or str(ckpt_path) == "":
        return Resume()
    if str(ckpt_path) == "last":
        return _newest_unfinished(runs_dir, current_dir)
    path = Path(ckpt_path)
    if path.is_dir():
        if not (path / LAST_CKPT).is_file():
            raise ConfigError(f"ckpt_path='{path}' is a folder without {LAST_CKPT}")
        if is_finished(path):
            raise ConfigError(
                f"ckpt_path='{path}': that run has finished ({SUMMARY}) and is not rewritten; "
                f"to train on from it in a new run give a checkpoint: ckpt_path={path / LAST_CKPT}"
            )
        return Resume(str(path / LAST_CKPT), path, path)
    if not path.is_file():
        raise ConfigError(
            f"ckpt_path='{path}' does not exist (a .ckpt file, a run folder or 'last')"
        )
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    if run_dir is not None and is_finished(run_dir):
        log.info(
            "%s belongs to a finished run: training on from it in a new run folder",
            path,
            extra=CONSOLE,
        )
        return Resume(str(path), None, run_dir)
    return Resume(str(path), run_dir, run_dir)


def _newest_unfinished(runs_dir: Path, current_dir: Path) -> Resume:
    runs = [
        p.parent.parent
        for p in runs_dir.glob(f"*/{LAST_CKPT}")
        if p.parent.parent.resolve() != current_dir.resolve()
    ]
    unfinished = [run for run in runs if not is_finished(run)]
    if not unfinished:
        raise ConfigError(
            f"ckpt_path=last: no unfinished run under '{runs_dir}' "
            f"({len(runs)} finished run(s); a finished run is not resumed, give one of its "
            "checkpoint files to train on from it in a new run)"
        )
    run_dir = max(unfinished, key=lambda d: (d / LAST_CKPT).stat().st_mtime)
    log.info(
        "ckpt_path=last: resuming %s, the newest of %d unfinished run(s)",
        run_dir,
        len(unfinished),
        extra=CONSOLE,
    )
    return Resume(str(run_dir / LAST_CKPT), run_dir, run_dir)


def move_into_run(stub: Path, run_dir: Path) -> None:
    """Continue logging in ``run_dir`` and remove the folder Hydra made for this launch.

    Hydra creates a run folder (``.hydra/`` and the log) before the task starts; a resumed
    run continues in its own folder, so that one would stay behind as a stub.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if not isinstance(handler, logging.FileHandler):
            continue
        old = Path(handler.baseFilename)
        if old.resolve().parent != stub.resolve():
            continue
        new_path = run_dir / old.name
        handler.flush()
        if old.is_file():
            with new_path.open("a") as target:
                target.write(old.read_text())
        moved = logging.FileHandler(new_path, mode="a", encoding=handler.encoding)
        moved.setLevel(handler.level)
        moved.setFormatter(handler.formatter)
        for log_filter in handler.filters:
            moved.addFilter(log_filter)
        root.removeHandler(handler)
        handler.close()
        root.addHandler(moved)
    remove_if_stub(stub)


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


def instantiate_loggers(cfg: DictConfig | None, run_id: str, quiet: bool = False) -> list[Logger]:
    """Every entry of the ``logger`` group; W&B runs get the run's id so resume continues them.

    ``quiet`` keeps W&B from printing its banners and notices to the console.
    """
    loggers: list[Logger] = []
    for name, node in (cfg or {}).items():
        if not (isinstance(node, DictConfig) and "_target_" in node):
            continue
        extra: dict[str, Any] = {}
        if "wandb" in node._target_.lower():
            extra = {"id": node.get("id") or run_id, "resume": "allow"}
            if quiet and node.get("settings") is None:
                import wandb

                extra["settings"] = wandb.Settings(silent=True)
            Path(node.save_dir).mkdir(parents=True, exist_ok=True)
        logger = hydra.utils.instantiate(node, **extra)
        if not isinstance(logger, Logger):
            raise ConfigError(f"logger.{name} is a {type(logger).__name__}, not a Lightning Logger")
        loggers.append(logger)
    return loggers


def record_tracker_ids(output_dir: Path, info: dict[str, Any], loggers: list[Logger]) -> None:
    """Write the W&B run id actually used (a sweep agent may choose it) to run_info.json."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger.version != info.get("wandb_id"):
            info["wandb_id"] = logger.version
            write_json(output_dir / RUN_INFO, info)


def finish_loggers(loggers: list[Logger], exit_code: int = 0) -> None:
    """Close tracker runs, so that the next run in this process (a sweep) gets its own."""
    for logger in loggers:
        logger.finalize("success" if exit_code == 0 else "failed")
        if isinstance(logger, WandbLogger):
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
