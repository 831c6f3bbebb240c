"""When a pipeline launch goes on to train: always, on drift, or on enough new labels."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cycleml.errors import ConfigError

log = logging.getLogger(__name__)

TRIGGERS = ("always", "drift", "labels")


@dataclass
class TriggerResult:
    """Whether to go on, why, and the figures behind it (kept in state.json)."""

    fire: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] | None = None  # the monitor's report (trigger=drift)


def check_trigger_name(trigger: str) -> str:
    if trigger not in TRIGGERS:
        raise ConfigError(f"trigger={trigger!r}: expected one of {', '.join(TRIGGERS)}")
    return trigger


def drift_trigger(cfg: DictConfig, champion_ref: str | None) -> TriggerResult:
    """``cycleml monitor <champion>``'s verdict on the latest window, in process.

    Without a champion there is nothing to drift from: the launch goes on (a first
    model is needed).
    """
    if champion_ref is None:
        return TriggerResult(True, "no champion yet: nothing to measure drift against")
    from cycleml.monitoring.drift import DriftSettings
    from cycleml.monitoring.log import PredictionLog
    from cycleml.monitoring.run import WindowSettings, monitor, resolve_target

    try:
        window = WindowSettings(**OmegaConf.to_container(cfg.monitor.window, resolve=True))
        drift = DriftSettings(**OmegaConf.to_container(cfg.monitor.drift, resolve=True))
    except TypeError as err:
        raise ConfigError(f"monitor settings: {err}") from err
    target = resolve_target(champion_ref, cfg.registry.root, cfg.registry.db_url)
    prediction_log = PredictionLog(cfg.monitor.db_url, must_exist=True)
    try:
        report = monitor(target, prediction_log, window, drift)
    finally:
        prediction_log.close()
    decided = [w for w in report["windows"] if w["index"] == report["decided_by"]]
    latest = decided[0] if decided else None
    # with count windows a partial newest window is reported, the newest complete decides
    which = "latest" if latest is None or latest is report["windows"][-1] else "latest complete"
    details = {
        "model": report["model"],
        "version": report["version"],
        "rows": report["rows"],
        "windows": len(report["windows"]),
        "drifted": latest["drifted"] if latest else [],
        "notes": report["notes"],
    }
    if report["drift"]:
        features = ", ".join(details["drifted"]) or "see the report"
        return TriggerResult(
            True, f"{champion_ref} drifts in its {which} window ({features})", details, report
        )
    return TriggerResult(
        False,
        f"{champion_ref}: no drift in the {which} of {len(report['windows'])} window(s) "
        f"({report['rows']} logged predictions)",
        details,
        report,
    )


def labels_trigger(
    dataset_dir: Path, champion_dataset: Path | None, minimum: int, champion_ref: str | None
) -> TriggerResult:
    """Enough labelled items in ``dataset_dir`` that the champion was not trained on?

    Items are compared by content hash and label, so that a relabelled item counts as
    new and the same image gathered again does not.
    """
    from cycleml.data.manifest import read_dataset

    current = read_dataset(dataset_dir).manifest
    labelled = current[current["label"].notna()]
    keys = set(zip(labelled["content_hash"], labelled["label"], strict=True))
    if champion_dataset is None:
        known: set[tuple[str, str]] = set()
        basis = (
            "no champion yet"
            if champion_ref is None
            else f"the training data of {champion_ref} is not reachable"
        )
    else:
        old = read_dataset(champion_dataset).manifest
        known = set(zip(old["content_hash"], old["label"], strict=True))
        basis = f"compared with {champion_ref}'s training data {champion_dataset}"
    new = len(keys - known)
    details = {"new_labelled": new, "labelled": len(keys), "min_new_labels": minimum,
               "basis": basis}  # fmt: skip
    if new >= minimum:
        return TriggerResult(True, f"{new} new labelled item(s) ({basis})", details)
    return TriggerResult(
        False, f"only {new} new labelled item(s), fewer than min_new_labels={minimum} ({basis})",
        details,
    )  # fmt: skip


def training_dataset_of(record: Any) -> Path | None:
    """The dataset folder a registered version was trained on, when it can be found:
    the ``dataset`` tag a pipeline sets, else the training run's saved config."""
    tagged = (record.tags or {}).get("dataset")
    if tagged and (Path(tagged) / "manifest.parquet").is_file():
        return Path(tagged)
    meta_file = Path(record.path) / "bundle.json"
    try:
        source = json.loads(meta_file.read_text(encoding="utf-8")).get("source") or {}
    except (OSError, ValueError):
        return None
    checkpoint = source.get("checkpoint")
    if not checkpoint:
        return None
    run_dir = Path(checkpoint).parent.parent
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        return None
    path = OmegaConf.select(OmegaConf.load(saved), "data.path")
    if path and (Path(path) / "manifest.parquet").is_file():
        return Path(path)
    return None
