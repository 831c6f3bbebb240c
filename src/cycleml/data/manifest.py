"""The dataset directory: a Parquet manifest of items plus the files it points to.

A dataset directory (written by ``cycleml data gather`` and ``cycleml data clean``)
holds

* ``manifest.parquet`` – one row per item, sorted by ``item_id``;
* ``files/`` – the image files, named by content hash (text items live in the
  manifest itself);
* ``dataset.json`` – kind, fingerprint, counts and where the items came from.

The manifest columns are :data:`MANIFEST_COLUMNS`; a ``split`` column is optional,
and table sources may carry extra columns next to them. The dataset fingerprint is
:func:`cycleml.data.versioning.dataset_fingerprint` over the items' content hashes and
labels (and splits, where assigned).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cycleml.data.versioning import dataset_fingerprint
from cycleml.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.parquet"
FILE_MODES = ("copy", "hardlink", "symlink")
DATASET_FILE = "dataset.json"
FILES_DIR = "files"
FORMAT_VERSION = 1

# item_id      stable id: "<source>:<key within the source>"
# content_hash SHA-256 of the file bytes (images) or of the UTF-8 text (texts)
# path         image file relative to the dataset directory (null for texts)
# text         the text (null for images)
# label        the unified label (null when the source gave none)
# raw_label    the label as the source wrote it
# source       the source's name in the gather config
# origin       where the item was read from (file path, table row, bundled set index)
MANIFEST_COLUMNS: tuple[str, ...] = (
    "item_id",
    "content_hash",
    "path",
    "text",
    "label",
    "raw_label",
    "source",
    "origin",
)
SPLIT_COLUMN = "split"
KINDS = ("image", "text")


@dataclass(frozen=True)
class Dataset:
    """A dataset directory loaded into memory: its manifest and its description."""

    root: Path
    manifest: pd.DataFrame
    kind: str

    @property
    def fingerprint(self) -> str:
        return manifest_fingerprint(self.manifest)

    def file_path(self, relative: str) -> Path:
        """Absolute path of an item's file."""
        return self.root / relative


def stored_name(digest: str, suffix: str) -> str:
    """Where a file with content hash ``digest`` lives in a dataset directory."""
    return f"{FILES_DIR}/{digest[:2]}/{digest}{suffix}"


def place_file(source: Path | bytes, target: Path, mode: str = "copy") -> None:
    """Put ``source`` (a file, or bytes to write) at ``target`` unless something is there.

    ``mode`` is ``copy``, ``hardlink`` (a copy where links are not possible, e.g. across
    file systems) or ``symlink``. The file appears under its name only once complete,
    so processes placing the same content at once do not see each other's half files.
    """
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}")
    if isinstance(source, bytes):
        staging.write_bytes(source)
    elif mode == "symlink":
        staging.symlink_to(Path(source).resolve())
    elif mode == "hardlink":
        try:
            os.link(source, staging)
        except OSError:
            shutil.copyfile(source, staging)
    elif mode == "copy":
        shutil.copyfile(source, staging)
    else:
        raise ValueError(f"unknown file mode {mode!r}; expected one of {FILE_MODES}")
    os.replace(staging, target)


def prepare_output(output: Path, overwrite: bool, written: Sequence[str]) -> None:
    """Make ``output`` ready to receive a dataset directory.

    An existing, non-empty ``output`` is replaced only with ``overwrite`` and only if it
    is a dataset directory; then the files and folders named in ``written`` (what the
    command writes) are removed, and anything else in it is left alone.
    """
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"output {output} exists and is not empty; choose another output or set "
                "overwrite=true"
            )
        if not (output / MANIFEST_FILE).is_file():
            raise ConfigError(
                f"output {output} is not a dataset directory ({MANIFEST_FILE} missing); "
                "refusing to overwrite it"
            )
        for name in written:
            target = output / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    output.mkdir(parents=True, exist_ok=True)


def has_splits(manifest: pd.DataFrame) -> bool:
    """Whether the manifest assigns items to splits (a ``split`` column with values)."""
    return SPLIT_COLUMN in manifest.columns and bool(manifest[SPLIT_COLUMN].notna().any())


def manifest_fingerprint(manifest: pd.DataFrame) -> str:
    """The dataset fingerprint of a manifest: its content hashes, labels and splits."""
    labels = manifest["label"].fillna("").astype(str)
    if has_splits(manifest):
        splits = manifest[SPLIT_COLUMN].fillna("").astype(str)
        entries = zip(manifest["content_hash"], labels, splits, strict=True)
    else:
        entries = zip(manifest["content_hash"], labels, strict=True)
    return dataset_fingerprint(entries)


def dataset_kind(manifest: pd.DataFrame) -> str:
    """``image`` when items are files, ``text`` when they are texts; mixing is an error."""
    has_path = manifest["path"].notna()
    if bool(has_path.all()):
        return "image"
    if not bool(has_path.any()):
        return "text"
    raise DataError(
        f"manifest mixes image items ({int(has_path.sum())}) and text items "
        f"({int((~has_path).sum())}); a dataset holds one kind"
    )


def check_manifest(manifest: pd.DataFrame, where: str) -> None:
    """Raise :class:`DataError` unless ``manifest`` has the required columns and unique ids."""
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise DataError(
            f"{where}: manifest lacks column(s) {missing}; expected {list(MANIFEST_COLUMNS)}"
        )
    duplicated = manifest["item_id"][manifest["item_id"].duplicated()]
    if len(duplicated):
        raise DataError(
            f"{where}: item ids must be unique, {len(duplicated)} repeat "
            f"(first: {duplicated.iloc[0]!r})"
        )


def write_dataset(
    root: Path, manifest: pd.DataFrame, extra_info: dict[str, Any] | None = None
) -> str:
    """Write ``manifest.parquet`` and ``dataset.json`` under ``root``; return the fingerprint.

    Rows are sorted by ``item_id`` so the same items always give the same file.
    """
    check_manifest(manifest, str(root))
    manifest = manifest.sort_values("item_id", kind="stable").reset_index(drop=True)
    kind = dataset_kind(manifest) if len(manifest) else "image"
    root.mkdir(parents=True, exist_ok=True)
    manifest.to_parquet(root / MANIFEST_FILE, index=False)
    fingerprint = manifest_fingerprint(manifest)
    info: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "fingerprint": fingerprint,
        "num_items": len(manifest),
        "labels": {
            str(k): int(v) for k, v in manifest["label"].value_counts().sort_index().items()
        },
        "splits": (
            {str(k): int(v) for k, v in manifest[SPLIT_COLUMN].value_counts().sort_index().items()}
            if has_splits(manifest)
            else None
        ),
    }
    info.update(extra_info or {})
    (root / DATASET_FILE).write_text(json.dumps(info, indent=2, sort_keys=False) + "\n")
    log.info("wrote %d items to %s (fingerprint %s)", len(manifest), root, fingerprint)
    return fingerprint


def read_dataset(root: str | Path) -> Dataset:
    """Load a dataset directory, checking that it is one."""
    root = Path(root).expanduser()
    path = root / MANIFEST_FILE
    if not path.is_file():
        hint = " (did you mean its parent?)" if root.name == FILES_DIR else ""
        raise DataError(
            f"{root} is not a dataset directory: {MANIFEST_FILE} not found{hint}; "
            "create one with `cycleml data gather`"
        )
    try:
        manifest = pd.read_parquet(path)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path}: {err}") from err
    check_manifest(manifest, str(path))
    # plain Python values, None for missing, whatever pandas' string dtype does
    manifest = manifest.astype(object).where(manifest.notna(), None)
    kind = dataset_kind(manifest) if len(manifest) else "image"
    return Dataset(root=root.resolve(), manifest=manifest, kind=kind)
