"""Streaming readers of prediction inputs: an image folder, or a CSV/TSV, JSONL or
Parquet table. Each yields :class:`InputItem` one at a time, never the whole set."""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cycleml.batch.keys import key_bytes, storable_key
from cycleml.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
TABLE_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_CHUNK_ROWS = 4096


@dataclass(frozen=True)
class InputItem:
    """One input: its key (stable across runs) and its value (the text, or the image
    file's path); or the reason it cannot be read (it then goes to the errors table).
    ``original_key`` holds the exact key's bytes when ``key`` is an escaped form of it
    (see :mod:`cycleml.batch.keys`)."""

    key: str
    value: str | None
    error: str | None = None
    original_key: bytes | None = None

    @classmethod
    def make(cls, key: str, value: str | None, error: str | None = None) -> InputItem:
        """An item whose key the database can store: a key that needs escaping makes
        the item an error, whatever its value."""
        stored = storable_key(key)
        if stored.problem is not None:
            return cls(stored.text, None, stored.problem, stored.original)
        return cls(key, value, error)


@dataclass(frozen=True)
class Shard:
    """``shard=i/n``: this run takes the keys whose CRC-32 is ``i`` modulo ``n``."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str | None) -> Shard:
        if text in (None, ""):
            return cls()
        try:
            index, count = (int(part) for part in str(text).split("/"))
        except ValueError:
            raise ConfigError(f"shard={text!r}: expected i/n, e.g. shard=0/4") from None
        if count < 1 or not 0 <= index < count:
            raise ConfigError(f"shard={text!r}: need 0 <= i < n")
        return cls(index, count)

    def owns(self, key: str) -> bool:
        return self.count == 1 or zlib.crc32(key_bytes(key)) % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


class InputSource:
    """The inputs at ``path`` for a model of ``kind`` (``image`` or ``text``).

    * a folder: every image file below it (sorted, recursive; links to folders are
      not followed); key = relative path; other files are counted in
      :attr:`ignored` and reported;
    * a table: one row per input; the value is the ``text_field`` column (text
      models) or the ``image_field`` column, a path relative to the table (image
      models); key = the ``key_field`` column, else the 1-based row number.
    """

    def __init__(
        self,
        path: str | Path,
        kind: str,
        text_field: str = "text",
        image_field: str = "image",
        key_field: str | None = None,
        input_format: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.kind = kind
        self.text_field = text_field
        self.image_field = image_field
        self.key_field = key_field
        self.ignored = 0
        if not self.path.exists():
            raise DataError(f"input '{self.path}' does not exist")
        if self.path.is_dir():
            if kind != "image":
                raise ConfigError(
                    f"input '{self.path}' is a folder, but a {kind} model reads a table "
                    "(CSV, TSV, JSONL or Parquet)"
                )
            self.format = "folder"
        else:
            self.format = input_format or TABLE_FORMATS.get(self.path.suffix.lower(), "")
            if self.format not in set(TABLE_FORMATS.values()):
                raise ConfigError(
                    f"input '{self.path}': unknown format; use a folder of images or a "
                    f"{', '.join(sorted(TABLE_FORMATS))} file (or set input_format)"
                )
        self.value_field = text_field if kind == "text" else image_field

    def total(self) -> int | None:
        """Number of inputs when known without reading them (Parquet), else None."""
        if self.format == "parquet":
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(self.path).metadata.num_rows)
        return None

    def __iter__(self) -> Iterator[InputItem]:
        if self.format == "folder":
            return self._folder()
        return self._table()

    # -- image folder ------------------------------------------------------------------
    def _folder(self) -> Iterator[InputItem]:
        self.ignored = 0
        yield from self._walk(str(self.path), "")

    def _walk(self, directory: str, prefix: str) -> Iterator[InputItem]:
        """Image files below ``directory`` in sorted order; keys are '/'-joined relative
        paths (built as strings: this runs once per input)."""
        try:
            with os.scandir(directory) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as err:
            raise DataError(f"cannot list the input folder '{directory}': {err}") from err
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(entry.path, f"{prefix}{entry.name}/")
            elif entry.is_dir():
                log.debug("link to a folder, not followed: %s", entry.path)
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                # whether it is a regular file is checked when it is read
                yield InputItem.make(prefix + entry.name, entry.path)
            else:
                self.ignored += 1
                log.debug("not an image file, ignored: %s", entry.path)

    # -- tables ------------------------------------------------------------------------
    def _table(self) -> Iterator[InputItem]:
        rows = self._jsonl_rows() if self.format == "jsonl" else self._columnar_rows()
        for number, row in rows:
            yield self._item(number, row)

    def _item(self, number: int, row: dict[str, Any] | str) -> InputItem:
        # without a key column the row number is the key; with one, a row lacking
        # its key is recorded under "row-<number>"
        fallback = str(number) if self.key_field is None else f"row-{number}"
        if isinstance(row, str):  # a line that is not a JSON object
            return InputItem(fallback, None, row)
        key = fallback
        if self.key_field is not None:
            raw_key = row.get(self.key_field)
            if raw_key is None or str(raw_key).strip() == "":
                return InputItem(fallback, None, f"empty key column '{self.key_field}'")
            key = str(raw_key)
        value = row.get(self.value_field)
        if value is None or (isinstance(value, float) and value != value):  # None / NaN
            return InputItem.make(key, None, f"missing {self.kind} column '{self.value_field}'")
        value = str(value)
        if not value.strip():
            what = "text" if self.kind == "text" else "image path"
            return InputItem.make(key, None, f"empty {what}")
        if self.kind == "image":
            if "\x00" in value:
                return InputItem.make(key, None, "image path contains a NUL character")
            # absolute paths stay as they are
            return InputItem.make(key, str(self.path.parent / value))
        return InputItem.make(key, value)

    def _columns(self, available: list[str]) -> list[str]:
        wanted = [self.value_field] + ([self.key_field] if self.key_field else [])
        missing = [c for c in wanted if c not in available]
        if missing:
            raise ConfigError(
                f"input '{self.path}' has no column(s) {missing}; it has {available} "
                f"(set {'text_field' if self.kind == 'text' else 'image_field'} / key_field)"
            )
        return wanted

    def _columnar_rows(self) -> Iterator[tuple[int, dict[str, Any]]]:
        number = 0
        for frame in self._frames():
            columns = {name: frame[name] for name in frame}
            names = list(columns)
            for values in zip(*columns.values(), strict=True):
                number += 1
                yield number, dict(zip(names, values, strict=True))

    def _frames(self) -> Iterator[dict[str, list[Any]]]:
        if self.format == "parquet":
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(self.path)
            columns = self._columns(parquet.schema_arrow.names)
            for batch in parquet.iter_batches(batch_size=_CHUNK_ROWS, columns=columns):
                yield {name: batch.column(name).to_pylist() for name in columns}
            return
        import pandas as pd

        sep = "\t" if self.format == "tsv" else ","
        try:
            reader = pd.read_csv(
                self.path, sep=sep, dtype=str, keep_default_na=False, chunksize=_CHUNK_ROWS
            )
            columns: list[str] | None = None
            for frame in reader:
                columns = columns or self._columns([str(c) for c in frame.columns])
                yield {name: frame[name].tolist() for name in columns}
        except pd.errors.EmptyDataError as err:
            raise DataError(f"input '{self.path}' is empty") from err
        except (pd.errors.ParserError, UnicodeDecodeError) as err:
            raise DataError(f"input '{self.path}' is not a readable {self.format}: {err}") from err

    def _jsonl_rows(self) -> Iterator[tuple[int, dict[str, Any] | str]]:
        with self.path.open(encoding="utf-8", errors="replace") as lines:
            number = 0
            for line in lines:
                if not line.strip():
                    continue
                number += 1
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    yield number, f"line {number} is not valid JSON: {err.msg}"
                    continue
                if not isinstance(record, dict):
                    yield number, f"line {number} is not a JSON object"
                    continue
                yield number, record
