"""`cycleml data gather`: merging sources, unified labels, reproducible fingerprints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cycleml.data.gather import gather
from cycleml.data.manifest import MANIFEST_COLUMNS, manifest_fingerprint, read_dataset
from cycleml.data.versioning import content_hash
from cycleml.errors import ConfigError, DataError

LABEL_MAP = {"positive": ["pos", "+", "1", "good"], "negative": ["neg", "-", "0"]}


def write_text_sources(root: Path) -> dict[str, dict]:
    """Three tables that spell the same two labels differently, one label unknown."""
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(
        {
            "review": ["great phone", "awful screen", "works fine"],
            "sentiment": ["pos", "neg", "POS"],
        }
    ).to_csv(root / "shop.csv", index=False)
    with (root / "forum.jsonl").open("w") as handle:
        for body, mood in [("love it", 1), ("hate it", 0), ("so so", "maybe"), ("meh", None)]:
            handle.write(json.dumps({"body": body, "mood": mood, "stars": 3}) + "\n")
    pd.DataFrame(
        {"text": ["superb", "broken"], "label": ["+", "-"], "split": ["test", "test"]}
    ).to_parquet(root / "survey.parquet")
    return {
        "shop": {"kind": "table", "path": str(root / "shop.csv"), "text_column": "review",
                 "label_column": "sentiment"},
        "forum": {"kind": "table", "path": str(root / "forum.jsonl"), "text_column": "body",
                  "label_column": "mood", "columns": ["stars"]},
        "survey": {"kind": "table", "path": str(root / "survey.parquet"), "text_column": "text",
                   "split_column": "split"},
    }  # fmt: skip


def write_image_sources(root: Path) -> dict[str, dict]:
    """An image folder with splits and a table of image paths, one of them missing."""
    rng = np.random.default_rng(0)
    for split, label, n in [("train", "cat", 3), ("train", "dog", 3), ("test", "cat", 1)]:
        folder = root / "folder" / split / label
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(
                folder / f"{i}.png"
            )
    (root / "folder" / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "scans").mkdir()
    Image.fromarray(rng.integers(0, 256, (9, 9), dtype=np.uint8)).save(root / "scans" / "a.jpg")
    pd.DataFrame({"file": ["a.jpg", "gone.jpg"], "label": ["Cat", "dog"]}).to_csv(
        root / "scans" / "list.csv", index=False
    )
    return {
        "folder": {
            "kind": "image_folder",
            "path": str(root / "folder"),
            "layout": "split_class_folders",
        },
        "scans": {"kind": "table", "path": str(root / "scans" / "list.csv"), "path_column": "file"},
    }


def test_text_sources_merge_with_unified_labels_and_rejects(tmp_path: Path) -> None:
    sources = write_text_sources(tmp_path / "raw")
    result = gather(sources, tmp_path / "out", label_map=LABEL_MAP, progress=False)
    dataset = read_dataset(tmp_path / "out")
    frame = dataset.manifest.set_index("item_id")

    assert dataset.kind == "text" and result.num_items == 8 and result.num_rejected == 1
    assert list(dataset.manifest.columns[: len(MANIFEST_COLUMNS)]) == list(MANIFEST_COLUMNS)
    assert frame.loc["shop:3", "label"] == "positive" and frame.loc["shop:3", "raw_label"] == "POS"
    assert (
        frame.loc["forum:1", "label"] == "positive" and frame.loc["forum:2", "label"] == "negative"
    )
    assert frame.loc["survey:1", "label"] == "positive" and frame.loc["survey:1", "split"] == "test"
    assert frame.loc["shop:1", "split"] is None
    # a missing label is kept for `data clean` to report; an unknown one is not guessed
    assert frame.loc["forum:4", "label"] is None
    rejected = pd.read_parquet(tmp_path / "out" / "rejected.parquet")
    assert rejected["item_id"].tolist() == ["forum:3"]
    assert "'maybe' not in label_map" in rejected["reason"].iloc[0]
    assert frame.loc["forum:1", "stars"] == "3" and pd.isna(frame.loc["shop:1", "stars"])
    assert frame.loc["shop:1", "content_hash"] == content_hash("great phone")
    assert frame.loc["shop:2", "origin"].endswith("shop.csv#2")
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert info["fingerprint"] == dataset.fingerprint == result.fingerprint
    assert info["labels"] == {"negative": 3, "positive": 4}
    assert info["rejected"] == {"label 'maybe' not in label_map": 1}


def test_image_sources_are_hashed_and_stored_by_content(tmp_path: Path) -> None:
    sources = write_image_sources(tmp_path / "raw")
    result = gather(
        sources, tmp_path / "out", label_map={"cat": [], "dog": []}, workers=2, progress=False
    )
    dataset = read_dataset(tmp_path / "out")
    frame = dataset.manifest.set_index("item_id")

    assert result.num_items == 8 and dataset.kind == "image"
    assert frame.loc["folder:test/cat/0.png", "split"] == "test"
    assert frame.loc["scans:1", "label"] == "cat" and frame.loc["scans:1", "split"] is None
    for item_id, row in frame.iterrows():
        stored = tmp_path / "out" / row["path"]
        assert stored.read_bytes() == Path(row["origin"]).read_bytes(), item_id
        assert content_hash(stored.read_bytes()) == row["content_hash"]
        assert (
            row["path"] == f"files/{row['content_hash'][:2]}/{row['content_hash']}{stored.suffix}"
        )
    rejected = pd.read_parquet(tmp_path / "out" / "rejected.parquet")
    assert rejected.set_index("item_id")["reason"].to_dict() == {"scans:2": "file not found"}


@pytest.mark.parametrize("mode", ["hardlink", "symlink"])
def test_files_can_be_linked_instead_of_copied(tmp_path: Path, mode: str) -> None:
    sources = write_image_sources(tmp_path / "raw")
    gather(sources, tmp_path / "out", files=mode, workers=1, progress=False)
    row = read_dataset(tmp_path / "out").manifest.iloc[0]
    stored, original = tmp_path / "out" / row["path"], Path(row["origin"])
    if mode == "symlink":
        assert stored.is_symlink() and stored.resolve() == original.resolve()
    else:
        assert os.path.samefile(stored, original)


def test_same_sources_give_the_same_fingerprint_and_one_label_changes_it(tmp_path: Path) -> None:
    sources = write_text_sources(tmp_path / "raw")
    first = gather(sources, tmp_path / "a", label_map=LABEL_MAP, workers=1, progress=False)
    again = gather(sources, tmp_path / "b", label_map=LABEL_MAP, workers=2, progress=False)
    assert first.fingerprint == again.fingerprint
    assert (tmp_path / "a" / "manifest.parquet").read_bytes() == (
        tmp_path / "b" / "manifest.parquet"
    ).read_bytes()

    table = pd.read_csv(tmp_path / "raw" / "shop.csv")
    table.loc[1, "sentiment"] = "pos"
    table.to_csv(tmp_path / "raw" / "shop.csv", index=False)
    changed = gather(sources, tmp_path / "c", label_map=LABEL_MAP, progress=False)
    assert changed.fingerprint != first.fingerprint


def test_digits_are_written_as_grey_pngs(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    result = gather(
        {"digits": {"kind": "digits", "limit": 30}}, tmp_path / "d", workers=2, progress=False
    )
    frame = read_dataset(tmp_path / "d").manifest
    assert result.num_items == 30 and frame["label"].tolist()[:3] == ["0", "1", "2"]
    with Image.open(tmp_path / "d" / frame["path"].iloc[5]) as image:
        pixels = np.asarray(image)
    assert image.mode == "L" and pixels.shape == (8, 8)
    expected = np.rint(load_digits().images[5] * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(pixels, expected)
    assert manifest_fingerprint(frame) == result.fingerprint


def test_bad_sources_are_named_in_the_error(tmp_path: Path) -> None:
    texts = write_text_sources(tmp_path / "raw")
    images = write_image_sources(tmp_path / "img")
    with pytest.raises(ConfigError, match="sources.x.kind='folder'"):
        gather({"x": {"kind": "folder"}}, tmp_path / "o", progress=False)
    with pytest.raises(ConfigError, match=r"sources.shop: unknown key\(s\) \['txt_column'\]"):
        gather({"shop": {**texts["shop"], "txt_column": "r"}}, tmp_path / "o", progress=False)
    with pytest.raises(DataError, match=r"sources.shop: .*shop.csv: column 'opinion' not found"):
        gather(
            {"shop": {**texts["shop"], "label_column": "opinion"}}, tmp_path / "o", progress=False
        )
    with pytest.raises(DataError, match="mixes image items"):
        gather({"shop": texts["shop"], "folder": images["folder"]}, tmp_path / "o", progress=False)
    with pytest.raises(ConfigError, match="maps to both 'positive' and 'negative'"):
        gather(
            texts, tmp_path / "o", label_map={"positive": ["x"], "negative": ["X"]}, progress=False
        )
    with pytest.raises(DataError, match="does not exist"):
        gather(
            {"f": {"kind": "image_folder", "path": str(tmp_path / "nope")}},
            tmp_path / "o",
            progress=False,
        )
    gather(texts, tmp_path / "done", progress=False)
    with pytest.raises(ConfigError, match="overwrite=true"):
        gather(texts, tmp_path / "done", progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        gather(texts, tmp_path / "other", overwrite=True, progress=False)
    assert gather(texts, tmp_path / "done", overwrite=True, progress=False).num_items == 9


def test_cli_gathers_and_cleans(tmp_path: Path) -> None:
    env = {**os.environ, "CYCLEML_ROOT": str(tmp_path)}
    gathered = subprocess.run(
        [sys.executable, "-m", "cycleml", "data", "gather", "sources.digits.limit=60",
         "progress=false", "workers=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert gathered.returncode == 0, gathered.stderr
    fingerprint = read_dataset(tmp_path / "data" / "gathered").fingerprint
    assert (
        f"gathered 60 items into {tmp_path / 'data' / 'gathered'} (fingerprint {fingerprint})"
        in gathered.stdout
    )
    cleaned = subprocess.run(
        [sys.executable, "-m", "cycleml", "data", "clean", "progress=false", "clean=report_only"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cleaned.returncode == 0, cleaned.stderr
    assert "60 kept, 0 removed" in cleaned.stdout
    assert (tmp_path / "data" / "gathered-clean" / "report.html").is_file()
    failed = subprocess.run(
        [sys.executable, "-m", "cycleml", "data", "gather", "files=move"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert failed.returncode == 2 and "files='move'" in failed.stderr


def test_table_sources_read_through_the_shared_table_reader(tmp_path: Path) -> None:
    """Format from the suffix or the config, errors naming source and file, empty cells."""
    path = tmp_path / "reviews.txt"
    path.write_text("text,label\ngood value,pos\n,neg\nfine,\n")
    source = {"kind": "table", "path": str(path), "text_column": "text"}
    with pytest.raises(
        ConfigError,
        match=r"sources.r: .*reviews.txt: unknown table format '.txt'; set sources.r.format",
    ):
        gather({"r": source}, tmp_path / "o", progress=False)
    gather({"r": {**source, "format": "csv"}}, tmp_path / "o", progress=False)
    frame = read_dataset(tmp_path / "o").manifest.set_index("item_id")
    # an empty CSV cell is a missing value: kept, for `data clean` to report
    assert frame.loc["r:2", "text"] is None and frame.loc["r:2", "label"] == "neg"
    assert frame.loc["r:3", "label"] is None and frame.loc["r:3", "raw_label"] is None
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match=r"sources.e: .*empty.csv: the file is empty"):
        gather(
            {"e": {**source, "path": str(tmp_path / "empty.csv")}}, tmp_path / "p", progress=False
        )
