"""The prediction log of `cycleml serve`: rows that match the answers, and a database
that fails while the server runs (requests answered, dropped records counted)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import delete

from cycleml.errors import ConfigError
from cycleml.inference import load_bundle
from cycleml.inference.reference import input_features
from cycleml.monitoring.log import PredictionLog
from cycleml.monitoring.tables import predictions
from cycleml.serving.batcher import WorkItem
from cycleml.serving.metrics import ServingMetrics
from cycleml.serving.prediction_logger import LoggedBatch, PredictionLogger
from cycleml.serving.served_model import ServedModel
from test_predict_support import DATABASES, postgres_schema_url
from test_serving_support import (  # noqa: F401 - the *_fixture names register fixtures
    IMAGE_CLASSES,
    IMAGE_SIZE,
    RunningServer,
    free_port,
    image_bundle_fixture,
    settings,
    text_bundle_fixture,
    v2_body,
)

# the serving log tests' own PostgreSQL schema: the test database is shared
POSTGRES_SCHEMA = "cycleml_serving_log_tests"


def _log_url(kind: str, tmp_path: Path) -> str:
    """A fresh SQLite file, or the test PostgreSQL with the log's rows of model
    ``shapes`` removed from this module's own schema."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'monitoring.db'}"
    url = postgres_schema_url(POSTGRES_SCHEMA)
    prediction_log = PredictionLog(url)
    with prediction_log.engine.begin() as conn:
        conn.execute(delete(predictions).where(predictions.c.model == "shapes"))
    prediction_log.close()
    return url


DROPPED = re.compile(r"^cycleml_prediction_log_dropped_total (\S+)$", re.M)


def _pixels(rng: np.random.Generator, rows: int = 1) -> np.ndarray:
    return rng.integers(0, 256, (rows, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)


def _dropped(url: str) -> float:
    found = DROPPED.search(httpx.get(f"{url}/metrics").text)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize("database", DATABASES)
def test_logged_rows_match_the_answers(image_bundle: Path, tmp_path: Path, database: str) -> None:
    db_url = _log_url(database, tmp_path)
    serve = settings(image_bundle, monitoring={"enabled": True, "db_url": db_url})
    rng = np.random.default_rng(0)
    answers: dict[str, tuple[str, list[float]]] = {}
    with RunningServer(serve) as server, httpx.Client(base_url=server.url) as client:
        for i in range(12):
            rid = f"log-test-{i}"
            reply = client.post(
                "/v2/models/shapes/infer",
                json=v2_body(_pixels(rng)),
                headers={"X-Request-Id": rid},
            )
            assert reply.status_code == 200
            out = reply.json()["outputs"][0]
            answers[rid] = (reply.json()["model_version"], out["data"])
        # a request of two rows logs one record per row
        two = client.post(
            "/v2/models/shapes/infer",
            json=v2_body(_pixels(rng, 2)),
            headers={"X-Request-Id": "log-test-pair"},
        )
        assert two.status_code == 200
        pair = np.asarray(two.json()["outputs"][0]["data"]).reshape(2, -1)
        assert _dropped(server.url) == 0
    # the server's shutdown writes what was buffered
    logged = PredictionLog(db_url).read("shapes", "1")
    by_id = {rid: i for i, rid in enumerate(logged.request_ids)}
    assert set(by_id) == {*answers, "log-test-pair/0", "log-test-pair/1"}
    for rid, (version, probabilities) in answers.items():
        row = by_id[rid]
        assert version == "1"
        assert logged.predicted_class[row] == int(np.argmax(probabilities))
        assert logged.predicted_label[row] == IMAGE_CLASSES[int(np.argmax(probabilities))]
        np.testing.assert_allclose(logged.probabilities[row], probabilities, rtol=1e-6)
    for i in range(2):
        assert logged.predicted_class[by_id[f"log-test-pair/{i}"]] == int(pair[i].argmax())
    assert set(logged.features) == {"brightness", "contrast", "confidence"}
    # the bundle's embedding output is asked for and logged with each prediction
    dim = load_bundle(image_bundle).meta.embedding["dim"]
    assert logged.embedding is not None
    assert logged.embedding.shape == (len(logged), dim)


def test_a_text_model_logs_the_length_of_each_text(text_bundle: Path, tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'monitoring.db'}"
    serve = settings(text_bundle, monitoring={"enabled": True, "db_url": db_url})
    with RunningServer(serve) as server, httpx.Client(base_url=server.url) as client:
        for rid, text in (("t-short", "goal"), ("t-long", "the team scored a late goal")):
            reply = client.post(
                "/v1/models/topics:predict", json={"text": text}, headers={"X-Request-Id": rid}
            )
            assert reply.status_code == 200
            assert reply.json()["id"] == rid
    logged = PredictionLog(db_url).read("topics", "1")
    lengths = dict(zip(logged.request_ids, logged.features["length"], strict=True))
    # tokens that are not padding, cut at the bundle's max_length
    assert 1 <= lengths["t-short"] < lengths["t-long"] <= 6


def test_unreachable_database_fails_no_request(
    image_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # nothing listens on this port: every connect is refused
    db_url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test"
    serve = settings(image_bundle, monitoring={"enabled": True, "db_url": db_url})
    rng = np.random.default_rng(1)
    with RunningServer(serve) as server, httpx.Client(base_url=server.url) as client:
        statuses = [
            client.post("/v2/models/shapes/infer", json=v2_body(_pixels(rng))).status_code
            for _ in range(20)
        ]
        assert statuses == [200] * 20
        deadline = time.monotonic() + 30
        while _dropped(server.url) < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _dropped(server.url) == 20
    # said in the log too, at most once per WARN_EVERY_S (the first drop is always said)
    warnings = [r.getMessage() for r in caplog.records if "prediction log:" in r.getMessage()]
    assert 1 <= len(warnings) <= 2
    assert "dropped (writing to postgresql+psycopg://" in warnings[0]


def test_sample_rate_zero_logs_nothing(image_bundle: Path, tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'monitoring.db'}"
    serve = settings(
        image_bundle, monitoring={"enabled": True, "db_url": db_url, "sample_rate": 0.0}
    )
    with RunningServer(serve) as server, httpx.Client(base_url=server.url) as client:
        for _ in range(5):
            reply = client.post(
                "/v2/models/shapes/infer", json=v2_body(_pixels(np.random.default_rng(2)))
            )
            assert reply.status_code == 200
    assert len(PredictionLog(db_url).read("shapes", "1")) == 0


def test_a_batch_logs_only_its_sampled_requests(image_bundle: Path, tmp_path: Path) -> None:
    """One batch of logged and unlogged requests (one of three rows): the batch's arrays
    are handed over once, and the log holds each sampled row with its own answer."""
    db_url = f"sqlite:///{tmp_path / 'monitoring.db'}"
    logger = PredictionLogger(db_url, 1.0, 1000, 1 << 20, on_dropped=lambda rows: None)
    model = ServedModel(
        "shapes", load_bundle(image_bundle), settings(image_bundle), ServingMetrics(),
        prediction_logger=logger,
    )  # fmt: skip
    rng = np.random.default_rng(4)
    loop = asyncio.new_event_loop()
    items = [
        WorkItem(inputs=_pixels(rng, rows), deadline=0.0, loop=loop, future=loop.create_future())
        for rows in (1, 1, 3, 1, 2)
    ]
    for item, log_id in zip(items, ("s-0", None, "s-2", "s-3", None), strict=True):
        item.log_id = log_id
    model.batchers[0]._run_batch(items)
    logger.close()
    loop.close()
    logged = PredictionLog(db_url).read("shapes", "1")
    expected = {"s-0": (items[0], 0), "s-3": (items[3], 0)}
    expected.update({f"s-2/{row}": (items[2], row) for row in range(3)})
    assert sorted(logged.request_ids) == sorted(expected)
    for i, rid in enumerate(logged.request_ids):
        item, row = expected[rid]
        np.testing.assert_array_equal(logged.probabilities[i], item.output[row])
        np.testing.assert_array_equal(logged.embedding[i], item.embedding[row])
        brightness = input_features("image", item.inputs[row : row + 1])["brightness"][0]
        assert logged.features["brightness"][i] == brightness


def _batch(rid: str) -> LoggedBatch:
    from cycleml.db import utc_now

    return LoggedBatch(
        model="m",
        version="1",
        kind="image",
        class_names=["a", "b"],
        pad_id=0,
        request_ids=[rid],
        inputs=np.zeros((1, 2, 2, 3), np.uint8),
        probabilities=np.array([[0.3, 0.7]], np.float32),
        embeddings=None,
        logged_at=utc_now(),
    )


def _held_writer(
    tmp_path: Path, buffer_rows: int, buffer_bytes: int
) -> tuple[PredictionLogger, threading.Event, list[int], str]:
    """A logger whose writer has taken a first batch and hangs opening the database until
    the returned event is set; drops are appended to the returned list."""
    release = threading.Event()
    dropped: list[int] = []

    def slow_open(url: str) -> PredictionLog:
        release.wait(30)
        return PredictionLog(url)

    url = f"sqlite:///{tmp_path / 'log.db'}"
    logger = PredictionLogger(
        url, 1.0, buffer_rows, buffer_bytes, dropped.append, open_log=slow_open
    )
    logger.offer(_batch("first"))  # the writer takes it and hangs in slow_open
    deadline = time.monotonic() + 10
    while logger._pending and time.monotonic() < deadline:
        time.sleep(0.01)
    return logger, release, dropped, url


@pytest.mark.parametrize(
    ("buffer_rows", "buffer_bytes"),
    [(5, 10**9), (100, 5 * 12)],  # 12 input bytes per row
)
def test_a_batch_larger_than_the_room_keeps_the_rows_that_fit(
    tmp_path: Path, buffer_rows: int, buffer_bytes: int
) -> None:
    logger, release, dropped, url = _held_writer(tmp_path, buffer_rows, buffer_bytes)
    rows, one = 8, _batch("b")
    logger.offer(
        dataclasses.replace(
            one,
            request_ids=[f"b{i}" for i in range(rows)],
            inputs=np.repeat(one.inputs, rows, axis=0),
            probabilities=np.repeat(one.probabilities, rows, axis=0),
        )
    )
    assert dropped == [3]
    release.set()
    logger.close()
    logged = PredictionLog(url).read("m", "1")
    assert sorted(logged.request_ids) == ["b0", "b1", "b2", "b3", "b4", "first"]


@pytest.mark.parametrize(
    ("buffer_rows", "buffer_bytes", "fit"),
    [(3, 10**9, 3), (100, 2 * 12, 2)],  # by rows; by input bytes (12 per record)
)
def test_a_slow_database_never_blocks_the_caller(
    tmp_path: Path, buffer_rows: int, buffer_bytes: int, fit: int
) -> None:
    """While the writer hangs on the database, offers return at once; beyond the
    buffer's bounds they are counted as dropped, and the rest is written afterwards."""
    logger, release, dropped, url = _held_writer(tmp_path, buffer_rows, buffer_bytes)
    started = time.perf_counter()
    for i in range(5):
        logger.offer(_batch(f"r{i}"))
    assert time.perf_counter() - started < 0.5
    assert sum(dropped) == 5 - fit
    release.set()
    logger.close()
    assert logger.written == 1 + fit
    rows = PredictionLog(url).read("m", "1")
    assert sorted(rows.request_ids) == ["first", *(f"r{i}" for i in range(fit))]


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (and was reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_writer_process_that_dies_drops_its_rows_and_the_next_write_starts_another(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The rows in flight when the writer process dies are counted dropped with the
    reason; the next write starts a new process; close() leaves no process behind."""
    path = tmp_path / "log.db"
    url = f"sqlite:///{path}"
    dropped: list[int] = []
    logger = PredictionLogger(url, 1.0, 1000, 1 << 20, dropped.append)
    assert logger.process is not None  # the server's default: a writer process
    logger.offer(_batch("before"))
    deadline = time.monotonic() + 60
    while logger.written < 1:
        assert time.monotonic() < deadline, "the first row was not written in 60 s"
        time.sleep(0.02)
    first = logger.process.pid
    assert first is not None and first != os.getpid()
    # another connection holds SQLite's write lock: the child's write waits for it
    locker = sqlite3.connect(path, timeout=0)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        logger.offer(_batch("in-flight"))
        while logger._pending or not logger.process._busy.locked():
            assert time.monotonic() < deadline, "the writer did not take the row"
            time.sleep(0.01)
        time.sleep(0.3)  # the row is sent; the child waits for the lock
        os.kill(first, signal.SIGKILL)
        while sum(dropped) < 1:
            assert time.monotonic() < deadline, "the row in flight was not counted dropped"
            time.sleep(0.02)
    finally:
        locker.rollback()
        locker.close()
    assert logger.dropped == 1 and logger.written == 1
    warnings = [r.getMessage() for r in caplog.records if "prediction log:" in r.getMessage()]
    assert any("the writer process died (exit status -9)" in w for w in warnings), warnings
    logger.offer(_batch("after"))  # written by a new process, after the back-off
    while logger.written < 2:
        assert time.monotonic() < deadline, "no new writer process wrote the next row"
        time.sleep(0.02)
    second = logger.process.pid
    assert second is not None and second != first
    logger.close()
    assert _gone(second)
    assert sorted(PredictionLog(url).read("m", "1").request_ids) == ["after", "before"]


@pytest.mark.parametrize(
    ("monitoring", "message"),
    [
        ({"enabled": True, "db_url": None}, "monitoring.enabled needs monitoring.db_url"),
        ({"sample_rate": 1.5}, "monitoring.sample_rate must be in 0..1"),
        ({"buffer_rows": 0}, "monitoring.buffer_rows must be >= 1"),
        ({"buffer_bytes": 0}, "monitoring.buffer_bytes must be >= 1"),
    ],
)
def test_bad_monitoring_settings(image_bundle: Path, monitoring: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        settings(image_bundle, monitoring=monitoring)


def _wait_logged(db_url: str, rows: int) -> None:
    deadline = time.monotonic() + 30
    while len(PredictionLog(db_url).read("shapes", "1")) < rows:
        assert time.monotonic() < deadline, f"fewer than {rows} predictions logged in 30 s"
        time.sleep(0.05)


@pytest.mark.parametrize("database", DATABASES)
def test_feedback_attaches_labels_and_names_unknown_ids(
    image_bundle: Path, tmp_path: Path, database: str
) -> None:
    db_url = _log_url(database, tmp_path)
    serve = settings(image_bundle, monitoring={"enabled": True, "db_url": db_url})
    rng = np.random.default_rng(3)
    with RunningServer(serve) as server, httpx.Client(base_url=server.url) as client:
        for rid in ("fb-1", "fb-2", "fb-3"):
            reply = client.post(
                "/v2/models/shapes/infer", json=v2_body(_pixels(rng)), headers={"X-Request-Id": rid}
            )
            assert reply.status_code == 200
        _wait_logged(db_url, 3)
        listed = client.post(
            "/v1/feedback",
            json=[
                {"request_id": "fb-1", "label": "cat"},
                {"request_id": "fb-2", "label": "dog"},
                {"request_id": "never-served", "label": "cat"},
            ],
        )
        assert listed.status_code == 200
        assert listed.json() == {
            "received": 3,
            "attached": 2,
            "unknown": 1,
            "unknown_request_ids": ["never-served"],
        }
        single = client.post("/v1/feedback", json={"request_id": "fb-3", "label": "bird"})
        assert single.json()["attached"] == 1
        bad_bodies = [
            b"{not json",
            b"[]",
            b'{"request_id": "fb-1"}',
            b'{"request_id": "fb-1", "label": ["cat"]}',
            b'[{"request_id": 5, "label": "cat"}]',
            b'"fb-1"',
        ]
        for body in bad_bodies:
            reply = client.post(
                "/v1/feedback", content=body, headers={"Content-Type": "application/json"}
            )
            assert reply.status_code == 400, body
            assert "feedback" in reply.json()["error"]
        # text no database column can hold as given: refused whole, naming field and limit
        # (PostgreSQL refuses NUL and over-long text; SQLite would store them)
        unstorable = [
            (
                [{"request_id": "fb-1", "label": "dog"}, {"request_id": "fb-2", "label": "c\x00t"}],
                "feedback item #1: label holds the control character U+0000 at position 1",
            ),
            (
                {"request_id": "fb-1", "label": "x" * 256},
                "label is 256 characters long; at most 255",
            ),
            ({"request_id": "r" * 256, "label": "cat"}, "request_id is 256 characters long"),
            ({"unit": "u\x00", "event": "click"}, "unit holds the control character U+0000"),
            (
                {"unit": "u", "event": "click", "experiment": "e" * 129},
                "experiment is 129 characters long; at most 128",
            ),
        ]
        for body, message in unstorable:
            reply = client.post("/v1/feedback", json=body)
            assert reply.status_code == 400, reply.text
            assert message in reply.json()["error"], reply.text
    logged = PredictionLog(db_url).read("shapes", "1")
    labels = dict(zip(logged.request_ids, logged.labels, strict=True))
    assert labels == {"fb-1": "cat", "fb-2": "dog", "fb-3": "bird"}


def test_feedback_without_the_log_is_refused(image_bundle: Path) -> None:
    with RunningServer(settings(image_bundle)) as server:
        reply = httpx.post(f"{server.url}/v1/feedback", json={"request_id": "x", "label": "cat"})
        assert reply.status_code == 409
        assert "monitoring.enabled=true" in reply.json()["error"]


def _gauges(text: str) -> dict[str, float]:
    found = re.findall(
        r'^(cycleml_(?:drift|estimated|realised)_\w+)\{model="shapes",version="1"\} (\S+)$',
        text,
        re.M,
    )
    return {name: float(value) for name, value in found}


def test_drift_gauges_are_the_latest_window_of_cycleml_monitor(
    image_bundle: Path, tmp_path: Path
) -> None:
    from cycleml.monitoring.drift import DriftSettings
    from cycleml.monitoring.run import ModelTarget, WindowSettings, monitor

    db_url = f"sqlite:///{tmp_path / 'monitoring.db'}"
    serve = settings(
        image_bundle,
        monitoring={
            "enabled": True,
            "db_url": db_url,
            "report_interval_s": 0.2,
            "report_window": 30,
        },
    )
    rng = np.random.default_rng(4)
    with RunningServer(serve) as server, httpx.Client(base_url=server.url) as client:
        for _ in range(40):
            reply = client.post("/v2/models/shapes/infer", json=v2_body(_pixels(rng)))
            assert reply.status_code == 200
        _wait_logged(db_url, 40)
        # what cycleml monitor reports for the newest 30 predictions
        newest = PredictionLog(db_url).read("shapes", "1").logged_at[10]
        windows = WindowSettings(by="count", size=30, start=newest.isoformat())
        target = ModelTarget(load_bundle(image_bundle), "shapes", "1")
        expected = monitor(target, PredictionLog(db_url), windows, DriftSettings())["gauges"]
        assert "cycleml_estimated_accuracy" in expected
        assert "cycleml_drift_detected" in expected
        deadline = time.monotonic() + 30
        while (scraped := _gauges(client.get("/metrics").text)).keys() != expected.keys() or any(
            abs(scraped[k] - expected[k]) > 1e-9 for k in expected
        ):
            assert time.monotonic() < deadline, f"gauges {scraped} != {expected} after 30 s"
            time.sleep(0.1)
    assert 0.0 <= scraped["cycleml_estimated_accuracy"] <= 1.0
    assert scraped["cycleml_drift_detected"] in (0.0, 1.0)
