"""Reading and checking text tables (CSV/TSV, JSONL, Parquet) row by row.

One row is one example: a text column, a label column (class names or class ids) and
optionally a split column (train/val/test) and an id column. Every problem with a row
is a :class:`BadRow` naming the file, the row and the column; nothing is dropped
without being reported. Rows are numbered from 1 in file order (the CSV header and
blank JSONL lines are not rows). The file itself is read by :mod:`cycleml.data.tables`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cycleml.data.tables import read_columns
from cycleml.errors import ConfigError, DataError

log = logging.getLogger(__name__)

_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val",
                  "dev": "val", "test": "test"}  # fmt: skip
# how many bad rows an error message or a warning lists before "... and N more"
_LISTED = 20


@dataclass(frozen=True)
class BadRow:
    """A row that cannot be used, and why."""

    file: str
    row: int
    column: str
    problem: str

    def __str__(self) -> str:
        return f"{self.file}: row {self.row}, column '{self.column}': {self.problem}"


@dataclass
class TextRows:
    """The usable rows of a table, in file order, and the rows that were not usable."""

    rows: list[int]
    ids: list[str]
    texts: list[str]
    labels: list[int]
    splits: list[str] | None
    class_names: list[str]
    bad_rows: list[BadRow]


def parse_rows(
    path: Path,
    text_column: str,
    label_column: str,
    split_column: str | None = None,
    id_column: str | None = None,
    class_names: Sequence[str] | None = None,
    fmt: str | None = None,
) -> TextRows:
    """Read a text table and check every row; bad rows are returned, not dropped."""
    wanted = [c for c in (text_column, label_column, split_column, id_column) if c]
    table = read_columns(path, wanted, fmt, setting="data.format")
    name = str(path)
    count = len(table[text_column])
    bad: list[BadRow] = []
    good: list[int] = []
    for i, text in enumerate(table[text_column]):
        row = i + 1
        problems = len(bad)
        if text is None or (isinstance(text, float) and math.isnan(text)):
            bad.append(BadRow(name, row, text_column, "missing text"))
        elif not str(text).strip():
            bad.append(BadRow(name, row, text_column, "empty text"))
        if _is_missing(table[label_column][i]):
            bad.append(BadRow(name, row, label_column, "missing label"))
        if split_column and _split_of(table[split_column][i]) is None:
            value = table[split_column][i]
            bad.append(BadRow(name, row, split_column,
                              f"unknown split {value!r}; expected train, val or test"))  # fmt: skip
        if len(bad) == problems:
            good.append(i)
    ids = [str(v) if not _is_missing(v) else None for v in table[id_column]] if id_column else None
    if ids is not None:
        seen: set[str] = set()
        for i in list(good):
            if ids[i] is None or ids[i] in seen:
                problem = "missing id" if ids[i] is None else f"duplicate id {ids[i]!r}"
                bad.append(BadRow(name, i + 1, id_column or "", problem))
                good.remove(i)
            else:
                seen.add(ids[i])
    raw_labels = [table[label_column][i] for i in good]
    names, label_of = _label_mapping(raw_labels, class_names, name)
    labels: list[int] = []
    kept: list[int] = []
    for i, raw in zip(good, raw_labels, strict=True):
        label = label_of(raw)
        if label is None:
            bad.append(BadRow(name, i + 1, label_column,
                              f"unknown label {raw!r}; expected one of {names}"))  # fmt: skip
        else:
            kept.append(i)
            labels.append(label)
    bad.sort(key=lambda b: b.row)
    log.info("%s: %d rows, %d usable, %d bad", name, count, len(kept), len({b.row for b in bad}))
    return TextRows(
        rows=[i + 1 for i in kept],
        ids=[ids[i] for i in kept] if ids is not None else [str(i + 1) for i in kept],
        texts=[str(table[text_column][i]) for i in kept],
        labels=labels,
        splits=[_split_of(table[split_column][i]) for i in kept] if split_column else None,
        class_names=names,
        bad_rows=bad,
    )


def _is_missing(value: Any) -> bool:
    """No value: null, NaN, or an empty / blank cell."""
    return (
        value is None
        or (isinstance(value, float) and math.isnan(value))
        or (isinstance(value, str) and not value.strip())
    )


def _split_of(value: Any) -> str | None:
    return _SPLIT_ALIASES.get(str(value).strip().lower()) if not _is_missing(value) else None


def _as_id(value: Any) -> int | None:
    """A class id written as an int (or an integral float, or a string of digits)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _label_mapping(
    raw: list[Any], class_names: Sequence[str] | None, file: str
) -> tuple[list[str], Callable[[Any], int | None]]:
    """Class names in order, and a function from a raw label to its class id."""
    if class_names:
        names = [str(n) for n in class_names]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.class_names has duplicates: {names}")
        index = {n: i for i, n in enumerate(names)}

        def by_name_or_id(value: Any) -> int | None:
            text = str(value).strip()
            if text in index:
                return index[text]
            as_id = _as_id(value)
            return as_id if as_id is not None and 0 <= as_id < len(names) else None

        return names, by_name_or_id
    ids = [_as_id(v) for v in raw]
    if raw and all(i is not None for i in ids):
        present = sorted(set(ids))  # type: ignore[type-var]
        if present[0] < 0 or present != list(range(present[-1] + 1)):
            raise DataError(
                f"{file}: label ids must be 0..K-1 with every id present; found {present}. "
                f"Give the class names in order with data.class_names."
            )
        return [str(i) for i in present], lambda v: _as_id(v)
    names = sorted({str(v).strip() for v in raw})
    index = {n: i for i, n in enumerate(names)}
    return names, lambda v: index.get(str(v).strip())


def report_bad_rows(bad: Sequence[BadRow], policy: str, what: str) -> None:
    """Stop on bad rows (``error``) or list them in the log (``skip``)."""
    if not bad:
        return
    rows = len({(b.file, b.row) for b in bad})
    listed = "\n  ".join(str(b) for b in bad[:_LISTED])
    more = f"\n  ... and {len(bad) - _LISTED} more" if len(bad) > _LISTED else ""
    if policy == "error":
        raise DataError(
            f"{rows} bad row(s) in {what}:\n  {listed}{more}\n"
            f"Fix them, or set data.bad_rows=skip to leave them out (they are listed in the log)."
        )
    log.warning("leaving out %d bad row(s) of %s:\n  %s%s", rows, what, listed, more)
