"""cycleml predict: inputs → one database row each, resumable, shardable, errors kept."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cycleml.batch.runner import PredictSettings, predict_to_database
from cycleml.batch.sources import InputSource, Shard
from cycleml.batch.store import DUPLICATE_REASON
from cycleml.errors import ConfigError, DataError
from cycleml.inference import Predictor
from test_export_support import (
    IMAGE_CLASSES,
    TEXT_CLASSES,
    cached_bundle,
    synthetic_images,
    synthetic_texts,
)
from test_predict_support import DATABASES, database_url, stored

SETTINGS = PredictSettings(batch_size=8, decode_workers=2, progress=False, intra_op_threads=1)


@pytest.fixture
def image_folder(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """30 images (PNG and JPEG, in sub-folders), one corrupt file, one text file."""
    images, labels = synthetic_images(30, seed=40)
    root = tmp_path / "images"
    expected = {}
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / ("a" if i % 3 else "b/c")
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{i:02d}.png" if i % 2 else f"{i:02d}.jpg"
        Image.fromarray(image).save(folder / name)
        expected[(folder / name).relative_to(root).as_posix()] = int(label)
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "README.txt").write_text("not an image")
    return root, expected


@pytest.mark.parametrize("database", DATABASES)
def test_image_folder_gives_one_row_per_image(tmp_path, image_folder, database):
    root, expected = image_folder
    url = database_url(database, tmp_path, ["tiny-image"])
    summary = predict_to_database(cached_bundle("image"), root, url, SETTINGS)
    assert (summary.written, summary.failed, summary.skipped) == (30, 1, 0)
    assert summary.ignored_files == 1 and summary.rows_per_s > 0
    rows, errors = stored(url, "tiny-image")
    assert set(rows) == set(expected)
    assert {k: r["label_id"] for k, r in rows.items()} == expected
    row = rows["a/01.png"]
    assert row["label"] == IMAGE_CLASSES[row["label_id"]] and row["model_version"] == "1"
    assert row["run_id"] == "run-image" and row["job_id"] == summary.job_id
    assert row["created_at"] is not None
    assert row["top_k"][0] == [row["label"], pytest.approx(row["confidence"])]
    assert len(row["top_k"]) == 3
    assert list(errors) == ["a/broken.png"]
    assert "cannot decode image" in errors["a/broken.png"]

    # resume: a rerun skips what is written and retries the failure
    again = predict_to_database(cached_bundle("image"), root, url, SETTINGS)
    assert (again.written, again.skipped, again.failed) == (0, 30, 1)
    # once the file is fixed, the error row gives way to a prediction
    Image.fromarray(synthetic_images(1)[0][0]).save(root / "a" / "broken.png")
    fixed = predict_to_database(cached_bundle("image"), root, url, SETTINGS)
    assert (fixed.written, fixed.skipped, fixed.failed) == (1, 30, 0)
    rows, errors = stored(url, "tiny-image")
    assert len(rows) == 31 and errors == {}


def test_predictions_match_the_predictor(tmp_path, image_folder):
    root, _ = image_folder
    url = f"sqlite:///{tmp_path / 'p.db'}"
    predict_to_database(cached_bundle("image"), root, url, SETTINGS)
    rows, _ = stored(url, "tiny-image")
    predictor = Predictor(cached_bundle("image"))
    for key in ("a/01.png", "b/c/00.jpg", "a/29.png"):
        (expected,) = predictor.predict_images([root / key])
        assert rows[key]["label"] == expected.label
        assert rows[key]["confidence"] == pytest.approx(expected.confidence, abs=1e-6)


def test_shards_split_the_keys_without_overlap(tmp_path, image_folder):
    root, expected = image_folder
    url = f"sqlite:///{tmp_path / 'p.db'}"
    written = []
    for index in range(3):
        settings = PredictSettings(**{**SETTINGS.__dict__, "shard": f"{index}/3"})
        written.append(predict_to_database(cached_bundle("image"), root, url, settings).written)
    rows, errors = stored(url, "tiny-image")
    assert set(rows) == set(expected) and sum(written) == 30
    assert all(0 < w < 30 for w in written)
    assert list(errors) == ["a/broken.png"]


def test_shard_parsing():
    assert Shard.parse("2/4") == Shard(2, 4) and str(Shard.parse(None)) == "0/1"
    for bad in ("4/4", "1", "a/b", "-1/3"):
        with pytest.raises(ConfigError, match="shard="):
            Shard.parse(bad)
    owners = [sum(Shard(i, 4).owns(f"k{n}") for i in range(4)) for n in range(100)]
    assert owners == [1] * 100


def write_table(path: Path, records: list[dict]) -> Path:
    frame = pd.DataFrame.from_records(records)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
@pytest.mark.parametrize("database", DATABASES)
def test_text_tables(tmp_path, suffix, database):
    texts, labels = synthetic_texts(40, seed=50)
    records = [{"id": f"doc-{i}", "text": t} for i, t in enumerate(texts)]
    records.append({"id": "blank", "text": "   "})
    path = write_table(tmp_path / f"texts{suffix}", records)
    url = database_url(database, tmp_path, ["tiny-text"])
    settings = PredictSettings(**{**SETTINGS.__dict__, "key_field": "id"})
    summary = predict_to_database(cached_bundle("text"), path, url, settings)
    assert (summary.written, summary.failed) == (40, 1)
    rows, errors = stored(url, "tiny-text")
    assert {k: r["label"] for k, r in rows.items()} == {
        f"doc-{i}": TEXT_CLASSES[label] for i, label in enumerate(labels)
    }
    assert errors == {"blank": "empty text"}


def test_row_numbers_are_keys_and_bad_jsonl_lines_are_errors(tmp_path):
    texts, _ = synthetic_texts(5, seed=51)
    lines = [json.dumps({"text": t}) for t in texts[:2]]
    lines += ["{broken", json.dumps(["a", "list"]), json.dumps({"other": 1})]
    lines += [json.dumps({"text": t}) for t in texts[2:]]
    path = tmp_path / "texts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    url = f"sqlite:///{tmp_path / 'p.db'}"
    summary = predict_to_database(cached_bundle("text"), path, url, SETTINGS)
    assert (summary.written, summary.failed) == (5, 3)
    rows, errors = stored(url, "tiny-text")
    assert set(rows) == {"1", "2", "6", "7", "8"}
    assert errors["3"].startswith("line 3 is not valid JSON")
    assert errors["4"] == "line 4 is not a JSON object"
    assert errors["5"] == "missing text column 'text'"


def test_duplicate_keys_are_reported_not_dropped(tmp_path):
    texts, _ = synthetic_texts(3, seed=52)
    records = [{"id": "same", "text": texts[0]}, {"id": "other", "text": texts[1]}]
    records += [{"id": "same", "text": texts[2]}]
    path = write_table(tmp_path / "dups.csv", records)
    url = f"sqlite:///{tmp_path / 'p.db'}"
    settings = PredictSettings(**{**SETTINGS.__dict__, "key_field": "id"})
    summary = predict_to_database(cached_bundle("text"), path, url, settings)
    assert (summary.written, summary.failed) == (2, 1)
    rows, errors = stored(url, "tiny-text")
    assert set(rows) == {"same", "other"}
    assert errors["same"].startswith("duplicate input key")


def test_a_failed_copy_of_a_duplicated_key_stays_recorded(tmp_path):
    texts, _ = synthetic_texts(2, seed=55)
    records = [{"id": "x", "text": " "}, {"id": "y", "text": texts[0]}]
    records.append({"id": "x", "text": texts[1]})
    path = write_table(tmp_path / "texts.jsonl", records)
    url = f"sqlite:///{tmp_path / 'p.db'}"
    settings = PredictSettings(**{**SETTINGS.__dict__, "key_field": "id", "batch_size": 1})
    summary = predict_to_database(cached_bundle("text"), path, url, settings)
    assert (summary.written, summary.failed) == (2, 1)
    rows, errors = stored(url, "tiny-text")
    assert set(rows) == {"x", "y"} and errors == {"x": "empty text"}


def test_image_paths_from_a_table(tmp_path):
    images, labels = synthetic_images(4, seed=53)
    (tmp_path / "pics").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "pics" / f"{i}.png")
    records = [{"image": f"pics/{i}.png"} for i in range(3)]
    records += [{"image": str(tmp_path / "pics" / "3.png")}]  # absolute paths stay as they are
    records += [{"image": "pics/missing.png"}, {"image": " "}]
    for number, record in enumerate(records, 1):
        record["note"] = f"row {number}"  # a CSV line holding only blanks would be no row
    path = write_table(tmp_path / "images.csv", records)
    url = f"sqlite:///{tmp_path / 'p.db'}"
    summary = predict_to_database(cached_bundle("image"), path, url, SETTINGS)
    assert (summary.written, summary.failed) == (4, 2)
    rows, errors = stored(url, "tiny-image")
    assert [rows[str(i + 1)]["label_id"] for i in range(4)] == labels.tolist()
    assert errors["5"].startswith("cannot read image file: FileNotFoundError")
    assert "missing.png" in errors["5"]
    assert errors["6"] == "empty image path"


def test_folder_walk_skips_hidden_entries_and_links_to_folders(tmp_path):
    root = tmp_path / "input"
    (root / "b").mkdir(parents=True)
    (root / ".cache").mkdir()
    (tmp_path / "elsewhere").mkdir()
    image = synthetic_images(1)[0][0]
    for file in ("z.png", "b/a.PNG", ".cache/x.png", ".hidden.png"):
        Image.fromarray(image).save(root / file, format="PNG")
    Image.fromarray(image).save(tmp_path / "elsewhere" / "far.png")
    (root / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "notes.txt").write_text("not an image")
    source = InputSource(root, "image")
    items = list(source)
    assert [(i.key, i.value) for i in items] == [
        ("b/a.PNG", str(root / "b" / "a.PNG")),
        ("z.png", str(root / "z.png")),
    ]
    assert source.ignored == 1  # notes.txt; hidden files are not counted


def test_a_key_repeated_in_a_later_batch_is_a_duplicate_error(tmp_path):
    """Whether or not the first copy is committed when the second is read, the second
    is reported as a duplicate (not counted as skipped), and a rerun skips both."""
    texts, _ = synthetic_texts(41, seed=54)
    records = [{"id": f"k{i}", "text": t} for i, t in enumerate(texts[:40])]
    records.append({"id": "k0", "text": texts[40]})
    path = write_table(tmp_path / "texts.jsonl", records)
    url = f"sqlite:///{tmp_path / 'p.db'}"
    settings = PredictSettings(
        **{**SETTINGS.__dict__, "key_field": "id", "batch_size": 4, "prefetch": 1}
    )
    summary = predict_to_database(cached_bundle("text"), path, url, settings)
    assert (summary.written, summary.failed, summary.skipped) == (40, 1, 0)
    rows, errors = stored(url, "tiny-text")
    assert len(rows) == 40 and errors == {"k0": DUPLICATE_REASON}
    again = predict_to_database(cached_bundle("text"), path, url, settings)
    assert (again.written, again.failed, again.skipped) == (0, 0, 41)


def test_configuration_errors_are_named(tmp_path):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    with pytest.raises(DataError, match="does not exist"):
        predict_to_database(cached_bundle("text"), tmp_path / "nope.csv", url, SETTINGS)
    with pytest.raises(ConfigError, match="is a folder, but a text model reads a table"):
        predict_to_database(cached_bundle("text"), tmp_path, url, SETTINGS)
    (tmp_path / "x.xlsx").write_text("x")
    with pytest.raises(ConfigError, match="unknown format"):
        predict_to_database(cached_bundle("text"), tmp_path / "x.xlsx", url, SETTINGS)
    path = write_table(tmp_path / "t.csv", [{"body": "apple"}])
    with pytest.raises(ConfigError, match=r"has no column\(s\) \['text'\]; it has \['body'\]"):
        predict_to_database(cached_bundle("text"), path, url, SETTINGS)
    with pytest.raises(ConfigError, match="not a database URL"):
        predict_to_database(cached_bundle("text"), path, "nonsense", SETTINGS)
    with pytest.raises(ConfigError, match="batch_size"):
        PredictSettings(batch_size=0)


def test_source_streams_lazily(tmp_path):
    """Reading stops where the consumer stops: a broken tail is never touched."""
    path = tmp_path / "big.csv"
    head = "text\n" + "apple pear\n" * 5000
    path.write_bytes(head.encode() + b"\xff\xfe broken bytes after the first chunks")
    items = iter(InputSource(path, "text"))
    first = [next(items) for _ in range(10)]
    assert [i.key for i in first] == [str(n) for n in range(1, 11)]


def test_cli_writes_rows_and_a_summary(tmp_path, image_folder):
    root, expected = image_folder
    db = tmp_path / "cli.db"
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "cycleml.cli", "predict", f"bundle={cached_bundle('image')}",
        f"input={root}", f"db_url=sqlite:///{db}", "batch_size=16", "progress=false",
        f"hydra.run.dir={run_dir}", "runtime.intra_op_threads=1",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "predict_summary.json").read_text())
    assert (summary["written"], summary["failed"], summary["ignored_files"]) == (30, 1, 1)
    rows, _ = stored(f"sqlite:///{db}", "tiny-image")
    assert set(rows) == set(expected)
    bad = subprocess.run(
        [sys.executable, "-m", "cycleml.cli", "predict", f"bundle={tmp_path}/none",
         f"input={root}", f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "cycleml predict: error: bundle not found" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_top_k_and_int8_precision(tmp_path, image_folder):
    root, expected = image_folder
    url = f"sqlite:///{tmp_path / 'p.db'}"
    settings = PredictSettings(**{**SETTINGS.__dict__, "top_k": 1, "precision": "int8"})
    predict_to_database(cached_bundle("image"), root, url, settings)
    rows, _ = stored(url, "tiny-image")
    assert all(len(r["top_k"]) == 1 for r in rows.values())
    agreement = np.mean([rows[k]["label_id"] == v for k, v in expected.items()])
    assert agreement >= 0.9
