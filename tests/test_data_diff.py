"""`cycleml data diff`: items added, removed, relabelled, changed and moved between versions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cycleml.data.diff import diff_datasets
from cycleml.data.gather import gather
from cycleml.errors import DataError


def _write_table(path: Path, rows: list[tuple[str, str, str, str]]) -> dict[str, dict]:
    pd.DataFrame(rows, columns=["id", "text", "label", "split"]).to_csv(path, index=False)
    return {"notes": {"kind": "table", "path": str(path), "text_column": "text",
                      "id_column": "id", "split_column": "split"}}  # fmt: skip


ROWS = [
    ("a", "the lid cracked", "bad", "train"),
    ("b", "fast delivery", "good", "train"),
    ("c", "lovely colour", "good", "val"),
    ("d", "stopped working", "bad", "test"),
]


def test_one_relabelled_item_is_exactly_what_diff_shows(tmp_path: Path) -> None:
    sources = _write_table(tmp_path / "notes.csv", ROWS)
    before = gather(sources, tmp_path / "v1", progress=False)
    rows = list(ROWS)
    rows[1] = ("b", "fast delivery", "bad", "train")
    _write_table(tmp_path / "notes.csv", rows)
    after = gather(sources, tmp_path / "v2", progress=False)

    assert before.fingerprint != after.fingerprint
    diff = diff_datasets(tmp_path / "v1", tmp_path / "v2")
    assert diff.relabelled == [{"item_id": "notes:b", "old_label": "good", "new_label": "bad"}]
    assert not (diff.added or diff.removed or diff.changed or diff.moved)
    assert (diff.old_fingerprint, diff.new_fingerprint) == (before.fingerprint, after.fingerprint)
    assert "  ~ notes:b  good -> bad" in diff.lines()


def test_added_removed_changed_and_moved_items(tmp_path: Path) -> None:
    sources = _write_table(tmp_path / "notes.csv", ROWS)
    gather(sources, tmp_path / "v1", progress=False)
    rows = [
        ("a", "the lid cracked badly", "bad", "train"),  # new text
        ("b", "fast delivery", "good", "val"),  # another split
        ("c", "lovely colour", "good", "val"),
        ("e", "too loud", "bad", "test"),  # new; d is gone
    ]
    _write_table(tmp_path / "notes.csv", rows)
    gather(sources, tmp_path / "v2", progress=False)

    diff = diff_datasets(tmp_path / "v1", tmp_path / "v2")
    assert diff.added == [{"item_id": "notes:e", "label": "bad"}]
    assert diff.removed == [{"item_id": "notes:d", "label": "bad"}]
    assert [c["item_id"] for c in diff.changed] == ["notes:a"]
    assert diff.moved == [{"item_id": "notes:b", "old_split": "train", "new_split": "val"}]
    assert diff.relabelled == [] and not diff.identical
    assert diff_datasets(tmp_path / "v1", tmp_path / "v1").identical
    assert diff.lines(limit=0)[2] == "added 1, removed 1, relabelled 0, changed 1, moved 1"


def test_diff_of_a_folder_that_is_not_a_dataset_says_so(tmp_path: Path) -> None:
    sources = _write_table(tmp_path / "notes.csv", ROWS)
    gather(sources, tmp_path / "v1", progress=False)
    with pytest.raises(DataError, match="not a dataset directory"):
        diff_datasets(tmp_path / "v1", tmp_path)


def test_cli_takes_the_two_directories_as_arguments(tmp_path: Path) -> None:
    sources = _write_table(tmp_path / "notes.csv", ROWS)
    gather(sources, tmp_path / "v 1", progress=False)
    _write_table(tmp_path / "notes.csv", [*ROWS[:3], ("d", "stopped working", "good", "test")])
    gather(sources, tmp_path / "v2", progress=False)
    out = subprocess.run(
        [sys.executable, "-m", "cycleml", "data", "diff", str(tmp_path / "v 1"), str(tmp_path / "v2"),
         f"output={tmp_path / 'diff.json'}"],
        cwd=tmp_path, env={**os.environ, "CYCLEML_ROOT": str(tmp_path)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "relabelled 1" in out.stdout and "~ notes:d  bad -> good" in out.stdout
    saved = json.loads((tmp_path / "diff.json").read_text())
    assert saved["relabelled"] == [{"item_id": "notes:d", "old_label": "bad", "new_label": "good"}]
