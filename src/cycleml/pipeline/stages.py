"""The stages of ``cycleml pipeline``. Each calls the code of its own command in process
(``cycleml data gather``, ``data clean``, ``train``, ``eval``, ``export``, ``registry``)
and declares its config and inputs, from which the runner computes its key.

A stage is ``plan(ctx) -> (config, inputs)`` and ``run(ctx, out_dir) -> outputs``; the
outputs of the stages before it are in ``ctx.outputs``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from cycleml.errors import ConfigError
from cycleml.pipeline import state as st
from cycleml.pipeline.state import path_fingerprint
from cycleml.training.console import CONSOLE

log = logging.getLogger(__name__)

# keys of the composed config that decide what training produces
TRAIN_KEYS = ("data", "augment", "model", "callbacks", "trainer", "train", "test", "seed")
SAVED_CONFIG = ".hydra/config.yaml"


@dataclass
class Context:
    """What the stages share: the composed config, the run, the registry and what the
    stages before have written."""

    cfg: DictConfig
    run_dir: Path
    run_id: str
    registry: Any  # cycleml.registry.Registry
    champion: Any | None  # the champion's ModelVersion, None on a first run
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    previous: dict[str, Any] = field(default_factory=dict)  # stage -> its record before
    keys: dict[str, str] = field(default_factory=dict)  # stage -> its key in this launch

    @property
    def name(self) -> str:
        return str(self.cfg.name)

    @property
    def champion_ref(self) -> str | None:
        return None if self.champion is None else self.champion.ref


@dataclass(frozen=True)
class Stage:
    name: str
    plan: Callable[[Context], tuple[Any, dict[str, str]]]
    run: Callable[[Context, Path], dict[str, Any]]
    # False: always run (cheap, or depends on the registry's present state)
    cached: bool = True


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


# --- gather ------------------------------------------------------------------------


def _gather_plan(ctx: Context) -> tuple[Any, dict[str, str]]:
    sources = _plain(ctx.cfg.get("sources")) or {}
    inputs = {
        f"sources.{name}.path": path_fingerprint(source["path"])
        for name, source in sources.items()
        if isinstance(source, dict) and source.get("path")
    }
    config = {"sources": sources, "label_map": _plain(ctx.cfg.get("label_map"))}
    return config, inputs


def _gather_run(ctx: Context, out_dir: Path) -> dict[str, Any]:
    from cycleml.data.gather import gather

    config, _ = _gather_plan(ctx)
    for name, source in config["sources"].items():
        path = source.get("path") if isinstance(source, dict) else None
        if path and not Path(path).exists():
            raise ConfigError(f"sources.{name}.path: '{path}' does not exist")
    result = gather(
        sources=config["sources"],
        output=out_dir,
        label_map=config["label_map"],
        files=ctx.cfg.files,
        workers=ctx.cfg.workers,
        overwrite=True,
        progress=ctx.cfg.progress,
    )
    return {"dataset_dir": str(result.root), "fingerprint": result.fingerprint,
            "items": result.num_items, "rejected": result.num_rejected}  # fmt: skip


# --- clean -------------------------------------------------------------------------


def _clean_plan(ctx: Context) -> tuple[Any, dict[str, str]]:
    return _plain(ctx.cfg.clean), {"dataset": ctx.outputs["gather"]["fingerprint"]}


def _clean_run(ctx: Context, out_dir: Path) -> dict[str, Any]:
    from cycleml.data.clean import CleanSettings, clean

    options = dict(_plain(ctx.cfg.clean))
    settings = CleanSettings(
        policies=options.pop("checks", None) or {},
        schema=options.pop("schema", None) or {},
        workers=ctx.cfg.workers,
        progress=ctx.cfg.progress,
        **options,
    )
    result = clean(ctx.outputs["gather"]["dataset_dir"], out_dir, settings, overwrite=True)
    return {"dataset_dir": str(result.root), "fingerprint": result.fingerprint,
            "kept": result.num_kept, "removed": result.num_removed,
            "counts": {k: v for k, v in result.counts.items() if v}}  # fmt: skip


# --- train -------------------------------------------------------------------------


def dataset_dir(ctx: Context) -> str:
    """The dataset the model trains on: the cleaned one (the gathered one without clean)."""
    for stage in ("clean", "gather"):
        if stage in ctx.outputs:
            return str(ctx.outputs[stage]["dataset_dir"])
    raise ConfigError("no dataset: the pipeline needs its gather stage")


def train_config(ctx: Context, output_dir: str, data_path: str) -> DictConfig:
    """The pipeline's config as ``cycleml train`` takes it, writing to ``output_dir``
    and reading the dataset at ``data_path``."""
    cfg = ctx.cfg.copy()
    with open_dict(cfg):
        cfg.paths.output_dir = output_dir
        if "path" in cfg.data:
            cfg.data.path = data_path
        cfg.ckpt_path = None
    return cfg


def _train_plan(ctx: Context) -> tuple[Any, dict[str, str]]:
    # the run's own folders are placeholders: the same training in another run folder
    # has the same key
    cfg = train_config(ctx, "<output_dir>", "<dataset>")
    with open_dict(cfg):
        for key in list(cfg.paths):
            if key != "output_dir":
                cfg.paths[key] = f"<paths.{key}>"
    config = {key: _plain(cfg.get(key)) for key in TRAIN_KEYS}
    fingerprint = ctx.outputs[("clean" if "clean" in ctx.outputs else "gather")]["fingerprint"]
    return config, {"dataset": fingerprint}


# what a launch does with the train folder that an earlier launch of the run left
NEW, REUSE, RESUME, ASIDE = "new", "reuse", "resume", "aside"


def train_folder_plan(out_dir: Path, key: str | None, recorded_key: str | None) -> tuple[str, str]:
    """What a launch whose train stage has ``key`` does with ``out_dir``, and why.

    ``new``: there is no folder. ``reuse``: it holds the finished training of ``key``
    (the launch that ran it ended before ``state.json`` recorded it). ``resume``: it
    holds an unfinished training of ``key`` with a last checkpoint. ``aside``: anything
    else; the folder is moved aside, never reused.

    Which key a folder holds is its own mark (``.stage.json``, written before training
    starts), not ``state.json``: a launch records its key there before it moves the folder
    of another key aside, so a kill in between leaves a record that does not describe the
    folder. A folder without a mark (written before marks existed) is resumed, as then,
    when ``recorded_key``, the key ``state.json`` held before this launch, is ``key``.
    """
    from cycleml.training.run import LAST_CKPT, is_finished

    if not out_dir.exists():
        return NEW, "no earlier training"
    finished = is_finished(out_dir)
    resumable = (out_dir / LAST_CKPT).is_file() and not finished
    marked = st.stage_dir_key(out_dir, "train")
    if marked is None:
        if resumable and key is not None and recorded_key == key:
            return RESUME, "an unfinished training of this config and dataset"
        return ASIDE, f"a training that does not record its config and dataset ({st.STAGE_MARK})"
    if marked != key:
        return ASIDE, "a training of another config or dataset"
    if finished:
        if not train_checkpoint(out_dir).is_file():
            return ASIDE, "a finished training of this config and dataset without its checkpoint"
        if finished_metrics(out_dir) is None:
            return ASIDE, (
                "a finished training of this config and dataset whose summary.json cannot be read"
            )
        return REUSE, "the finished training of this config and dataset"
    if resumable:
        return RESUME, "an unfinished training of this config and dataset"
    return ASIDE, (
        "an unfinished training of this config and dataset without a checkpoint to resume from"
    )


def _read_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when it is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: nested too deep
        return None
    return value if isinstance(value, dict) else None


def finished_metrics(run_dir: Path) -> dict[str, float] | None:
    """The metrics a finished training wrote to its ``summary.json``; None when the file
    does not hold them as training writes them (a number for each name)."""
    from cycleml.training.summary import SUMMARY

    summary = _read_object(run_dir / SUMMARY)
    metrics = None if summary is None else summary.get("metrics")
    if not isinstance(metrics, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values()
    ):
        return None
    return {str(k): float(v) for k, v in metrics.items()}


def train_checkpoint(run_dir: Path) -> Path:
    """The checkpoint a training leaves for the stages after it: the best, else the last."""
    from cycleml.training.run import LAST_CKPT

    best = run_dir / "checkpoints" / "best.ckpt"
    return best if best.is_file() else run_dir / LAST_CKPT


def _train_run(ctx: Context, out_dir: Path) -> dict[str, Any]:
    from cycleml.training.run import LAST_CKPT
    from cycleml.training.summary import RUN_INFO
    from cycleml.training.train import train

    cfg = train_config(ctx, str(out_dir), dataset_dir(ctx))
    key = ctx.keys.get("train")
    previous = ctx.previous.get("train")
    action, why = train_folder_plan(out_dir, key, None if previous is None else previous.key)
    if action == REUSE:
        log.info("train: %s holds %s: reused, not trained again", out_dir, why, extra=CONSOLE)
        metrics = finished_metrics(out_dir) or {}  # read by the plan: not None
        if "resumed_from" in (_read_object(out_dir / RUN_INFO) or {}):
            with open_dict(cfg):  # as the launch that resumed it had it
                cfg.ckpt_path = str(out_dir)
    else:
        if action == RESUME:
            log.info("train: resuming from %s, %s", out_dir / LAST_CKPT, why, extra=CONSOLE)
            with open_dict(cfg):
                cfg.ckpt_path = str(out_dir)
        elif action == ASIDE:  # kept, not deleted
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = _free_name(out_dir.with_name(f"{out_dir.name}.replaced-{stamp}"))
            out_dir.rename(aside)
            log.info("train: %s held %s; moved to %s", out_dir, why, aside, extra=CONSOLE)
        if key is not None:
            st.mark_stage_dir(out_dir, "train", key)
        metrics = train(cfg)
    # the run's config, resolved, where `cycleml eval` and the gate's lineage look for it
    saved = out_dir / SAVED_CONFIG
    saved.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(_resolved(cfg), saved)
    shown = {k: round(float(v), 4) for k, v in metrics.items() if k in ("val/acc", "test/acc")}
    return {"run_dir": str(out_dir), "checkpoint": str(train_checkpoint(out_dir)),
            "metrics": shown, "resumed": bool(cfg.ckpt_path), "reused": action == REUSE}  # fmt: skip


def _free_name(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def _resolved(cfg: DictConfig) -> DictConfig:
    from cycleml.redaction import redact_values

    plain = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}
    return OmegaConf.create(redact_values(plain))


# --- evaluate ----------------------------------------------------------------------


def _evaluate_plan(ctx: Context) -> tuple[Any, dict[str, str]]:
    return {"split": "test", "num_errors": 16}, {
        "checkpoint": path_fingerprint(ctx.outputs["train"]["checkpoint"])
    }


def _evaluate_run(ctx: Context, out_dir: Path) -> dict[str, Any]:
    from cycleml.training.evaluate import evaluate

    trainer = _plain(ctx.cfg.trainer)
    trainer.update(default_root_dir=str(out_dir), enable_model_summary=False,
                   enable_progress_bar=False)  # fmt: skip
    cfg = OmegaConf.create(
        {
            "ckpt_path": ctx.outputs["train"]["checkpoint"],
            "split": "test",
            "num_errors": 16,
            "data": None,
            "logger": None,
            "trainer": trainer,
            "paths": {"output_dir": str(out_dir)},
        }
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = evaluate(cfg)
    return {"dir": str(out_dir), "metrics": {k: round(v, 4) for k, v in metrics.items()}}


# --- export ------------------------------------------------------------------------


def _export_plan(ctx: Context) -> tuple[Any, dict[str, str]]:
    config = {**_plain(ctx.cfg.export), "name": ctx.name}
    return config, {"checkpoint": path_fingerprint(ctx.outputs["train"]["checkpoint"])}


def _export_run(ctx: Context, out_dir: Path) -> dict[str, Any]:
    from cycleml.export.checkpoint import export_checkpoint
    from cycleml.export.exporter import ExportSettings

    options = _plain(ctx.cfg.export)
    try:
        settings = ExportSettings(**options, overwrite=True)
    except TypeError as err:
        raise ConfigError(f"unknown export option: {err}") from err
    bundle = export_checkpoint(
        ctx.outputs["train"]["checkpoint"],
        out_dir=out_dir / "bundle",
        name=ctx.name,
        version=ctx.run_id,
        settings=settings,
    )
    return {"bundle_dir": str(bundle.path),
            "val_acc": round(float(bundle.meta.metrics.get("bundle/val_acc", 0.0)), 4)}  # fmt: skip


# --- register ----------------------------------------------------------------------


def _register_plan(ctx: Context) -> tuple[Any, dict[str, str]]:
    return {"name": ctx.name, "alias": ctx.cfg.challenger_alias}, {
        "bundle": path_fingerprint(ctx.outputs["export"]["bundle_dir"])
    }


def _register_run(ctx: Context, out_dir: Path) -> dict[str, Any]:
    data = ctx.outputs.get("clean") or ctx.outputs.get("gather") or {}
    tags = {"pipeline_run": ctx.run_id}
    if data:
        tags |= {"dataset": str(data["dataset_dir"]), "dataset_fingerprint": data["fingerprint"]}
    version, created = ctx.registry.register(
        ctx.outputs["export"]["bundle_dir"],
        name=ctx.name,
        description=f"trained by pipeline run {ctx.run_id}",
        tags=tags,
        parent=ctx.champion_ref,
    )
    alias = str(ctx.cfg.challenger_alias)
    ctx.registry.set_alias(ctx.name, alias, version.version,
                           reason=f"challenger of pipeline run {ctx.run_id}")  # fmt: skip
    log.info("registered %s as %s@%s%s", version.ref, ctx.name, alias,
             "" if created else " (the same bundle was registered before)", extra=CONSOLE)  # fmt: skip
    return {"ref": version.ref, "version": version.version, "created": created,
            "path": str(version.path)}  # fmt: skip


STAGES: tuple[Stage, ...] = (
    Stage("gather", _gather_plan, _gather_run),
    Stage("clean", _clean_plan, _clean_run),
    Stage("train", _train_plan, _train_run),
    Stage("evaluate", _evaluate_plan, _evaluate_run),
    Stage("export", _export_plan, _export_run),
    Stage("register", _register_plan, _register_run, cached=False),
)
