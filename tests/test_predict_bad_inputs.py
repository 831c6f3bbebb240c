"""cycleml predict never stops on one bad input, and a prediction is done per bundle
variant: keys the database cannot store as they are, files that are not regular files,
and precision as part of a prediction's key."""

from __future__ import annotations

import json
import os
import socket

import pytest
from PIL import Image
from sqlalchemy import Column as SqlColumn
from sqlalchemy import MetaData, String, Table, create_engine, select, text

from cycleml.batch.keys import MAX_KEY_CHARS, storable_key
from cycleml.batch.runner import PredictSettings, predict_to_database
from cycleml.batch.store import prediction_errors
from cycleml.errors import ConfigError
from test_export_support import cached_bundle, synthetic_images, synthetic_texts
from test_predict_support import (
    DATABASES,
    POSTGRES_URL,
    database_url,
    postgres_schema_url,
    stored,
)

SETTINGS = PredictSettings(batch_size=4, decode_workers=1, progress=False, intra_op_threads=1)


def original_keys(url: str, model_name: str) -> dict[str, bytes | None]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            query = select(prediction_errors.c.input_key, prediction_errors.c.original_key)
            rows = conn.execute(query.where(prediction_errors.c.model_name == model_name)).all()
    finally:
        engine.dispose()
    return {key: None if original is None else bytes(original) for key, original in rows}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("database", DATABASES)
def test_odd_file_names_and_non_regular_files_become_error_rows(tmp_path, database, monkeypatch):
    root = tmp_path / "in"
    root.mkdir()
    images, _ = synthetic_images(5, seed=70)
    for i, image in enumerate(images):
        Image.fromarray(image).save(root / f"{i}.png")
    # a file name that is not UTF-8, made from bytes as another system would
    with open(os.path.join(os.fsencode(root), b"caf\xe9.png"), "wb") as file:
        Image.fromarray(images[0]).save(file, format="PNG")
    os.mkfifo(root / "pipe.png")  # reading it would wait for a writer forever
    monkeypatch.chdir(root)  # a socket path must be short
    server = socket.socket(socket.AF_UNIX)
    server.bind("sock.png")
    (root / "null.png").symlink_to("/dev/null")
    url = database_url(database, tmp_path, ["tiny-image"])
    try:
        summary = predict_to_database(cached_bundle("image"), root, url, SETTINGS)
    finally:
        server.close()
    assert (summary.written, summary.failed) == (5, 4)
    rows, errors = stored(url, "tiny-image")
    assert set(rows) == {f"{i}.png" for i in range(5)}
    assert errors["pipe.png"].startswith("not a regular file (a FIFO)")
    assert errors["sock.png"].startswith("not a regular file (a socket)")
    assert errors["null.png"].startswith("not a regular file (a character device)")
    assert "not valid UTF-8" in errors["caf\\xe9.png"]
    # the exact name is kept, and gives the file back
    original = original_keys(url, "tiny-image")["caf\\xe9.png"]
    assert original == b"caf\xe9.png"
    assert (root / os.fsdecode(original)).is_file()
    # a rerun retries the failures and stops on none of them
    again = predict_to_database(cached_bundle("image"), root, url, SETTINGS)
    assert (again.written, again.skipped, again.failed) == (0, 5, 4)


@pytest.mark.parametrize("database", DATABASES)
def test_keys_the_database_cannot_hold_become_error_rows(tmp_path, database):
    texts, _ = synthetic_texts(6, seed=71)
    long_key = "k" * (MAX_KEY_CHARS + 500)
    records = [{"id": f"ok-{i}", "text": t} for i, t in enumerate(texts[:3])]
    records += [
        {"id": long_key, "text": texts[3]},
        {"id": "nul\x00key", "text": texts[4]},
        {"id": "ok-last", "text": texts[5]},
    ]
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    url = database_url(database, tmp_path, ["tiny-text"])
    settings = PredictSettings(**{**SETTINGS.__dict__, "key_field": "id"})
    summary = predict_to_database(cached_bundle("text"), path, url, settings)
    assert (summary.written, summary.failed) == (4, 2)
    rows, errors = stored(url, "tiny-text")
    assert set(rows) == {"ok-0", "ok-1", "ok-2", "ok-last"}
    stored_long = storable_key(long_key).text
    assert len(stored_long) <= MAX_KEY_CHARS and stored_long in errors
    assert "longer than 1024 characters (1524)" in errors[stored_long]
    assert "NUL character" in errors["nul\\x00key"]
    originals = original_keys(url, "tiny-text")
    assert originals[stored_long].decode() == long_key
    assert originals["nul\\x00key"].decode() == "nul\x00key"
    again = predict_to_database(cached_bundle("text"), path, url, settings)
    assert (again.written, again.skipped, again.failed) == (0, 4, 2)


def test_escaped_keys_stay_apart():
    a, b = "x" * 2000 + "a", "x" * 2000 + "b"
    assert storable_key(a).text != storable_key(b).text
    assert storable_key("plain/key.png").original is None
    assert storable_key("plain/key.png").text == "plain/key.png"


def test_a_nul_in_an_image_path_is_an_error_row(tmp_path):
    image = synthetic_images(1, seed=72)[0][0]
    Image.fromarray(image).save(tmp_path / "a.png")
    path = tmp_path / "images.jsonl"
    path.write_text(json.dumps({"image": "a.png"}) + "\n" + json.dumps({"image": "a\x00.png"}))
    url = f"sqlite:///{tmp_path / 'p.db'}"
    summary = predict_to_database(cached_bundle("image"), path, url, SETTINGS)
    assert (summary.written, summary.failed) == (1, 1)
    rows, errors = stored(url, "tiny-image")
    assert set(rows) == {"1"} and errors == {"2": "image path contains a NUL character"}


@pytest.mark.parametrize("database", DATABASES)
def test_another_precision_predicts_everything_again(tmp_path, database):
    texts, _ = synthetic_texts(10, seed=73)
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    url = database_url(database, tmp_path, ["tiny-text"])
    fp32 = predict_to_database(cached_bundle("text"), path, url, SETTINGS)
    int8_settings = PredictSettings(**{**SETTINGS.__dict__, "precision": "int8"})
    int8 = predict_to_database(cached_bundle("text"), path, url, int8_settings)
    assert (fp32.written, int8.written, int8.skipped) == (10, 10, 0)
    again = predict_to_database(cached_bundle("text"), path, url, int8_settings)
    assert (again.written, again.skipped) == (0, 10)
    engine = create_engine(url)
    with engine.connect() as conn:
        precisions = conn.execute(
            text("SELECT precision, count(*) FROM batch_predictions "
                 "WHERE model_name = 'tiny-text' GROUP BY precision ORDER BY precision")
        ).all()  # fmt: skip
    engine.dispose()
    assert [tuple(row) for row in precisions] == [("fp32", 10), ("int8", 10)]


def old_layout_table(url: str) -> None:
    """batch_predictions as earlier versions made it: no precision column."""
    old = MetaData()
    Table(
        "batch_predictions",
        old,
        SqlColumn("model_name", String(200)),
        SqlColumn("model_version", String(100)),
        SqlColumn("input_key", String(1024)),
    )
    engine = create_engine(url)
    old.create_all(engine)
    engine.dispose()


@pytest.mark.parametrize("database", DATABASES)
def test_a_table_of_the_old_layout_is_refused_by_name(tmp_path, database):
    schema = "cycleml_predict_tests_old_layout"
    if database == "sqlite":
        url = f"sqlite:///{tmp_path / 'old.db'}"
    else:
        url = postgres_schema_url(schema)
    old_layout_table(url)
    path = tmp_path / "texts.jsonl"
    path.write_text(json.dumps({"text": synthetic_texts(1)[0][0]}) + "\n")
    try:
        with pytest.raises(ConfigError, match="batch_predictions .* older cycleml.*precision"):
            predict_to_database(cached_bundle("text"), path, url, SETTINGS)
    finally:
        if database != "sqlite":
            assert POSTGRES_URL
            engine = create_engine(POSTGRES_URL)
            with engine.begin() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            engine.dispose()
