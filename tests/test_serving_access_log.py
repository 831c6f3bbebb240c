"""The access log, written off the event loop: every line reaches every handler the
access logger's records reach, in order, with its request's time, and none is lost
when the server stops."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from cycleml.serving.access_log import AccessLog, access_log
from test_serving_support import (  # noqa: F401 - the *_fixture names register fixtures
    RunningServer,
    binary_body,
    image_bundle_fixture,
    settings,
)


class Collect(logging.Handler):
    """A handler of its own kind (not a stream handler): gets records one by one."""

    def __init__(self, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Broken(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        raise RuntimeError("this handler is broken")


@contextlib.contextmanager
def on_access_logger(*handlers: logging.Handler) -> Iterator[None]:
    """``handlers`` on the access logger, which passes nothing on to the root meanwhile."""
    saved = access_log.propagate, access_log.level
    access_log.propagate = False
    access_log.setLevel(logging.INFO)
    for handler in handlers:
        access_log.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            access_log.removeHandler(handler)
            handler.close()
        access_log.propagate, access_log.level = saved


def _file_handler(path: Path, **kwargs: object) -> logging.FileHandler:
    handler = logging.FileHandler(path, **kwargs)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter("%(created).6f %(name)s %(message)s"))
    return handler


def _lines(path: Path) -> list[tuple[float, dict]]:
    parsed = []
    for line in path.read_text().splitlines():
        created, name, message = line.split(" ", 2)
        assert name == "cycleml.serving.access"
        parsed.append((float(created), json.loads(message)))
    return parsed


def test_every_handler_gets_every_line_in_order_with_its_request_time(tmp_path: Path) -> None:
    odd_only = _file_handler(tmp_path / "odd.log")
    odd_only.addFilter(lambda record: json.loads(record.getMessage())["i"] % 2 == 1)
    every, collect, warnings = (
        _file_handler(tmp_path / "all.log"),
        Collect(),
        Collect(logging.WARNING),
    )
    log = AccessLog(interval_s=60.0)  # written by flush() only
    with on_access_logger(every, odd_only, collect, warnings):
        times = []
        for i in range(50):
            times.append(time.time())
            log.add({"request_id": f"r-{i}", "i": i, "status": 200})
            time.sleep(0.001)
        assert not (tmp_path / "all.log").read_text() and not collect.records
        log.flush()
        log.close()

    written = _lines(tmp_path / "all.log")
    assert [line["i"] for _, line in written] == list(range(50))
    assert [line["i"] for _, line in _lines(tmp_path / "odd.log")] == list(range(1, 50, 2))
    assert [json.loads(r.getMessage())["i"] for r in collect.records] == list(range(50))
    assert not warnings.records  # below its level
    # each record carries the time its request ended, not the time it was written
    for (created, _), added, record in zip(written, times, collect.records, strict=True):
        assert added <= created < added + 0.001
        assert record.created == pytest.approx(created, abs=1e-6)
        assert record.msecs == pytest.approx((created % 1) * 1000, abs=1.0)


def test_close_writes_what_is_left_and_later_lines_at_once(tmp_path: Path) -> None:
    collect = Collect()
    log = AccessLog(interval_s=60.0)
    with on_access_logger(collect):
        for i in range(3):
            log.add({"i": i})
        assert not collect.records
        log.close()
        assert [json.loads(r.getMessage())["i"] for r in collect.records] == [0, 1, 2]
        log.add({"i": 3})  # a request that ended after the server stopped
        assert [json.loads(r.getMessage())["i"] for r in collect.records] == [0, 1, 2, 3]


def test_the_thread_writes_on_its_own_and_at_once_when_lines_pile_up() -> None:
    collect = Collect()
    timed, piled = AccessLog(interval_s=0.05), AccessLog(interval_s=60.0, wake_at=10)
    with on_access_logger(collect):
        timed.add({"i": -1})
        deadline = time.monotonic() + 5.0
        while not collect.records and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(collect.records) == 1  # written within the interval, no flush called
        for i in range(10):
            piled.add({"i": i})
        while len(collect.records) < 11 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(collect.records) == 11  # the 10th line woke the thread
        timed.close()
        piled.close()


def test_a_broken_handler_loses_no_line_for_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    every = _file_handler(tmp_path / "all.log")
    log = AccessLog(interval_s=0.02)
    with on_access_logger(Broken(), every):
        for i in range(5):
            log.add({"i": i})
        time.sleep(0.2)  # the thread wrote them (and survived the broken handler)
        log.add({"i": 5})
        log.close()
    assert [line["i"] for _, line in _lines(tmp_path / "all.log")] == list(range(6))
    assert "this handler is broken" in capsys.readouterr().err


def test_nothing_is_queued_when_the_access_logger_is_off() -> None:
    log = AccessLog(interval_s=60.0)
    with on_access_logger(Collect()):
        access_log.setLevel(logging.WARNING)
        log.add({"i": 0})
        assert not log._pending
    log.close()


def test_the_server_has_written_every_request_line_when_it_stops(
    tmp_path: Path, image_bundle: Path
) -> None:
    every = _file_handler(tmp_path / "access.log")
    body, headers = binary_body(np.zeros((1, 8, 8, 3), np.uint8))
    with on_access_logger(every):
        with (
            RunningServer(settings(image_bundle, access_log=True)) as server,
            httpx.Client(base_url=server.url) as client,
        ):
            for i in range(40):
                answer = client.post(
                    "/v2/models/shapes/infer",
                    content=body,
                    headers={**headers, "X-Request-Id": f"req-{i}"},
                )
                assert answer.status_code == 200
            client.post("/v2/models/nosuch/infer", content=body, headers=headers)
        # the server stopped: the last lines were written as it did
        lines = [line for _, line in _lines(tmp_path / "access.log")]
    ids = [line["request_id"] for line in lines if line["request_id"].startswith("req-")]
    assert ids == [f"req-{i}" for i in range(40)]
    assert all(line["status"] == 200 for line in lines if line["request_id"] in ids)
    assert lines[-1]["status"] == 404 and lines[-1]["path"] == "/v2/models/nosuch/infer"


def test_a_filter_that_rewrites_a_line_gets_its_own_text(tmp_path: Path) -> None:
    """Two handlers share a formatter; one redacts: its file holds the redacted line
    and the other's the line as it was (each record is formatted once per formatter
    and message)."""
    from cycleml.redaction import RedactSecrets

    formatter = logging.Formatter("%(message)s")
    plain = logging.FileHandler(tmp_path / "plain.log")
    redacted = logging.FileHandler(tmp_path / "redacted.log")
    for handler in (plain, redacted):
        handler.setFormatter(formatter)
    redacted.addFilter(RedactSecrets())
    log = AccessLog(interval_s=60.0)
    with on_access_logger(plain, redacted):
        log.add({"path": "/x?password=hunter2", "i": 0})
        log.add({"path": "/y", "i": 1})
        log.close()
    assert "hunter2" in (tmp_path / "plain.log").read_text()
    lines = (tmp_path / "redacted.log").read_text().splitlines()
    assert len(lines) == 2 and "hunter2" not in lines[0] and "password=***" in lines[0]
    assert json.loads(lines[1]) == {"path": "/y", "i": 1}


def test_records_come_from_the_record_factory(tmp_path: Path) -> None:
    made = logging.getLogRecordFactory()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = made(*args, **kwargs)
        record.service = "cycleml"  # type: ignore[attr-defined]
        return record

    collect = Collect()
    logging.setLogRecordFactory(factory)
    try:
        log = AccessLog(interval_s=60.0)
        with on_access_logger(collect):
            log.add({"i": 0})
            log.add({"i": 1})
            log.close()
    finally:
        logging.setLogRecordFactory(made)
    assert [getattr(r, "service", None) for r in collect.records] == ["cycleml", "cycleml"]
    assert [json.loads(r.getMessage())["i"] for r in collect.records] == [0, 1]
