"""The sources ``cycleml data gather`` reads, each turned into a stream of items.

Kinds (``sources.<name>.kind``):

* ``digits`` – the scikit-learn digits, 8×8 grey pixels (stored as PNGs by gather);
* ``image_folder`` – one sub-folder per class (``layout: class_folders``) or per split
  and class (``layout: split_class_folders``);
* ``table`` – CSV, TSV, JSONL or Parquet with a text column or an image-path column, a
  label column and optionally a split column, an id column and extra columns.

Every item has a stable id ``<source>:<key within the source>`` and its origin (file,
table row or bundled index); labels are passed on as the source writes them.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cycleml.data.manifest import MANIFEST_COLUMNS, SPLIT_COLUMN
from cycleml.data.tables import read_columns
from cycleml.errors import ConfigError, CycleMLError, DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# the settings each kind of source takes (label_map is read by gather)
SOURCE_KEYS = {
    "digits": {"kind", "limit", "split", "label_map"},
    "image_folder": {"kind", "path", "layout", "split", "label_map"},
    "table": {
        "kind",
        "path",
        "format",
        "text_column",
        "path_column",
        "label_column",
        "split_column",
        "id_column",
        "columns",
        "split",
        "label_map",
    },
}


@dataclass
class SourceItem:
    """One item as a source gives it: before its file is stored and its label unified."""

    item_id: str
    source: str
    origin: str
    raw_label: str | None
    split: str | None
    label: str | None = None
    text: str | None = None
    file: str | None = None  # an existing image file to place
    pixels: np.ndarray | None = None  # a bundled image to encode as PNG
    extra: dict[str, str | None] | None = None


def as_text(value: Any) -> str | None:
    """A table value as the string the manifest stores (None for missing).

    Integral floats print as integers (``1.0`` → ``"1"``), lists and mappings as JSON.
    """
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return None
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, np.ndarray):
        value = value.tolist()
    return json.dumps(value, sort_keys=True, default=str)


def _iter_digits(name: str, cfg: Mapping[str, Any]) -> Iterator[SourceItem]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ConfigError(
            f"sources.{name}: the digits come with scikit-learn; pip install 'cycleml[train]'"
        ) from err
    digits = load_digits()
    # 0..16 ink levels → 0..255 grey
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    limit = cfg.get("limit")
    count = len(images) if limit is None else min(int(limit), len(images))
    for index in range(count):
        yield SourceItem(
            item_id=f"{name}:{index:04d}",
            source=name,
            origin=f"sklearn.datasets.load_digits[{index}]",
            raw_label=str(int(digits.target[index])),
            split=cfg.get("split"),
            pixels=images[index],
        )


def _iter_image_folder(name: str, cfg: Mapping[str, Any]) -> Iterator[SourceItem]:
    root = _existing_path(name, cfg, want_dir=True)
    layout = cfg.get("layout", "class_folders")
    depth = {"class_folders": 1, "split_class_folders": 2}.get(layout)
    if depth is None:
        raise ConfigError(
            f"sources.{name}.layout={layout!r}; use class_folders or split_class_folders"
        )
    skipped = 0
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = file.relative_to(root)
        if file.suffix.lower() not in IMAGE_SUFFIXES or len(relative.parts) != depth + 1:
            skipped += 1
            continue
        split = relative.parts[0] if depth == 2 else cfg.get("split")
        yield SourceItem(
            item_id=f"{name}:{relative.as_posix()}",
            source=name,
            origin=str(file.resolve()),
            raw_label=relative.parts[-2],
            split=split,
            file=str(file),
        )
    if skipped:
        log.warning(
            "source %s: skipped %d file(s) that are not images at the %s depth under %s",
            name,
            skipped,
            layout,
            root,
        )


def _iter_table(name: str, cfg: Mapping[str, Any]) -> Iterator[SourceItem]:
    path = _existing_path(name, cfg, want_dir=False)
    text_column, path_column = cfg.get("text_column"), cfg.get("path_column")
    if (text_column is None) == (path_column is None):
        raise ConfigError(f"sources.{name}: set exactly one of text_column or path_column")
    label_column = cfg.get("label_column", "label")
    extra_columns = list(cfg.get("columns") or [])
    clash = set(extra_columns) & {*MANIFEST_COLUMNS, SPLIT_COLUMN}
    if clash:
        raise ConfigError(f"sources.{name}.columns: {sorted(clash)} are manifest columns")
    wanted = [text_column or path_column, label_column, *extra_columns]
    wanted += [cfg[key] for key in ("split_column", "id_column") if cfg.get(key)]
    try:
        table = read_columns(path, list(dict.fromkeys(wanted)), cfg.get("format"),
                             setting=f"sources.{name}.format")  # fmt: skip
    except CycleMLError as err:
        raise type(err)(f"sources.{name}: {err}") from err

    def cell(column: str, index: int) -> str | None:
        value = as_text(table[column][index])
        return value if value else None  # an empty CSV cell is a missing value

    for index in range(len(table[label_column])):
        number = index + 1
        key = cell(cfg["id_column"], index) if cfg.get("id_column") else str(number)
        if key is None:
            raise DataError(f"sources.{name}: {path} row {number} has no {cfg['id_column']}")
        split = cell(cfg["split_column"], index) if cfg.get("split_column") else None
        item = SourceItem(
            item_id=f"{name}:{key}",
            source=name,
            origin=f"{path.resolve()}#{number}",
            raw_label=cell(label_column, index),
            split=split or cfg.get("split"),
            extra={c: cell(c, index) for c in extra_columns},
        )
        if text_column is not None:
            item.text = cell(text_column, index)
        else:
            image = cell(path_column, index)
            item.file = str(path.parent / image) if image else ""
            if image:  # the image's own location says more than the table row
                item.origin = str((path.parent / image).resolve())
        yield item


def _existing_path(name: str, cfg: Mapping[str, Any], want_dir: bool) -> Path:
    if not cfg.get("path"):
        raise ConfigError(f"sources.{name}.path is not set")
    path = Path(str(cfg["path"])).expanduser()
    if want_dir and not path.is_dir():
        raise DataError(f"sources.{name}: image folder {path} does not exist")
    if not want_dir and not path.is_file():
        raise DataError(f"sources.{name}: table {path} does not exist")
    return path


_READERS: dict[str, Callable[[str, Mapping[str, Any]], Iterator[SourceItem]]] = {
    "digits": _iter_digits,
    "image_folder": _iter_image_folder,
    "table": _iter_table,
}


def read_source(name: str, cfg: Any) -> Iterator[SourceItem]:
    """The items of source ``name``; its settings are checked before anything is read."""
    if not name or ":" in name:
        raise ConfigError(f"source name {name!r} must be non-empty and contain no ':'")
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"sources.{name} must be a mapping with a kind, got {cfg!r}")
    kind = cfg.get("kind")
    if kind not in _READERS:
        raise ConfigError(f"sources.{name}.kind={kind!r}; use one of {sorted(_READERS)}")
    unknown = set(cfg) - SOURCE_KEYS[kind]
    if unknown:
        raise ConfigError(
            f"sources.{name}: unknown key(s) {sorted(unknown)} for kind {kind}; "
            f"known: {sorted(SOURCE_KEYS[kind])}"
        )
    return _READERS[kind](name, cfg)
