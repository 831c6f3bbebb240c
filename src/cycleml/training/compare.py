"""`cycleml compare <folder>`: a leaderboard of the runs (or sweep trials) under a folder."""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path
from typing import Any

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
            raise SystemExit(
                f"cycleml compare: unknown metric(s) {missing}; available: {sorted(present)}"
            )
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="cycleml compare",
        description="Leaderboard of the runs (summary.json) or the sweep under a folder.",
    )
    parser.add_argument(
        "folder", type=Path, help="a log folder, e.g. logs/train, or a sweep folder"
    )
    parser.add_argument("--sort", help="metric to sort by (default: test/acc, else val/acc)")
    parser.add_argument("--ascending", action="store_true", help="smallest first (for losses)")
    parser.add_argument("--metrics", help="comma-separated metric columns (default: all val/test)")
    parser.add_argument("--out", type=Path, help="CSV path (default: <folder>/leaderboard.csv)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    if not args.folder.is_dir():
        raise SystemExit(f"cycleml compare: '{args.folder}' is not a folder")
    if args.out is None and _sweep_table(args.folder):
        return
    rows = collect_runs(args.folder)
    if not rows:
        raise SystemExit(f"cycleml compare: no runs ({SUMMARY}) under '{args.folder}'")
    metrics = metric_columns(rows, args.metrics.split(",") if args.metrics else None)
    if args.sort and args.sort not in metrics:
        raise SystemExit(f"cycleml compare: cannot sort by '{args.sort}'; columns: {metrics}")
    key = sort_rows(rows, args.sort, args.ascending)
    columns = [*ID_COLUMNS[:3], *metrics, "fingerprint", "run_dir"]
    print(format_table(rows, [*ID_COLUMNS[:3], *metrics, "fingerprint"]))
    out = args.out or args.folder / "leaderboard.csv"
    write_csv(rows, columns, out)
    print(f"\n{len(rows)} run(s), sorted by {key or 'folder'}; written to {out}")


if __name__ == "__main__":
    main()
