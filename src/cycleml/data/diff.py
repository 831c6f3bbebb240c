"""What changed between two dataset directories, item by item.

Items are matched by ``item_id`` (source name + place in the source), so an item whose
label was edited is *relabelled*, one whose file or text was edited is *changed*, and
one moved to another split is *moved*; ids present on one side only are *added* or
*removed*.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cycleml.data.manifest import SPLIT_COLUMN, read_dataset


@dataclass(frozen=True)
class DatasetDiff:
    """Differences from dataset ``old`` to dataset ``new``."""

    old: str
    new: str
    old_fingerprint: str
    new_fingerprint: str
    added: list[dict[str, Any]] = field(default_factory=list)
    removed: list[dict[str, Any]] = field(default_factory=list)
    relabelled: list[dict[str, Any]] = field(default_factory=list)
    changed: list[dict[str, Any]] = field(default_factory=list)
    moved: list[dict[str, Any]] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not (self.added or self.removed or self.relabelled or self.changed or self.moved)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self, limit: int | None = 50) -> list[str]:
        """A readable listing, at most ``limit`` items per kind of change (None: all)."""
        out = [
            f"old {self.old} (fingerprint {self.old_fingerprint})",
            f"new {self.new} (fingerprint {self.new_fingerprint})",
            f"added {len(self.added)}, removed {len(self.removed)}, "
            f"relabelled {len(self.relabelled)}, changed {len(self.changed)}, moved {len(self.moved)}",
        ]
        sections = [
            ("added", self.added, lambda e: f"+ {e['item_id']}  label={e['label']}"),
            ("removed", self.removed, lambda e: f"- {e['item_id']}  label={e['label']}"),
            (
                "relabelled",
                self.relabelled,
                lambda e: f"~ {e['item_id']}  {e['old_label']} -> {e['new_label']}",
            ),
            (
                "changed",
                self.changed,
                lambda e: f"* {e['item_id']}  content {e['old_hash'][:12]} -> {e['new_hash'][:12]}",
            ),
            (
                "moved",
                self.moved,
                lambda e: f"> {e['item_id']}  split {e['old_split']} -> {e['new_split']}",
            ),
        ]
        for name, entries, show in sections:
            if not entries:
                continue
            out.append(f"{name}:")
            shown = entries if limit is None else entries[:limit]
            out += [f"  {show(e)}" for e in shown]
            if len(shown) < len(entries):
                out.append(f"  … and {len(entries) - len(shown)} more")
        return out


def _value(value: Any) -> Any:
    return None if value is None or (isinstance(value, float) and pd.isna(value)) else value


def diff_datasets(old: str | Path, new: str | Path) -> DatasetDiff:
    """Compare the dataset directories ``old`` and ``new``."""
    a, b = read_dataset(old), read_dataset(new)
    columns = ["item_id", "content_hash", "label"]
    left = a.manifest.reindex(columns=[*columns, SPLIT_COLUMN])
    right = b.manifest.reindex(columns=[*columns, SPLIT_COLUMN])
    joined = left.merge(right, on="item_id", how="outer", suffixes=("_old", "_new"), indicator=True)
    joined = joined.sort_values("item_id", kind="stable")
    result = DatasetDiff(str(a.root), str(b.root), a.fingerprint, b.fingerprint)
    for row in joined.to_dict("records"):
        item_id, side = row["item_id"], row["_merge"]
        if side == "right_only":
            result.added.append({"item_id": item_id, "label": _value(row["label_new"])})
            continue
        if side == "left_only":
            result.removed.append({"item_id": item_id, "label": _value(row["label_old"])})
            continue
        old_label, new_label = _value(row["label_old"]), _value(row["label_new"])
        if old_label != new_label:
            result.relabelled.append(
                {"item_id": item_id, "old_label": old_label, "new_label": new_label}
            )
        if row["content_hash_old"] != row["content_hash_new"]:
            result.changed.append(
                {
                    "item_id": item_id,
                    "old_hash": row["content_hash_old"],
                    "new_hash": row["content_hash_new"],
                }
            )
        old_split, new_split = (
            _value(row[f"{SPLIT_COLUMN}_old"]),
            _value(row[f"{SPLIT_COLUMN}_new"]),
        )
        if old_split != new_split:
            result.moved.append(
                {"item_id": item_id, "old_split": old_split, "new_split": new_split}
            )
    return result
