"""`cycleml compare <folder>`: a leaderboard of the runs (or sweep trials) under a folder.

A Hydra app on ``configs/compare.yaml`` like every command (``folder=… sort=…``,
``--cfg job``, ``--help``); the plain form ``cycleml compare logs/train --sort val/f1
--metrics test/acc,val/f1 --ascending --out x.csv`` is translated into those overrides.
"""

from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig

from cycleml.cli_args import as_overrides
from cycleml.errors import ConfigError, DataError
from cycleml.hydra_app import hydra_app
from cycleml.training.summary import SUMMARY, read_json

log = logging.getLogger(__name__)

ID_COLUMNS = ("run_id", "model", "data", "fingerprint", "finished_at")
DEFAULT_SORT = ("test/acc", "val/acc_best", "val/acc")


def collect_runs(folder: Path) -> list[dict[str, Any]]:
    """One row per ``summary.json`` under ``folder``: ids, metrics and the run's folder."""
    rows = []
    for path in sorted(folder.rglob(SUMMARY)):
        summary = read_json(path)
        if not summary:
            log.warning("skipping unreadable %s", path)
            continue
        row: dict[str, Any] = {
            "run_id": summary.get("run_id"),
            "model": summary.get("model"),
            "data": summary.get("data"),
            "fingerprint": summary.get("dataset_fingerprint"),
            "finished_at": summary.get("finished_at"),
        }
        row.update(summary.get("metrics", {}))
        row["run_dir"] = str(path.parent)
        rows.append(row)
    return rows


def metric_columns(rows: list[dict[str, Any]], wanted: list[str] | None) -> list[str]:
    present = {k for row in rows for k in row if "/" in k}
    if wanted:
        missing = [m for m in wanted if m not in present]
        if missing:
            raise ConfigError(f"unknown metric(s) {missing}; available: {sorted(present)}")
        return wanted
    stages = ("test/", "val/")
    return sorted(
        (m for m in present if m.startswith(stages) and not m.endswith("_step")),
        key=lambda m: (stages.index(m[: m.index("/") + 1]), m),
    )


def sort_rows(rows: list[dict[str, Any]], key: str | None, ascending: bool) -> str | None:
    if key is None:
        key = next((k for k in DEFAULT_SORT if any(k in row for row in rows)), None)
    if key is None:
        return None
    missing = [r for r in rows if r.get(key) is None]
    present = [r for r in rows if r.get(key) is not None]
    present.sort(key=lambda r: r[key], reverse=not ascending)
    rows[:] = present + missing
    return key


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        return "" if value is None else str(value)

    body = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [
        max(len(c), *(len(r[i]) for r in body)) if body else len(c) for i, c in enumerate(columns)
    ]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], columns: list[str], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _sweep_table(folder: Path) -> bool:
    """Show a sweep's trials when ``folder`` is a sweep; True if it was one."""
    try:
        from cycleml.sweeps.results import load_sweep, plot_sweep
    except ImportError:
        return False
    table = load_sweep(folder)
    if table is None:
        return False
    print(table.to_string(index=False))
    print(f"\nleaderboard: {folder / 'leaderboard.csv'}")
    print(f"plot: {plot_sweep(folder, table)}")
    return True


def run_compare(
    folder: Path,
    sort: str | None = None,
    ascending: bool = False,
    metrics: list[str] | None = None,
    out: Path | None = None,
) -> Path:
    """Print the leaderboard of the runs (or the sweep) under ``folder`` and write it
    as CSV (default ``<folder>/leaderboard.csv``); returns the CSV's path."""
    if not folder.is_dir():
        raise DataError(f"'{folder}' is not a folder")
    if out is None and _sweep_table(folder):
        return folder / "leaderboard.csv"
    rows = collect_runs(folder)
    if not rows:
        raise DataError(f"no runs ({SUMMARY}) under '{folder}'")
    columns_shown = metric_columns(rows, metrics)
    if sort and sort not in columns_shown:
        raise ConfigError(f"cannot sort by '{sort}'; columns: {columns_shown}")
    key = sort_rows(rows, sort, ascending)
    columns = [*ID_COLUMNS[:3], *columns_shown, "fingerprint", "run_dir"]
    print(format_table(rows, [*ID_COLUMNS[:3], *columns_shown, "fingerprint"]))
    out = out or folder / "leaderboard.csv"
    write_csv(rows, columns, out)
    print(f"\n{len(rows)} run(s), sorted by {key or 'folder'}; written to {out}")
    return out


def _metric_list(value: Any) -> list[str] | None:
    """``metrics``: a list, or one comma-separated string (``--metrics a,b``)."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, ListConfig)):
        return [str(v) for v in value]
    return [m for m in str(value).split(",") if m]


@hydra_app("compare")
def compare_app(cfg: DictConfig) -> Path:
    return run_compare(
        Path(str(cfg.folder)),
        sort=None if cfg.sort is None else str(cfg.sort),
        ascending=bool(cfg.ascending),
        metrics=_metric_list(cfg.metrics),
        out=None if cfg.out is None else Path(str(cfg.out)),
    )


def main(argv: list[str] | None = None) -> None:
    """``cycleml compare``: plain arguments become overrides, then the Hydra app runs."""
    args = list(sys.argv[1:] if argv is None else argv)
    overrides = as_overrides(
        args, ["folder"], {"--sort": "sort", "--metrics": "metrics", "--out": "out"},
        {"--ascending": "ascending"},
    )  # fmt: skip
    sys.argv = ["cycleml compare", *overrides]
    compare_app()


if __name__ == "__main__":
    main()
