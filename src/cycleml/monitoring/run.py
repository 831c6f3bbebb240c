"""One monitoring run: resolve the model, read its log, cut windows, test, report."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cycleml.errors import ConfigError
from cycleml.inference.bundle import META_FILE, ModelBundle, load_bundle
from cycleml.monitoring.drift import DriftSettings
from cycleml.monitoring.log import PredictionLog
from cycleml.monitoring.monitor import (
    evaluate,
    fallback_reference,
    gauge_values,
    reference_notes,
)
from cycleml.monitoring.reference import load_reference_sample
from cycleml.monitoring.windows import BY, count_windows, parse_duration, time_windows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WindowSettings:
    """The ``window`` node of ``configs/monitor.yaml``."""

    by: str = "count"
    size: int = 500
    duration: str = "1h"
    start: str | None = None
    end: str | None = None
    # only the newest ``last`` windows (null: all)
    last: int | None = None

    def __post_init__(self) -> None:
        if self.by not in BY:
            raise ConfigError(f"window.by={self.by!r}: expected one of {', '.join(BY)}")
        if self.last is not None and self.last < 1:
            raise ConfigError(f"window.last={self.last}: expected a positive number or null")

    def rule(self) -> str:
        return f"{self.size} predictions each" if self.by == "count" else f"{self.duration} each"


@dataclass(frozen=True)
class ModelTarget:
    """The bundle to compare with and the name and version its predictions are logged as."""

    bundle: ModelBundle
    model: str
    version: str
    source: dict[str, Any] = field(default_factory=dict)


def resolve_target(
    ref: str,
    registry_root: str | Path,
    registry_db_url: str | None = None,
    log_model: str | None = None,
    log_version: str | None = None,
) -> ModelTarget:
    """A bundle folder, or a registry reference (``digits``, ``digits/3``,
    ``digits@champion``) resolved with :meth:`cycleml.registry.Registry.resolve`: its
    predictions are logged under the registered name and version number."""
    if not ref:
        raise ConfigError(
            "monitor needs a model: cycleml monitor <name | name/version | name@alias | bundle "
            "folder> (or ref=...)"
        )
    path = Path(ref)
    if (path / META_FILE).is_file() or (path.name == META_FILE and path.is_file()):
        bundle = load_bundle(path)
        model, version = bundle.meta.name, bundle.meta.version
        source = {"bundle": str(bundle.path)}
    else:
        from cycleml.registry.model_registry import DB_FILE, Registry

        root = Path(registry_root)
        if registry_db_url is None and not (root / DB_FILE).is_file():
            # opening a registry would create one: say what is missing instead
            raise ConfigError(
                f"'{ref}' is not a bundle folder, and there is no registry at '{root}' to "
                "look it up in (set registry.root=<folder> or name a bundle folder)"
            )
        registry = Registry(registry_db_url, root, must_exist=True)
        try:
            folder, record = registry.resolve(ref)
        finally:
            registry.close()
        bundle = load_bundle(folder)
        model, version = record.name, str(record.version)
        source = {"registry": record.ref, "bundle": str(folder)}
    return ModelTarget(bundle, log_model or model, str(log_version or version), source)


def monitor(
    target: ModelTarget,
    prediction_log: PredictionLog,
    windows: WindowSettings,
    drift: DriftSettings,
) -> dict[str, Any]:
    """The report of one run (a JSON-ready dict); ``report["drift"]`` is the verdict of
    the latest window, or with count windows of the latest complete one
    (``report["decided_by"]``)."""
    meta = target.bundle.meta
    logged_versions = prediction_log.versions(target.model)
    if target.version not in logged_versions:
        have = ", ".join(f"{v} ({n})" for v, n in sorted(logged_versions.items())) or "none"
        raise ConfigError(
            f"no logged predictions for model '{target.model}' version '{target.version}' "
            f"(logged versions of '{target.model}': {have})"
        )
    start, end = _time(windows.start, "window.start"), _time(windows.end, "window.end")
    rows = prediction_log.read(target.model, target.version, start=start, end=end)
    if windows.by == "count":
        cut = count_windows(rows, windows.size)
    else:
        cut = time_windows(rows, parse_duration(windows.duration), start, end)
    # a newest count window with fewer than window.size predictions is reported, but the
    # newest complete one decides (a few rows would skip the tests or lack their power)
    partial = windows.by == "count" and bool(cut) and len(cut[-1].rows) < windows.size
    if windows.last is not None:
        cut = cut[-(windows.last + partial) :]
    deciding = len(cut) - 2 if partial and len(cut) > 1 else len(cut) - 1
    reference = load_reference_sample(target.bundle)
    notes = reference_notes(meta, reference)
    if reference is None:
        reference = fallback_reference(meta)
    if not cut:
        notes.append(
            f"no logged predictions of {target.model} {target.version} between "
            f"{windows.start or 'the first'} and {windows.end or 'the last'}: no window to test"
        )
    results = evaluate(cut, reference, meta, drift)
    for result in results:
        result["partial"] = False
    if partial:
        results[-1]["partial"] = True
        held = f"window {cut[-1].index} holds {len(cut[-1].rows)} of {windows.size} predictions"
        if deciding != len(cut) - 1:
            notes.append(
                f"{held}: reported, not used for the verdict (window "
                f"{cut[deciding].index}, the newest complete one, decides)"
            )
        else:
            notes.append(f"{held}, and no window is complete: it decides the verdict")
    report: dict[str, Any] = {
        "model": target.model,
        "version": target.version,
        "source": target.source,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "class_names": list(meta.class_names),
        "window_rule": windows.rule(),
        "windows_settings": asdict(windows),
        "drift_settings": asdict(drift),
        "alpha": drift.alpha,
        "correction": drift.correction,
        "reference_rows": 0 if reference is None else len(reference),
        "calibration": meta.calibration,
        "rows": len(rows),
        "notes": notes,
        "windows": results,
        # the index of the window whose verdict is the report's (None: no window)
        "decided_by": cut[deciding].index if cut else None,
        "drift": bool(results and results[deciding]["drift"]),
    }
    report["gauges"] = gauge_values(report)
    return report


def _time(value: str | None, setting: str) -> dt.datetime | None:
    if value in (None, ""):
        return None
    try:
        parsed = dt.datetime.fromisoformat(str(value))
    except ValueError as err:
        raise ConfigError(
            f"{setting}={value!r} is not an ISO time (e.g. 2026-11-29T18:00)"
        ) from err
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)
