"""The server's assignment log on a real database: the time and latency each row
stores, the requests counted by experiment, arm and how they were assigned, the arm a
unit is remembered to have, and the ab_units rows written when a unit's arm is new or
changes."""

from __future__ import annotations

import datetime as dt
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from cycleml.db import as_utc
from cycleml.experiments.store import ExperimentSpec, ExperimentStore
from cycleml.experiments.tables import assignments, units
from cycleml.serving import experiments as serving_experiments
from cycleml.serving.experiments import ActiveExperiment, AssignmentLog, Target
from cycleml.serving.metrics import ServingMetrics
from test_registry_support import database_url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from database_url(request.param, tmp_path, "exp.db")


def _row(request_id: str, stamp: float, latency_ms: float, unit: str | None = "u1",
         arm: str = "control", mode: str = "split", experiment: str = "exp") -> tuple:  # fmt: skip
    return (request_id, experiment, arm, unit, "m", "1", mode, stamp, 200, latency_ms)


def _unit_rows(store: ExperimentStore) -> list[tuple]:
    with store.engine.connect() as conn:
        rows = conn.execute(select(units).order_by(units.c.id)).all()
    return [(r.experiment, r.unit, r.arm, as_utc(r.seen_at)) for r in rows]


def _expected_time(stamp: float) -> dt.datetime:
    """The stored time: whole seconds and the microseconds below them, truncated."""
    whole = int(stamp)
    return dt.datetime.fromtimestamp(whole, dt.timezone.utc) + dt.timedelta(
        microseconds=int((stamp - whole) * 1e6)
    )


def test_sqlite_rows_store_the_time_to_the_microsecond_and_the_latency_rounded(
    tmp_path: Path,
) -> None:
    store = ExperimentStore(f"sqlite:///{tmp_path / 'exp.db'}")
    log = AssignmentLog(store, ServingMetrics())
    now = time.time()
    stamps = {
        "r-now": now,
        "r-almost-next-second": 1_764_460_000.999_999_7,
        "r-half": 1_764_460_000.5,
        "r-whole": 1_764_460_001.0,
        "r-small-fraction": 1_764_460_002.000_001_5,
    }
    latencies = {"r-now": 12.34567, "r-almost-next-second": 0.0004, "r-half": 1000.0,
                 "r-whole": 3.14159, "r-small-fraction": 7.0}  # fmt: skip
    try:
        for request_id, stamp in stamps.items():
            log.offer(_row(request_id, stamp, latencies[request_id]))
        log.offer(_row("r-now", now + 5, 1.0))  # the same request id again: skipped
        assert log.flush(timeout=30)
        with store.engine.connect() as conn:
            rows = {r.request_id: r for r in conn.execute(select(assignments))}
    finally:
        log.close()
        store.close()
    assert set(rows) == set(stamps)
    for request_id, stamp in stamps.items():
        assert as_utc(rows[request_id].logged_at) == _expected_time(stamp), request_id
        assert rows[request_id].latency_ms == round(latencies[request_id], 3), request_id
    assert log.written == len(stamps) + 1 and log.dropped == 0


def test_requests_are_counted_by_arm_and_by_how_they_were_assigned(tmp_path: Path) -> None:
    store = ExperimentStore(f"sqlite:///{tmp_path / 'exp.db'}")
    metrics = ServingMetrics()
    log = AssignmentLog(store, metrics)
    stamp = time.time()
    try:
        # first only rows with a unit (counted in one pass), then a mix with rows assigned
        # at random and mirrored (shadow) calls, which are not requests of their own
        for i in range(6):
            log.offer(_row(f"a{i}", stamp, 1.0, unit=f"u{i}", arm=("control", "treatment")[i % 2]))
        assert log.flush(timeout=30)
        log.offer(_row("b0", stamp, 1.0, unit=None, arm="treatment"))
        log.offer(_row("b1", stamp, 1.0, unit="u9", arm="treatment"))
        log.offer(_row("b1:shadow", stamp, 1.0, unit="u9", arm="treatment", mode="shadow"))
        log.offer(_row("b2", stamp, 1.0, unit=None, arm="control"))
        assert log.flush(timeout=30)
    finally:
        log.close()
        store.close()

    def count(arm: str, assigned: str) -> float | None:
        labels = {"experiment": "exp", "arm": arm, "assigned": assigned}
        return metrics.registry.get_sample_value("cycleml_experiment_requests_total", labels)

    assert count("control", "unit") == 3
    assert count("treatment", "unit") == 4
    assert count("control", "random") == 1
    assert count("treatment", "random") == 1


def test_a_unit_keeps_its_arm_and_the_memory_of_arms_stays_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = ExperimentSpec.from_dict(
        {"model": "m", "arms": {"control": "m", "treatment": "m/2"}, "salt": "s"}, name="exp"
    )
    experiment = ActiveExperiment(
        spec, {"control": Target("m", None), "treatment": Target("m", "2")}
    )
    monkeypatch.setattr(serving_experiments, "UNIT_CACHE_SIZE", 50)
    units = [f"user-{i}" for i in range(400)]
    for _ in range(2):
        for unit in units:
            assert experiment.arm_of(unit) == experiment.assigner.assign(unit)
            assert len(experiment._arm_of_unit) <= 50
    arms = {experiment.arm_of(unit) for unit in units}
    assert arms == {"control", "treatment"}
    # without a unit id the arm is drawn each time, never remembered
    drawn = {experiment.arm_of(None) for _ in range(200)}
    assert drawn == {"control", "treatment"}
    assert None not in experiment._arm_of_unit


def test_a_unit_row_is_written_when_the_unit_is_new_or_its_arm_changes(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the writer process, on SQLite and PostgreSQL: a split row whose unit is
    new to its experiment, or whose arm changed, adds an ab_units row (in the batch: the
    unit's last arm); repeats, mirrored calls and rows without a unit add nothing."""
    store = ExperimentStore(db_url)
    log = AssignmentLog(store, ServingMetrics())
    t0 = 1_764_460_000.5
    try:
        log.offer(_row("a1", t0, 1.0, unit="u1"))
        log.offer(_row("a2", t0 + 1, 1.0, unit="u1"))
        log.offer(_row("a3", t0 + 2, 1.0, unit="u2", arm="treatment"))
        log.offer(_row("a3:shadow", t0 + 2, 1.0, unit="u2", arm="treatment", mode="shadow"))
        log.offer(_row("a4", t0 + 3, 1.0, unit="u3", arm="control"))
        log.offer(_row("a4:shadow", t0 + 3, 1.0, unit="u3", arm="treatment", mode="shadow"))
        log.offer(_row("a5", t0 + 4, 1.0, unit=None))
        log.offer(_row("a6", t0 + 5, 1.0, unit="u1", experiment="other", arm="treatment"))
        assert log.flush(timeout=60)
        first = _unit_rows(store)
        # the same arms again: nothing; u1 ramped to treatment (its first row in the
        # treatment is written, the next one adds nothing), u4 new, u3 there and back
        log.offer(_row("b1", t0 + 10, 1.0, unit="u1"))
        log.offer(_row("b2", t0 + 11, 1.0, unit="u2", arm="treatment"))
        log.offer(_row("b3", t0 + 12, 1.0, unit="u1", arm="treatment"))
        log.offer(_row("b4", t0 + 13, 1.0, unit="u4", arm="treatment"))
        log.offer(_row("b5", t0 + 14, 1.0, unit="u1", arm="treatment"))
        log.offer(_row("b6", t0 + 15, 1.0, unit="u3", arm="treatment"))
        log.offer(_row("b7", t0 + 16, 1.0, unit="u3", arm="control"))
        assert log.flush(timeout=60)
        second = _unit_rows(store)[len(first) :]
        # a bounded memory: past the limit it starts over, and a unit's arm is written again
        monkeypatch.setattr(serving_experiments, "UNIT_CACHE_SIZE", 2)
        log.offer(_row("c1", t0 + 20, 1.0, unit="u5"))
        log.offer(_row("c2", t0 + 21, 1.0, unit="u6"))
        assert log.flush(timeout=60)
        assert len(log._unit_arms) <= 2
        log.offer(_row("c3", t0 + 22, 1.0, unit="u2", arm="treatment"))
        assert log.flush(timeout=60)
        third = _unit_rows(store)[len(first) + len(second) :]
    finally:
        log.close()
        store.close()
    at = _expected_time
    assert first == [
        ("exp", "u1", "control", at(t0)),
        ("exp", "u2", "treatment", at(t0 + 2)),
        ("exp", "u3", "control", at(t0 + 3)),
        ("other", "u1", "treatment", at(t0 + 5)),
    ]
    assert second == [
        ("exp", "u1", "treatment", at(t0 + 12)),
        ("exp", "u4", "treatment", at(t0 + 13)),
        ("exp", "u3", "treatment", at(t0 + 15)),
        ("exp", "u3", "control", at(t0 + 16)),
    ]
    assert third[:2] == [
        ("exp", "u5", "control", at(t0 + 20)),
        ("exp", "u6", "control", at(t0 + 21)),
    ]
    assert third[2:] == [("exp", "u2", "treatment", at(t0 + 22))]
    assert log.dropped == 0


def test_a_unit_whose_rows_failed_to_be_written_is_written_with_the_next_rows(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed write drops its rows; the unit's arm is not taken as written, so the
    unit's next row writes it."""
    store = ExperimentStore(db_url)
    log = AssignmentLog(store, ServingMetrics(), in_process=True)
    write = serving_experiments.write_assignments
    calls = []

    def failing_once(*args: object) -> None:
        calls.append(args)
        if len(calls) == 1:
            raise OSError("disk full")
        write(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(serving_experiments, "write_assignments", failing_once)
    monkeypatch.setattr(serving_experiments, "RETRY_AFTER_S", 0.01)
    stamp = 1_764_460_000.5
    try:
        log.offer(_row("lost", stamp, 1.0, unit="u1", arm="treatment"))
        assert log.flush(timeout=60)
        assert (log.written, log.dropped) == (0, 1)
        log.offer(_row("kept", stamp + 1, 1.0, unit="u1", arm="treatment"))
        assert log.flush(timeout=60)
        stored = _unit_rows(store)
    finally:
        log.close()
        store.close()
    assert len(calls) == 2
    assert stored == [("exp", "u1", "treatment", _expected_time(stamp + 1))]


def test_rows_in_flight_when_the_writer_process_dies_are_dropped_and_written_after(
    tmp_path: Path,
) -> None:
    """The assignment rows are written by a writer process: when it dies mid-write its
    rows are counted dropped (flush returns), and the next rows start a new process."""
    path = tmp_path / "exp.db"
    store = ExperimentStore(f"sqlite:///{path}")
    metrics = ServingMetrics()
    log = AssignmentLog(store, metrics)
    assert log.process is not None
    stamp = time.time()
    try:
        log.offer(_row("before", stamp, 1.0))
        assert log.flush(timeout=60)
        first = log.process.pid
        assert first is not None and first != os.getpid()
        # another connection holds SQLite's write lock: the child's write waits for it
        locker = sqlite3.connect(path, timeout=0)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            log.offer(_row("in-flight", stamp, 1.0, unit="u-lost"))
            deadline = time.monotonic() + 60
            while log._pending or not log.process._busy.locked():
                assert time.monotonic() < deadline, "the writer did not take the row"
                time.sleep(0.01)
            time.sleep(0.3)  # the row is sent; the child waits for the lock
            os.kill(first, signal.SIGKILL)
            assert log.flush(timeout=60)
        finally:
            locker.rollback()
            locker.close()
        assert (log.written, log.dropped) == (1, 1)
        dropped = metrics.registry.get_sample_value("cycleml_experiment_assignments_dropped_total")
        assert dropped == 1
        log.offer(_row("after", stamp, 1.0, unit="u-lost"))
        assert log.flush(timeout=60)
        assert log.written == 2
        second = log.process.pid
        assert second is not None and second != first
        with store.engine.connect() as conn:
            stored = set(conn.execute(select(assignments.c.request_id)).scalars())
            stored_units = set(conn.execute(select(units.c.unit)).scalars())
    finally:
        log.close()
        store.close()
    assert stored == {"before", "after"}
    # the unit of the lost row is written with the next one
    assert stored_units == {"u1", "u-lost"}
    with pytest.raises(ProcessLookupError):  # close() stopped and reaped the process
        os.kill(second, 0)
