"""Gather several sources into one dataset directory (see :mod:`cycleml.data.manifest`).

Sources (by ``kind``):

* ``digits`` – the scikit-learn digits, written as 8×8 grey PNGs;
* ``image_folder`` – one sub-folder per class (``layout: class_folders``) or per split
  and class (``layout: split_class_folders``);
* ``table`` – CSV, JSONL or Parquet with a text column or an image-path column, a
  label column and optionally a split column, an id column and extra columns.

Labels are unified through a label map ``{name: [alias, ...]}`` (case-insensitive);
an item whose label is not in the map is not guessed: it goes to ``rejected.parquet``
with its reason, as does a table row whose image file does not exist.
Files are hashed and copied (or linked) in parallel over chunks.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
from tqdm import tqdm

from cycleml.data.manifest import (
    DATASET_FILE,
    FILES_DIR,
    MANIFEST_COLUMNS,
    MANIFEST_FILE,
    SPLIT_COLUMN,
    write_dataset,
)
from cycleml.data.versioning import content_hash
from cycleml.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
SPLITS = ("train", "val", "test")
FILE_MODES = ("copy", "hardlink", "symlink")
REJECTED_FILE = "rejected.parquet"
_SOURCE_KEYS = {
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

Item = TypeVar("Item")
Result = TypeVar("Result")


def map_in_chunks(
    work: Callable[[list[Item]], list[Result]],
    items: Sequence[Item],
    workers: int | None,
    desc: str,
    progress: bool = True,
) -> list[Result]:
    """``work`` over ``items`` in chunks, in ``workers`` processes, results in input order.

    ``workers`` None means one per CPU; 0 or 1 runs in this process. ``work`` must be a
    module-level function (it is pickled to the workers).
    """
    workers = (os.cpu_count() or 1) if workers is None else max(int(workers), 1)
    if not items:
        return []
    size = min(max(math.ceil(len(items) / (workers * 8)), 16), 512)
    chunks = [list(items[i : i + size]) for i in range(0, len(items), size)]
    results: list[Result] = []
    with tqdm(total=len(items), desc=desc, unit="item", disable=not progress, leave=False) as bar:
        if workers == 1:
            for chunk in chunks:
                results.extend(work(chunk))
                bar.update(len(chunk))
            return results
        with ProcessPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
            for chunk, done in zip(chunks, pool.map(work, chunks), strict=True):
                results.extend(done)
                bar.update(len(chunk))
    return results


@dataclass(frozen=True)
class GatherResult:
    """What ``gather`` wrote."""

    root: Path
    fingerprint: str
    num_items: int
    num_rejected: int


@dataclass
class _Pending:
    """One item read from a source, before its file is placed and its label mapped."""

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


class LabelMap:
    """Maps raw labels to unified names; ``None`` from :meth:`lookup` means unknown."""

    def __init__(self, mapping: Mapping[str, Any] | None, where: str) -> None:
        self.active = bool(mapping)
        self._aliases: dict[str, str] = {}
        for name, aliases in (mapping or {}).items():
            if isinstance(aliases, str | int | float):
                aliases = [aliases]
            if not isinstance(aliases, Sequence):
                raise ConfigError(f"{where}: label_map.{name} must be a list of aliases")
            for alias in [name, *aliases]:
                key = str(as_text(alias)).strip().casefold()
                if self._aliases.get(key, name) != name:
                    raise ConfigError(
                        f"{where}: label alias {alias!r} maps to both "
                        f"{self._aliases[key]!r} and {name!r}"
                    )
                self._aliases[key] = str(name)

    def lookup(self, raw: str) -> str | None:
        if not self.active:
            return raw.strip()
        return self._aliases.get(raw.strip().casefold())


def _iter_digits(name: str, cfg: Mapping[str, Any]) -> Iterator[_Pending]:
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
        yield _Pending(
            item_id=f"{name}:{index:04d}",
            source=name,
            origin=f"sklearn.datasets.load_digits[{index}]",
            raw_label=str(int(digits.target[index])),
            split=cfg.get("split"),
            pixels=images[index],
        )


def _iter_image_folder(name: str, cfg: Mapping[str, Any]) -> Iterator[_Pending]:
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
        yield _Pending(
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


def _read_table(name: str, path: Path, fmt: str | None) -> list[dict[str, Any]]:
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    try:
        if fmt in {"csv", "tsv"}:
            with path.open(newline="", encoding="utf-8") as handle:
                delimiter = "\t" if fmt == "tsv" else ","
                return [
                    {k: (v if v != "" else None) for k, v in row.items()}
                    for row in csv.DictReader(handle, delimiter=delimiter)
                ]
        if fmt in {"jsonl", "ndjson"}:
            rows = []
            with path.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    if line.strip():
                        row = json.loads(line)
                        if not isinstance(row, dict):
                            raise DataError(f"{path}:{number}: a JSONL line must be an object")
                        rows.append(row)
            return rows
        if fmt == "parquet":
            return pd.read_parquet(path).to_dict("records")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"sources.{name}: cannot read {path}: {err}") from err
    raise ConfigError(
        f"sources.{name}: unknown table format {fmt!r} of {path}; use csv, tsv, jsonl or parquet "
        "(or set format)"
    )


def _iter_table(name: str, cfg: Mapping[str, Any]) -> Iterator[_Pending]:
    path = _existing_path(name, cfg, want_dir=False)
    rows = _read_table(name, path, cfg.get("format"))
    text_column, path_column = cfg.get("text_column"), cfg.get("path_column")
    if (text_column is None) == (path_column is None):
        raise ConfigError(f"sources.{name}: set exactly one of text_column or path_column")
    label_column = cfg.get("label_column", "label")
    extra_columns = list(cfg.get("columns") or [])
    clash = set(extra_columns) & {*MANIFEST_COLUMNS, SPLIT_COLUMN}
    if clash:
        raise ConfigError(f"sources.{name}.columns: {sorted(clash)} are manifest columns")
    wanted = [text_column or path_column, label_column, *extra_columns]
    for optional in ("split_column", "id_column"):
        if cfg.get(optional):
            wanted.append(cfg[optional])
    present = set().union(*(row.keys() for row in rows)) if rows else set()
    missing = [c for c in wanted if c not in present]
    if rows and missing:
        raise DataError(
            f"sources.{name}: {path} has no column(s) {missing}; it has {sorted(present)}"
        )
    for number, row in enumerate(rows, start=1):
        key = as_text(row.get(cfg["id_column"])) if cfg.get("id_column") else str(number)
        if key is None:
            raise DataError(f"sources.{name}: {path} row {number} has no {cfg['id_column']}")
        split = as_text(row.get(cfg["split_column"])) if cfg.get("split_column") else None
        item = _Pending(
            item_id=f"{name}:{key}",
            source=name,
            origin=f"{path.resolve()}#{number}",
            raw_label=as_text(row.get(label_column)),
            split=split or cfg.get("split"),
            extra={c: as_text(row.get(c)) for c in extra_columns},
        )
        if text_column is not None:
            item.text = as_text(row.get(text_column))
        else:
            image = as_text(row.get(path_column))
            item.file = str(path.parent / image) if image else ""
            if image:  # the image's own location says more than the table row
                item.origin = str((path.parent / image).resolve())
        yield item


_READERS: dict[str, Callable[[str, Mapping[str, Any]], Iterator[_Pending]]] = {
    "digits": _iter_digits,
    "image_folder": _iter_image_folder,
    "table": _iter_table,
}


def _existing_path(name: str, cfg: Mapping[str, Any], want_dir: bool) -> Path:
    if not cfg.get("path"):
        raise ConfigError(f"sources.{name}.path is not set")
    path = Path(str(cfg["path"])).expanduser()
    if want_dir and not path.is_dir():
        raise DataError(f"sources.{name}: image folder {path} does not exist")
    if not want_dir and not path.is_file():
        raise DataError(f"sources.{name}: table {path} does not exist")
    return path


def _place_files(chunk: list[tuple[str | None, bytes | None, str, str]]) -> list[str]:
    """Worker: hash each file (or encoded image) and place it under ``files/``.

    Each task is ``(source file, encoded bytes, dataset root, mode)``; returns the
    content hashes. Names are ``files/<hash[:2]>/<hash><suffix>``, so equal content is
    stored once.
    """
    hashes = []
    for source, data, root, mode in chunk:
        if data is None:
            data = Path(source).read_bytes()
        digest = content_hash(data)
        suffix = Path(source).suffix.lower() if source else ".png"
        target = Path(root) / _stored_name(digest, suffix)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = target.with_name(f".{target.name}.{os.getpid()}")
            if source is None:
                staging.write_bytes(data)
            elif mode == "hardlink":
                try:
                    os.link(source, staging)
                except OSError:  # another file system: fall back to a copy
                    shutil.copyfile(source, staging)
            elif mode == "symlink":
                staging.symlink_to(Path(source).resolve())
            else:
                shutil.copyfile(source, staging)
            os.replace(staging, target)
        hashes.append(digest)
    return hashes


def _stored_name(digest: str, suffix: str) -> str:
    return f"{FILES_DIR}/{digest[:2]}/{digest}{suffix}"


def _encode_png(chunk: list[np.ndarray]) -> list[bytes]:
    from PIL import Image

    out = []
    for pixels in chunk:
        buffer = BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", optimize=False)
        out.append(buffer.getvalue())
    return out


def _prepare_output(output: Path, overwrite: bool) -> None:
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"output {output} exists and is not empty; choose another output or set overwrite=true"
            )
        if not (output / MANIFEST_FILE).is_file():
            raise ConfigError(
                f"output {output} is not a dataset directory ({MANIFEST_FILE} missing); "
                "refusing to overwrite it"
            )
        for name in (MANIFEST_FILE, DATASET_FILE, REJECTED_FILE):
            (output / name).unlink(missing_ok=True)
        shutil.rmtree(output / FILES_DIR, ignore_errors=True)
    output.mkdir(parents=True, exist_ok=True)


def gather(
    sources: Mapping[str, Mapping[str, Any]],
    output: str | Path,
    label_map: Mapping[str, Any] | None = None,
    files: str = "copy",
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> GatherResult:
    """Merge ``sources`` (name → source config) into the dataset directory ``output``."""
    if not sources:
        raise ConfigError(
            "no sources: add at least one under `sources`, e.g. '+sources.digits={kind: digits}'"
        )
    if files not in FILE_MODES:
        raise ConfigError(f"files={files!r}; use one of {list(FILE_MODES)}")
    output = Path(output).expanduser()
    shared_map = LabelMap(label_map, "label_map")
    pending: list[_Pending] = []
    rejected: list[dict[str, Any]] = []
    for name, cfg in sources.items():
        if not name or ":" in name:
            raise ConfigError(f"source name {name!r} must be non-empty and contain no ':'")
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"sources.{name} must be a mapping with a kind, got {cfg!r}")
        kind = cfg.get("kind")
        if kind not in _READERS:
            raise ConfigError(f"sources.{name}.kind={kind!r}; use one of {sorted(_READERS)}")
        unknown = set(cfg) - _SOURCE_KEYS[kind]
        if unknown:
            raise ConfigError(
                f"sources.{name}: unknown key(s) {sorted(unknown)} for kind {kind}; "
                f"known: {sorted(_SOURCE_KEYS[kind])}"
            )
        labels = (
            LabelMap(cfg["label_map"], f"sources.{name}.label_map")
            if cfg.get("label_map")
            else shared_map
        )
        before, reasons = len(pending), Counter()
        for item in _READERS[kind](name, cfg):
            reason = _admit(item, labels)
            if reason is None:
                pending.append(item)
                continue
            reasons[reason] += 1
            rejected.append(
                {
                    "item_id": item.item_id,
                    "source": name,
                    "origin": item.origin,
                    "raw_label": item.raw_label,
                    "reason": reason,
                }
            )
        log.info("source %s (%s): %d items", name, kind, len(pending) - before)
        for reason, count in reasons.items():
            log.warning(
                "source %s: %d item(s) rejected: %s (see %s)", name, count, reason, REJECTED_FILE
            )
    if not pending:
        raise DataError("the sources gave no items to gather")
    _prepare_output(output, overwrite)
    hashes = _store_items(pending, output, files, workers, progress)
    manifest = _manifest_frame(pending, hashes)
    source_info = {
        name: {k: (str(v) if k == "path" else v) for k, v in cfg.items() if k != "label_map"}
        for name, cfg in sources.items()
    }
    if rejected:
        pd.DataFrame(rejected).to_parquet(output / REJECTED_FILE, index=False)
    fingerprint = write_dataset(
        output,
        manifest,
        {"sources": source_info, "rejected": Counter(r["reason"] for r in rejected)},
    )
    return GatherResult(output, fingerprint, len(manifest), len(rejected))


def _admit(item: _Pending, labels: LabelMap) -> str | None:
    """Map the item's label in place; return why it is rejected, or None."""
    if item.file == "" or (item.file is not None and not Path(item.file).is_file()):
        return "file not found"
    if item.split is not None and item.split not in SPLITS:
        return f"split {item.split!r} is not one of {list(SPLITS)}"
    if item.raw_label is None or not item.raw_label.strip():
        item.raw_label = None  # kept: `cycleml data clean` reports missing labels
        return None
    item.label = labels.lookup(item.raw_label)
    if item.label is None:
        return f"label {item.raw_label!r} not in label_map"
    return None


def _store_items(
    pending: list[_Pending], output: Path, mode: str, workers: int | None, progress: bool
) -> list[str]:
    """Content hashes of all items, placing image files under ``output/files``."""
    hashes: list[str | None] = [None] * len(pending)
    bundled = [i for i, item in enumerate(pending) if item.pixels is not None]
    if bundled:
        encoded = map_in_chunks(
            _encode_png, [pending[i].pixels for i in bundled], workers, "encode", progress
        )
    tasks, positions = [], []
    for i, item in enumerate(pending):
        if item.text is not None or (item.file is None and item.pixels is None):
            hashes[i] = content_hash(item.text or "")
        else:
            positions.append(i)
    encoded_at = dict(zip(bundled, encoded, strict=True)) if bundled else {}
    for i in positions:
        tasks.append((pending[i].file, encoded_at.get(i), str(output), mode))
    for i, digest in zip(
        positions, map_in_chunks(_place_files, tasks, workers, "hash", progress), strict=True
    ):
        hashes[i] = digest
        suffix = Path(pending[i].file).suffix.lower() if pending[i].file else ".png"
        pending[i].file = _stored_name(digest, suffix)
    return [str(h) for h in hashes]


def _manifest_frame(pending: list[_Pending], hashes: list[str]) -> pd.DataFrame:
    rows = []
    for item, digest in zip(pending, hashes, strict=True):
        row = {
            "item_id": item.item_id,
            "content_hash": digest,
            "path": item.file,
            "text": item.text if item.file is None else None,
            "label": item.label,
            "raw_label": item.raw_label,
            "source": item.source,
            "origin": item.origin,
            SPLIT_COLUMN: item.split,
        }
        row.update(item.extra or {})
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame[SPLIT_COLUMN].isna().all():
        frame = frame.drop(columns=[SPLIT_COLUMN])
    return frame
