"""`cycleml monitor [labels] [hydra overrides]`: drift and accuracy reports of the
prediction log, and the attaching of true labels.

Exit status of a report: 0 when the latest window shows no drift, 1 when it drifts
(so cron or a retraining pipeline can act on it), 2 for an error. With count windows
a newest window holding fewer than ``window.size`` predictions is reported, and the
newest complete one decides.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from cycleml.cli_args import as_overrides
from cycleml.errors import ConfigError, DataError
from cycleml.hydra_app import hydra_app

if TYPE_CHECKING:
    from cycleml.monitoring.drift import DriftSettings
    from cycleml.monitoring.run import WindowSettings

COMMANDS = ("report", "labels")
DRIFT_EXIT = 1


def _settings(cfg: DictConfig) -> tuple[WindowSettings, DriftSettings]:
    from cycleml.monitoring.drift import DriftSettings
    from cycleml.monitoring.run import WindowSettings

    try:
        window = WindowSettings(**OmegaConf.to_container(cfg.window, resolve=True))
        drift = DriftSettings(**OmegaConf.to_container(cfg.drift, resolve=True))
    except TypeError as err:
        raise ConfigError(f"monitor settings: {err}") from err
    return window, drift


def run_report(cfg: DictConfig) -> int:
    # the statistics and plotting stack loads when a report starts, not for --help
    from cycleml.monitoring.log import PredictionLog
    from cycleml.monitoring.report import write_report
    from cycleml.monitoring.run import monitor, resolve_target

    window, drift = _settings(cfg)
    target = resolve_target(
        cfg.ref, cfg.registry.root, cfg.registry.db_url, cfg.log_model, cfg.log_version
    )
    prediction_log = PredictionLog(cfg.db_url, must_exist=True)
    try:
        report = monitor(target, prediction_log, window, drift)
    finally:
        prediction_log.close()
    json_path, html_path = write_report(report, Path(cfg.out_dir))
    if cfg.format == "json":
        print(json.dumps({k: report[k] for k in ("model", "version", "drift", "gauges", "notes")}
                         | {"report": str(json_path), "html": str(html_path)}, indent=2))  # fmt: skip
    else:
        _print_summary(report, html_path)
    return DRIFT_EXIT if report["drift"] else 0


def _print_summary(report: dict, html_path: Path) -> None:
    print(f"{report['model']} {report['version']}: {report['rows']} logged predictions, "
          f"{len(report['windows'])} windows ({report['window_rule']})")  # fmt: skip
    for note in report["notes"]:
        print(f"note: {note}")
    for w in report["windows"]:
        perf = w["performance"]
        estimated = perf["estimated_accuracy"]
        line = (f"  window {w['index']}: {w['rows']} rows, "
                f"{'DRIFT (' + ', '.join(w['drifted']) + ')' if w['drift'] else 'no drift'}")  # fmt: skip
        if w["index"] != report["decided_by"] and w.get("partial"):
            line += " (partial: not used for the verdict)"
        if estimated is not None:
            line += f", estimated accuracy {estimated:.3f}"
        if perf["accuracy"] is not None:
            line += f", realised {perf['accuracy']:.3f} on {perf['labelled']} labels"
        print(line)
        for feature, reason in w["skipped"].items():
            print(f"    skipped {feature}: {reason}")
        for feature, count in w.get("left_out", {}).items():
            print(f"    {feature}: {count} of {w['rows']} rows have no finite value "
                  "(NaN, infinite or not logged) and were left out of its test")  # fmt: skip
    print(f"report: {html_path}")


def run_labels(cfg: DictConfig) -> int:
    from cycleml.data.tables import read_columns
    from cycleml.monitoring.log import PredictionLog
    from cycleml.monitoring.tables import text_problem

    if not cfg.input:
        raise ConfigError("monitor labels needs input=<table with request_id and label columns>")
    columns = read_columns(
        Path(cfg.input), ["request_id", "label"], cfg.input_format, "input_format"
    )
    pairs, missing = [], 0
    rows = zip(columns["request_id"], columns["label"], strict=True)
    for row, (request_id, label) in enumerate(rows, start=1):
        if request_id in (None, "") or label in (None, ""):
            missing += 1
            continue
        pair = (str(request_id), str(label))
        for field, value in zip(("request_id", "label"), pair, strict=True):
            problem = text_problem(field, value)
            if problem:  # refused whole: a database would refuse it, or cut it silently
                raise DataError(f"{cfg.input}: row {row}: {problem}; nothing was attached")
        pairs.append(pair)
    # a request id given again: its last label counts, and the rows it overrides are
    # counted (they would otherwise be in neither attached nor unknown)
    repeated = len(pairs) - len({request_id for request_id, _ in pairs})
    if not pairs:
        raise DataError(f"{cfg.input}: no row has both a request_id and a label")
    prediction_log = PredictionLog(cfg.db_url, must_exist=True)
    try:
        result = prediction_log.attach_labels(pairs)
    finally:
        prediction_log.close()
    summary = {
        **result.to_dict(),
        "rows_without_id_or_label": missing,
        "rows_overridden_by_a_later_row": repeated,
    }
    if cfg.format == "json":
        print(json.dumps(summary, indent=2))
    else:
        print(f"attached {result.attached} labels from {cfg.input}")
        if result.unknown:
            examples = ", ".join(result.unknown_examples)
            print(f"{result.unknown} request ids match no logged prediction (e.g. {examples})",
                  file=sys.stderr)  # fmt: skip
        if missing:
            print(f"{missing} rows lack a request_id or a label", file=sys.stderr)
        if repeated:
            print(f"{repeated} rows repeat the request_id of a later row, whose label was "
                  "attached instead", file=sys.stderr)  # fmt: skip
    return 0


@hydra_app("monitor")
def app(cfg: DictConfig) -> None:
    if cfg.command not in COMMANDS:
        raise ConfigError(f"command={cfg.command!r}: expected one of {', '.join(COMMANDS)}")
    if cfg.format not in ("text", "json"):
        raise ConfigError(f"format={cfg.format!r}: expected text or json")
    status = run_labels(cfg) if cfg.command == "labels" else run_report(cfg)
    if status:
        raise SystemExit(status)  # drift: the one outcome that is neither success nor error


def monitor_overrides(args: list[str]) -> list[str]:
    """The Hydra overrides of ``cycleml monitor [labels] <args>``: the sub-command as
    ``command=``, a plain model reference as ``ref=``."""
    if args and args[0] in COMMANDS:
        args = [f"command={args[0]}", *args[1:]]
    return as_overrides(args, ["ref"])


def main() -> None:
    sys.argv = ["cycleml monitor", *monitor_overrides(sys.argv[1:])]
    app()


if __name__ == "__main__":
    main()
