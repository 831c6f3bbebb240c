"""Gather several sources into one dataset directory (see :mod:`cycleml.data.manifest`).

The sources (digits, image folders, tables) are read by :mod:`cycleml.data.sources`.

Labels are unified through a label map ``{name: [alias, ...]}`` (case-insensitive);
an item whose label is not in the map is not guessed: it goes to ``rejected.parquet``
with its reason, as does a table row whose image file does not exist.
Files are hashed and copied (or linked) in parallel over chunks.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cycleml.data.manifest import (
    DATASET_FILE,
    FILE_MODES,
    FILES_DIR,
    MANIFEST_FILE,
    SPLIT_COLUMN,
    place_file,
    prepare_output,
    stored_name,
    write_dataset,
)
from cycleml.data.parallel import map_in_chunks
from cycleml.data.sources import SourceItem, as_text, read_source
from cycleml.data.splits import SPLITS
from cycleml.data.versioning import content_hash
from cycleml.errors import ConfigError, DataError

log = logging.getLogger(__name__)

REJECTED_FILE = "rejected.parquet"


@dataclass(frozen=True)
class GatherResult:
    """What ``gather`` wrote."""

    root: Path
    fingerprint: str
    num_items: int
    num_rejected: int


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


def _store_files(chunk: list[tuple[str | None, np.ndarray | None, str, str]]) -> list[str]:
    """Worker: store each image under ``files/`` by its content hash; return the hashes.

    Each task is ``(image file, bundled pixels, dataset root, mode)``: a file is placed
    by ``mode`` (copy or link), bundled pixels are encoded as PNG here, in the worker,
    so only small arrays and hashes travel between processes.
    """
    from PIL import Image

    hashes = []
    for file, pixels, root, mode in chunk:
        if file is not None:
            source: Path | bytes = Path(file)
            digest = content_hash(source.read_bytes())
            suffix = source.suffix.lower()
        else:
            buffer = BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG", optimize=False)
            source = buffer.getvalue()
            digest = content_hash(source)
            suffix = ".png"
        place_file(source, Path(root) / stored_name(digest, suffix), mode)
        hashes.append(digest)
    return hashes


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
    pending: list[SourceItem] = []
    rejected: list[dict[str, Any]] = []
    for name, cfg in sources.items():
        items = read_source(name, cfg)
        labels = (
            LabelMap(cfg["label_map"], f"sources.{name}.label_map")
            if cfg.get("label_map")
            else shared_map
        )
        before, reasons = len(pending), Counter()
        for item in items:
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
        log.info("source %s (%s): %d items", name, cfg["kind"], len(pending) - before)
        for reason, count in reasons.items():
            log.warning(
                "source %s: %d item(s) rejected: %s (see %s)", name, count, reason, REJECTED_FILE
            )
    if not pending:
        raise DataError("the sources gave no items to gather")
    prepare_output(output, overwrite, (MANIFEST_FILE, DATASET_FILE, REJECTED_FILE, FILES_DIR))
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


def _admit(item: SourceItem, labels: LabelMap) -> str | None:
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
    pending: list[SourceItem], output: Path, mode: str, workers: int | None, progress: bool
) -> list[str]:
    """Content hashes of all items; image items are stored under ``output/files``."""
    hashes = [
        content_hash(item.text or "") if item.file is None and item.pixels is None else ""
        for item in pending
    ]
    images = [
        i for i, item in enumerate(pending) if item.file is not None or item.pixels is not None
    ]
    tasks = [(pending[i].file, pending[i].pixels, str(output), mode) for i in images]
    stored = map_in_chunks(_store_files, tasks, workers, "store", progress)
    for i, digest in zip(images, stored, strict=True):
        item = pending[i]
        hashes[i] = digest
        item.file = stored_name(digest, Path(item.file).suffix.lower() if item.file else ".png")
    return hashes


def _manifest_frame(pending: list[SourceItem], hashes: list[str]) -> pd.DataFrame:
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
