"""A training checkpoint → a model bundle: rebuild the network and its validation data."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import numpy as np

from cycleml.errors import ConfigError
from cycleml.export.exporter import ExportSettings, check_target, export_bundle
from cycleml.export.naming import bundle_name
from cycleml.inference.bundle import ModelBundle
from cycleml.inference.preprocess import TextPreprocessor

log = logging.getLogger(__name__)


def export_checkpoint(
    ckpt_path: str | Path,
    out_dir: str | Path | None = None,
    bundles_dir: str | Path = "bundles",
    name: str | None = None,
    version: str | None = None,
    settings: ExportSettings | None = None,
) -> ModelBundle:
    """Export a ``cycleml train`` checkpoint (or run folder) as a verified bundle.

    The validation split is rebuilt from the data config saved in the checkpoint;
    training metrics come from the run's ``summary.json`` when there is one. Without
    ``out_dir`` the bundle goes to ``<bundles_dir>/<name>/<version>``, the version
    being the next free integer there.
    """
    from cycleml.models.module import ClassifierModule
    from cycleml.training.evaluate import resolve_checkpoint

    settings = settings or ExportSettings()
    ckpt = resolve_checkpoint(str(ckpt_path))
    module = ClassifierModule.from_checkpoint(ckpt)
    spec: dict[str, Any] = dict(module.hparams.get("data_spec") or {})
    class_names = [str(c) for c in module.hparams.get("class_names") or []]
    data_config = spec.get("data_config")
    if not data_config or not class_names:
        raise ConfigError(f"checkpoint '{ckpt}' lacks data_spec.data_config or class_names")
    name = name or bundle_name(data_config, _run_dir(ckpt))
    version = version or next_version(Path(bundles_dir) / name)
    target = Path(out_dir) if out_dir else Path(bundles_dir) / name / version
    check_target(target, settings.overwrite)  # before the validation data is rebuilt
    inputs, labels = validation_split(data_config, spec)
    summary = _run_summary(ckpt)
    metrics = {k: v for k, v in (summary.get("metrics") or {}).items() if _is_number(v)}
    return export_bundle(
        module.net,
        spec,
        class_names,
        target,
        val_inputs=inputs,
        val_labels=labels,
        name=name,
        version=version,
        run_id=module.hparams.get("run_id"),
        metrics=metrics,
        source={"checkpoint": str(ckpt), "git_commit": summary.get("git_commit")},
        settings=settings,
    )


def validation_split(data_config: Any, spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The validation split in the bundle's input format, with labels.

    Images come as the data module's uint8 NHWC arrays; texts are tokenized from the
    raw validation texts exactly as the bundle will tokenize them at inference time.
    """
    datamodule = hydra.utils.instantiate(data_config)
    datamodule.setup()
    if spec.get("kind") == "image":
        images, labels = datamodule.split_arrays("val")
        return np.ascontiguousarray(images, dtype=np.uint8), np.asarray(labels, dtype=np.int64)
    if spec.get("kind") == "text":
        tokenize = TextPreprocessor.from_json(
            str(spec["tokenizer_json"]), int(spec["max_length"]), int(spec["pad_id"])
        )
        texts = datamodule.split_texts("val")
        return tokenize(texts), np.asarray(datamodule.split_labels("val"), dtype=np.int64)
    raise ConfigError(f"checkpoint data_spec kind={spec.get('kind')!r}: expected image or text")


def next_version(model_dir: Path) -> str:
    """One more than the highest numeric version folder in ``model_dir`` (``1`` if none),
    so a bundles folder is a model repository ``<name>/<version>/`` that serves as is."""
    numbers = [int(p.name) for p in model_dir.glob("*") if p.is_dir() and p.name.isdigit()]
    return str(max(numbers, default=0) + 1)


def _run_dir(ckpt: Path) -> Path:
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def _run_summary(ckpt: Path) -> dict[str, Any]:
    path = _run_dir(ckpt) / "summary.json"
    if not path.is_file():
        log.info("no summary.json next to %s; the bundle records no training metrics", ckpt)
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
