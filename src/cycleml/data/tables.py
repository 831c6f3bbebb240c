"""Reading a table file (CSV/TSV, JSONL, Parquet) into columns of plain Python values.

The one table reader of cycleml: the text data module and ``cycleml data gather`` both
read through it. Missing values are ``None``; an empty CSV cell is ``""`` (a CSV has no
null). A missing file, an unknown format, an empty file, an unparsable line and a
missing column are errors that name the file (and the row or column).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cycleml.errors import ConfigError, DataError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
           ".parquet": "parquet", ".pq": "parquet"}  # fmt: skip


def table_format(path: Path, fmt: str | None = None, setting: str = "format") -> str:
    """``fmt``, or the format the file's suffix names; ``setting`` names the option in errors."""
    known = sorted(set(FORMATS.values()))
    chosen = (fmt or FORMATS.get(path.suffix.lower()) or "").lower()
    if chosen not in known:
        raise ConfigError(
            f"{path}: unknown table format {fmt or path.suffix or '(no suffix)'!r}; "
            f"set {setting} to one of {known}"
        )
    return chosen


def read_table(path: Path, fmt: str | None = None, setting: str = "format") -> dict[str, list]:
    """Every column of the table at ``path``, in file order, as Python lists.

    Rows are numbered from 1 in file order (a CSV header and blank JSONL lines are not
    rows). ``setting`` is the config key of the format, for the error that asks for it.
    """
    if not path.is_file():
        raise DataError(f"table not found: {path}")
    chosen = table_format(path, fmt, setting)
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if chosen in ("csv", "tsv"):
        table = _read_delimited(path, "\t" if chosen == "tsv" else ",")
    elif chosen == "jsonl":
        table = _read_jsonl(path)
    else:
        table = _read_parquet(path)
    if not table or not next(iter(table.values()), []):
        raise DataError(f"{path}: the file has no data rows")
    return table


def read_columns(
    path: Path, columns: Sequence[str], fmt: str | None = None, setting: str = "format"
) -> dict[str, list]:
    """The named columns of the table at ``path`` (see :func:`read_table`).

    A missing column is a :class:`DataError` naming the file, the column and the columns
    that exist.
    """
    table = read_table(path, fmt, setting)
    for column in columns:
        if column not in table:
            raise DataError(
                f"{path}: column '{column}' not found; the file has columns {sorted(table)}"
            )
    return {column: table[column] for column in columns}


def _read_delimited(path: Path, sep: str) -> dict[str, list]:
    import pandas as pd

    try:
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[])
    except pd.errors.EmptyDataError as err:
        raise DataError(f"{path}: the file is empty") from err
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable {sep!r}-separated table: {err}") from err
    return {str(c): frame[c].tolist() for c in frame.columns}


def _read_jsonl(path: Path) -> dict[str, list]:
    records: list[dict[str, Any]] = []
    try:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                where = f"{path}: row {len(records) + 1} (line {number})"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{where}: not valid JSON ({err.msg})") from err
                if not isinstance(record, dict):
                    raise DataError(f"{where}: expected a JSON object per line")
                records.append(record)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text: {err}") from err
    keys: dict[str, None] = {}
    for record in records:
        keys.update(dict.fromkeys(record))
    return {key: [r.get(key) for r in records] for key in keys}


def _read_parquet(path: Path) -> dict[str, list]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several unrelated types for bad files
        raise DataError(f"{path}: not a readable Parquet file: {err}") from err
    return {name: table.column(name).to_pylist() for name in table.column_names}
