"""A/B experiments in the server: routing requests by unit to arms, and what it records.

Each running experiment on a model name (``configs/serve.yaml`` → ``experiments:``, the
admin routes, or ``cycleml experiment``) sends the requests to that bare model name to
the arm its unit id (a header or a request parameter) hashes to
(:mod:`cycleml.experiments.assign`); requests naming a version or an alias are not
part of it. The model name must be served: an experiment on a name the server does
not serve is refused (at start-up and by the admin route), and one whose model stops
being served (unloaded, its folder removed) routes nothing until the model is served
again, so its requests get the same 404 as its metadata and readiness. An arm that
stops being served answers its units with a 503 naming the experiment and the arm.
In shadow mode every request is answered by the control arm, and the
requests whose unit hashes to the treatment also send the treatment a mirrored copy,
in a task of its own that the answer never waits for.

The routing decision runs on the event loop and costs two dictionary look-ups: the
experiment of the model name, and the arm of the unit, which each experiment revision
remembers (for up to ``UNIT_CACHE_SIZE`` units) after the unit's first request has
computed it (one SHA-256 of the unit id and a bisection). Every routed request (and
every mirrored call) becomes a row of ``ab_assignments``, whatever the prediction
log's sample rate and whether it is on: rows wait in a bounded buffer for a writer
thread, which hands what waits twice a second to a writer process
(:mod:`cycleml.serving.writer_process`) that writes it in one transaction, and rows
that do not fit, or whose write fails, are counted in
``cycleml_experiment_assignments_dropped_total``. The writer thread also derives the
rows of ``ab_units`` (a unit's arm, each time it is new or changed; what feedback by
unit looks up), written in the same transaction.

The experiments live in the project's database (``monitoring.db_url``). A thread polls
them (off the event loop), so a ramp or stop written by the CLI or by another server
process takes effect within ``POLL_INTERVAL_S``; a change through this server's admin
route takes effect at once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import numpy as np
from sqlalchemy import Engine, select

from cycleml.db import chunked, insert_new_rows, open_database, safe_url, utc_now
from cycleml.errors import ConfigError
from cycleml.experiments.assign import Assigner
from cycleml.experiments.store import ExperimentError, ExperimentSpec, ExperimentStore
from cycleml.experiments.tables import assignments, events, units
from cycleml.monitoring.tables import text_problem
from cycleml.registry.refs import ModelRef, parse_model_ref
from cycleml.serving.protocol import ProtocolError
from cycleml.serving.repository import ModelNotFound, ModelUnavailable
from cycleml.serving.writer_process import WriterProcess

if TYPE_CHECKING:
    from cycleml.serving.metrics import ServingMetrics
    from cycleml.serving.repository import ModelRepository
    from cycleml.serving.served_model import ServedModel
    from cycleml.serving.settings import ServeSettings

log = logging.getLogger(__name__)

# a unit id longer than this is refused (400); the column holds 255 characters
MAX_UNIT_CHARS = 255
# seconds between reads of the experiments table
POLL_INTERVAL_S = 1.0
# assignment rows waiting for the writer at most; more are dropped and counted
BUFFER_ROWS = 100_000
# the writer gathers rows this long (or until WRITE_ROWS wait) before one transaction
GATHER_S = 0.5
WRITE_ROWS = 1000
RETRY_AFTER_S = 1.0
# mirrored (shadow) calls in flight per process at most; more are skipped and counted
MAX_SHADOW_INFLIGHT = 64
_IN_CHUNK = 500
# units whose arm each routed experiment remembers (the hash is stable per revision);
# past this many the memory starts over (and so does the writer's memory of the arm of
# each (experiment, unit) it last wrote to ab_units)
UNIT_CACHE_SIZE = 32_768

# the fields of an assignment row as the event loop buffers it (a tuple)
_COLUMNS = (
    "request_id",
    "experiment",
    "arm",
    "unit",
    "model",
    "version",
    "mode",
    "logged_at",  # time.time() until written
    "status_code",
    "latency_ms",
)
# the fields of an ab_units row as the writer thread derives it (a tuple)
_UNIT_COLUMNS = ("experiment", "unit", "arm", "seen_at")  # seen_at: time.time()

# what AssignmentLog._count reads of a row: its unit; its experiment, arm and mode
_UNIT = itemgetter(_COLUMNS.index("unit"))
_COUNTED = itemgetter(_COLUMNS.index("experiment"), _COLUMNS.index("arm"), _COLUMNS.index("mode"))

ARM_HEADER = b"x-experiment-arm"
EXPERIMENT_HEADER = b"x-experiment"


@dataclass(frozen=True)
class Target:
    """What :meth:`ModelRepository.acquire` is asked for to serve an arm."""

    name: str  # "digits" or "digits@champion"
    version: str | None  # "7", or None: the name's default / the alias's version


class ActiveExperiment:
    """One running experiment as the event loop uses it: precomputed once per revision."""

    __slots__ = (
        "spec",
        "name",
        "assigner",
        "header",
        "parameter",
        "targets",
        "treatment",
        "control_target",
        "arm_headers",
        "_arm_of_unit",
    )

    def __init__(self, spec: ExperimentSpec, targets: Mapping[str, Target]) -> None:
        self.spec = spec
        self.name = spec.name
        self.assigner = Assigner(spec.salt, spec.name, spec.weights)
        header = spec.unit_header
        self.header = header.lower().encode("latin-1") if header else None
        self.parameter = spec.unit_parameter
        self.targets = dict(targets)
        self.treatment = spec.treatment  # shadow mode only
        self.control_target = self.targets.get("control")
        self.arm_headers = {
            arm: [(EXPERIMENT_HEADER, spec.name.encode()), (ARM_HEADER, arm.encode())]
            for arm in spec.arms
        }
        # unit id -> its arm under this revision (on the event loop only)
        self._arm_of_unit: dict[str, str] = {}

    def arm_of(self, unit: str | None) -> str:
        """The unit's arm (:meth:`Assigner.assign`), remembered for the next request of
        the same unit: a dictionary look-up instead of a SHA-256. A request without a
        unit id draws its arm at random each time."""
        if unit is None:
            return self.assigner.assign(None)
        known = self._arm_of_unit
        arm = known.get(unit)
        if arm is None:
            if len(known) >= UNIT_CACHE_SIZE:
                known.clear()
            arm = known[unit] = self.assigner.assign(unit)
        return arm

    def unit_of(self, scope: Mapping[str, Any], parameters: Mapping[str, Any] | None) -> str | None:
        """The request's unit id (None: it sent none); a ProtocolError when it is not
        text or is too long."""
        value: Any = None
        if self.header is not None:
            wanted = self.header
            for name, raw in scope["headers"]:
                if name == wanted:
                    value = raw.decode("latin-1")
                    break
        else:
            name = self.parameter
            assert name is not None
            query = scope.get("query_string") or b""
            if query and name.encode() in query:
                found = parse_qs(query.decode("latin-1")).get(name)
                if found:
                    value = found[0]
            if value is None and parameters:
                value = parameters.get(name)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            where = f"request parameter '{self.parameter}'"
            raise ProtocolError(
                f"experiment '{self.name}': unit id in {where} must be text, "
                f"got {type(value).__name__}"
            )
        # too long, or a control character (a NUL that PostgreSQL refuses would fail the
        # whole batch of assignment rows it is written with): the client's error, a 400
        problem = text_problem("unit id", value, MAX_UNIT_CHARS)
        if problem is not None:
            where = (
                f"header {self.spec.unit_header}"
                if self.header is not None
                else f"parameter '{self.parameter}'"
            )
            raise ProtocolError(f"experiment '{self.name}': {where}: {problem}")
        return value


@dataclass(slots=True)
class Routed:
    """The routing decision for one request."""

    experiment: ActiveExperiment
    arm: str  # the arm that answers (control in shadow mode)
    unit: str | None
    target: Target
    shadow: Target | None = None  # shadow mode: the treatment gets a mirrored copy

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return self.experiment.arm_headers[self.arm]

    @property
    def body_fields(self) -> dict[str, str]:
        return {"experiment": self.experiment.name, "arm": self.arm}


@dataclass
class FeedbackEvent:
    """One outcome sent to ``POST /v1/feedback``."""

    event: str
    value: float = 1.0
    request_id: str | None = None
    unit: str | None = None
    experiment: str | None = None


@dataclass
class EventReport:
    received: int
    attached: int
    unknown_request_ids: list[str]
    unknown_units: list[str]
    # request ids whose item named another experiment than the request's own: stored
    # under the request's experiment and arm (the assignment the id names), reported
    mismatched_request_ids: list[str] = field(default_factory=list)


class AssignmentLog:
    """A bounded buffer of assignment rows and the thread that writes them.

    :meth:`offer` runs on the event loop for every routed request, so it takes no lock:
    a length check and a ``deque.append`` (atomic in CPython); the writer is woken only
    when it sleeps. The writer gathers rows for ``GATHER_S``, counts them in
    ``cycleml_experiment_requests_total`` and hands them to a writer process, which
    writes them in one transaction (:func:`write_assignments`); with ``in_process`` the
    thread writes them itself. With them go the ``ab_units`` rows of the units whose arm
    is new or changed (:meth:`_units`).
    """

    def __init__(
        self, store: ExperimentStore, metrics: ServingMetrics, in_process: bool = False
    ) -> None:
        self.store = store
        self._metrics = metrics
        self._pending: deque[tuple] = deque()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._done = threading.Condition(threading.Lock())
        self._offered = 0  # rows offered so far (by the event loop's thread only)
        self._handled = 0  # rows written or dropped (by the writer only)
        self._flushing = 0
        self._counters: dict[tuple[str, str, str], Any] = {}
        # (experiment, unit) -> the arm of its last ab_units row written (writer only)
        self._unit_arms: dict[tuple[str, str], str] = {}
        # experiments whose remembered arms the writer drops before its next rows
        # (:meth:`forget`; appended by other threads, emptied by the writer)
        self._forgotten: deque[str] = deque()
        self.written = 0
        self.dropped = 0
        self._last_warning = 0.0
        self._inserts = sqlite_inserts(store.engine)
        self.process: WriterProcess | None = (
            None
            if in_process
            else WriterProcess("ab-assignments-writer", AssignmentWriter, store.db_url)
        )
        if self.process is not None:
            self.process.start()
        self._thread = threading.Thread(target=self._write_loop, name="ab-assignments", daemon=True)
        self._thread.start()

    def offer(self, row: tuple) -> None:
        """Buffer one row (never blocks on the database); a full buffer drops it."""
        if len(self._pending) >= BUFFER_ROWS or self._closed.is_set():
            self._drop(1, "the buffer is full")
            return
        self._pending.append(row)
        self._offered += 1
        if not self._wake.is_set():
            self._wake.set()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every row offered so far is written (or dropped)."""
        deadline = time.monotonic() + timeout
        target = self._offered
        with self._done:
            self._flushing += 1
        self._wake.set()
        try:
            with self._done:
                while self._handled < target:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._done.wait(min(left, 0.05))
        finally:
            with self._done:
                self._flushing -= 1
        return True

    def forget(self, experiment: str) -> None:
        """Drop the arms remembered for ``experiment``'s units (any thread): each unit's
        next row writes its arm again. Called when the server routes by a new revision
        of the experiment, before its rows: another server may have written another arm
        for a unit since this one wrote the arm it routes the unit to again (a ramp
        there and back), and the latest ab_units row must be the arm of the latest
        request."""
        self._forgotten.append(experiment)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is buffered (within ``timeout``), then stop the writer (and its
        process: one still writing after ``timeout`` is stopped, its rows dropped)."""
        self._closed.set()
        self._wake.set()
        self._thread.join(timeout)
        if self.process is not None:
            self.process.close()

    def _write_loop(self) -> None:
        pending = self._pending
        while True:
            if not pending:
                if self._closed.is_set():
                    return
                self._wake.clear()
                if not pending:
                    self._wake.wait()
                    continue
            if not self._flushing and not self._closed.is_set():
                self._closed.wait(GATHER_S)  # gather: one transaction per many rows
            rows = []
            while pending and len(rows) < WRITE_ROWS * 10:
                rows.append(pending.popleft())
            self._count(rows)
            unit_rows, arms = self._units(rows)
            try:
                self._write(rows, unit_rows)
            except Exception as err:
                self._drop(len(rows), f"writing to {safe_url(self.store.db_url)} failed: {err}")
                if not self._closed.is_set():
                    self._closed.wait(RETRY_AFTER_S)
            else:
                self.written += len(rows)
                self._remember(arms)
            with self._done:
                self._handled += len(rows)
            with self._done:
                self._done.notify_all()

    def _count(self, rows: list[tuple]) -> None:
        """Requests by experiment, arm and how they were assigned (shadow calls aside)."""
        counts: dict[tuple[str, str, str], int] = {}
        if None in map(_UNIT, rows):  # some assigned at random: row by row
            for row in rows:
                if row[6] == "split":
                    key = (row[1], row[2], "random" if row[3] is None else "unit")
                    counts[key] = counts.get(key, 0) + 1
        else:  # every row has a unit: counted in C
            for (experiment, arm, mode), count in Counter(map(_COUNTED, rows)).items():
                if mode == "split":
                    counts[(experiment, arm, "unit")] = count
        for key, count in counts.items():
            counter = self._counters.get(key)
            if counter is None:
                counter = self._counters[key] = self._metrics.experiment_requests.labels(*key)
            counter.inc(count)

    def _units(self, rows: list[tuple]) -> tuple[list[tuple], dict[tuple[str, str], str]]:
        """The ``ab_units`` rows of ``rows`` (``_UNIT_COLUMNS``): one for each ``split``
        row with a unit whose arm differs from the arm last written for its (experiment,
        unit), and the arms of the batch, to remember once written (:meth:`_remember`).
        The arms of the experiments :meth:`forget` names are dropped first."""
        known = self._unit_arms
        if self._forgotten:
            names = set()
            while self._forgotten:
                names.add(self._forgotten.popleft())
            for key in [key for key in known if key[0] in names]:
                del known[key]
        arms: dict[tuple[str, str], str] = {}
        unit_rows = []
        for row in rows:
            unit = row[3]
            if unit is None or row[6] != "split":
                continue
            key = (row[1], unit)
            arm = row[2]
            if (arms.get(key) or known.get(key)) != arm:
                arms[key] = arm
                unit_rows.append((row[1], unit, arm, row[7]))
        return unit_rows, arms

    def _remember(self, arms: dict[tuple[str, str], str]) -> None:
        """The arms of unit rows just written (bounded: past ``UNIT_CACHE_SIZE`` the
        memory starts over, and a unit's next row writes its arm again)."""
        if not arms:
            return
        known = self._unit_arms
        if len(known) + len(arms) > UNIT_CACHE_SIZE:
            known.clear()
        known.update(arms)

    def _write(self, rows: list[tuple], unit_rows: list[tuple]) -> None:
        if self.process is not None:
            self.process.write((rows, unit_rows))
        else:
            write_assignments(self.store.engine, self._inserts, rows, unit_rows)

    def _drop(self, rows: int, why: str) -> None:
        self._metrics.experiment_dropped.inc(rows)
        self.dropped += rows
        now = time.monotonic()
        if now - self._last_warning >= 10.0:
            self._last_warning = now
            log.warning("experiments: %d assignment row(s) dropped (%s)", rows, why)


def _sqlite_time(mark: str) -> str:
    """SQL turning the ``time.time()`` bound to ``mark`` into SQLAlchemy's DATETIME text
    (UTC, microseconds truncated)."""
    whole = f"CAST({mark} AS INTEGER)"
    return (
        f"strftime('%Y-%m-%d %H:%M:%S', {whole}, 'unixepoch') || "
        f"printf('.%06d', CAST(({mark} - {whole}) * 1000000 AS INTEGER))"
    )


def sqlite_inserts(engine: Engine) -> tuple[str, str] | None:
    """SQLite: the statements that take the buffered rows as they are (parameters
    numbered in ``_COLUMNS`` and ``_UNIT_COLUMNS`` order): the assignments'
    insert-or-ignore and the units' insert. SQLite itself turns each ``time.time()``
    into SQLAlchemy's DATETIME text (UTC, microseconds) and rounds the latency, so no
    Python code runs per row. None on other databases."""
    if engine.dialect.name != "sqlite":
        return None
    marks = {name: f"?{i}" for i, name in enumerate(_COLUMNS, start=1)}
    marks["logged_at"] = _sqlite_time(marks["logged_at"])
    marks["latency_ms"] = f"round({marks['latency_ms']}, 3)"
    unit_marks = {name: f"?{i}" for i, name in enumerate(_UNIT_COLUMNS, start=1)}
    unit_marks["seen_at"] = _sqlite_time(unit_marks["seen_at"])
    return (
        f"INSERT INTO {assignments.name} ({', '.join(_COLUMNS)}) "
        f"VALUES ({', '.join(marks.values())}) ON CONFLICT DO NOTHING",
        f"INSERT INTO {units.name} ({', '.join(_UNIT_COLUMNS)}) "
        f"VALUES ({', '.join(unit_marks.values())})",
    )


def write_assignments(
    engine: Engine,
    inserts: tuple[str, str] | None,
    rows: list[tuple],
    unit_rows: Sequence[tuple] = (),
) -> None:
    """Write buffered assignment rows and their ``ab_units`` rows (``_UNIT_COLUMNS``)
    in one transaction (a request id already stored is skipped); on SQLite through the
    driver's ``executemany`` of the tuples themselves with ``inserts``
    (:func:`sqlite_inserts`)."""
    if inserts is not None:
        with engine.begin() as conn:
            conn.exec_driver_sql(inserts[0], rows)
            if unit_rows:
                conn.exec_driver_sql(inserts[1], list(unit_rows))
        return
    utc = dt.timezone.utc
    values = [
        {
            **dict(zip(_COLUMNS, row, strict=True)),
            "logged_at": dt.datetime.fromtimestamp(row[7], utc),
            "latency_ms": round(row[9], 3),
        }
        for row in rows
    ]
    unit_values = [
        {
            "experiment": experiment,
            "unit": unit,
            "arm": arm,
            "seen_at": dt.datetime.fromtimestamp(stamp, utc),
        }
        for experiment, unit, arm, stamp in unit_rows
    ]
    with engine.begin() as conn:
        insert_new_rows(conn, assignments, values)
        insert_new_rows(conn, units, unit_values)


class AssignmentWriter:
    """The writer process's side (:class:`WriterProcess`): its own connection to the
    store's database, the assignment and unit rows it is sent written through
    :func:`write_assignments`."""

    def __init__(self, db_url: str) -> None:
        self.engine = open_database(db_url)
        self.inserts = sqlite_inserts(self.engine)

    def __call__(self, payload: tuple[list[tuple], list[tuple]]) -> None:
        rows, unit_rows = payload
        write_assignments(self.engine, self.inserts, rows, unit_rows)

    def close(self) -> None:
        self.engine.dispose()


async def _never_disconnects() -> dict[str, Any]:
    """The ``receive`` of a mirrored call: it has no client that could leave."""
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}


class ExperimentRouter:
    """The server's experiments: the routing table, the store, the assignment log."""

    def __init__(
        self, settings: ServeSettings, repository: ModelRepository, metrics: ServingMetrics
    ) -> None:
        self.settings = settings
        self.repository = repository
        self.metrics = metrics
        # model name -> its running experiment; replaced whole (never mutated) so the
        # event loop reads it without a lock
        self.active: dict[str, ActiveExperiment] = {}
        self.db_url = settings.monitoring.db_url
        self.store: ExperimentStore | None = None
        self.log: AssignmentLog | None = None
        self._open_lock = threading.Lock()
        self._apply_lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._shadow_tasks: set[asyncio.Task] = set()
        # experiment -> why it is not routed, as last logged (the poll tries every second)
        self._unrouted: dict[str, str] = {}

    # -- start-up, polling, changes (threads, never the event loop) -------------------
    @property
    def wanted(self) -> bool:
        """Whether the server opens the experiments' store at start-up: experiments are
        configured, or the prediction log's database is in use anyway."""
        return bool(self.settings.experiments) or (
            self.settings.monitoring.enabled and self.db_url is not None
        )

    def open_store(self) -> ExperimentStore:
        """The store, opened on first use; a ConfigError without a database."""
        with self._open_lock:
            if self.store is None:
                if self.db_url is None:
                    raise ConfigError(
                        "experiments need a database: set monitoring.db_url "
                        "(sqlite:///path.db or postgresql+psycopg://...)"
                    )
                self.store = ExperimentStore(self.db_url)
                self.log = AssignmentLog(self.store, self.metrics)
                self._start_polling()
            return self.store

    def start(self) -> None:
        """At start-up, once the models are loaded: store the configured experiments
        (a stored one keeps its ramps and stop unless its setup changed), then route by
        what the store says. A configured experiment whose arm cannot be served is a
        ConfigError naming it (the server does not start)."""
        if not self.wanted:
            return
        if not self.settings.experiments:
            # only the prediction log's database: a database down at start-up must not
            # stop the server; the admin routes open the store when they are used
            try:
                self.open_store()
                self.refresh()
            except Exception as err:
                log.warning(
                    "experiments: cannot read them from %s (%s); none are routed",
                    safe_url(str(self.db_url)),
                    err,
                )
            return
        store = self.open_store()
        for name, values in self.settings.experiments.items():
            spec = ExperimentSpec.from_dict(values, name=name)
            self.resolve(spec)  # before storing it: an arm that cannot be served
            store.ensure(spec, source="config")
        self.refresh(strict_names=set(self.settings.experiments))

    def _start_polling(self) -> None:
        def poll() -> None:
            while not self._stop.wait(POLL_INTERVAL_S):
                try:
                    self.refresh()
                except Exception:
                    log.exception("experiments: reading the store failed; trying again")

        self._poller = threading.Thread(target=poll, name="ab-experiments", daemon=True)
        self._poller.start()

    def refresh(self, strict_names: set[str] | None = None) -> None:
        """Route by the store's running experiments now. An experiment whose arm cannot
        be served is left out (and logged), unless it is in ``strict_names``."""
        assert self.store is not None
        specs = {s.model: s for s in self.store.list() if s.status == "running"}
        with self._apply_lock:
            current = self.active
            table: dict[str, ActiveExperiment] = {}
            for model, spec in specs.items():
                before = current.get(model)
                if (
                    before is not None
                    and before.spec.name == spec.name
                    and before.spec.revision == spec.revision
                ):
                    table[model] = before
                    continue
                try:
                    table[model] = ActiveExperiment(spec, self.resolve(spec))
                    if self.log is not None:  # before the first request of this revision
                        self.log.forget(spec.name)
                except ExperimentError as err:
                    if strict_names is not None and spec.name in strict_names:
                        raise
                    if self._unrouted.get(spec.name) != str(err):
                        self._unrouted[spec.name] = str(err)
                        log.error("experiment %s is not routed: %s", spec.name, err)
                    if before is not None and before.spec.name == spec.name:
                        table[model] = before
                    continue
                self._unrouted.pop(spec.name, None)
                log.info(
                    "experiment %s (revision %d) routes model %s: %s",
                    spec.name,
                    spec.revision,
                    model,
                    ", ".join(f"{a} {spec.arms[a]} {w:g}" for a, w in spec.weights.items()),
                )
            running = {spec.name for spec in specs.values()}
            self._unrouted = {n: why for n, why in self._unrouted.items() if n in running}
            for model in set(current) - set(table):
                log.info("experiment %s no longer routes model %s", current[model].name, model)
            self.active = table
            self._release_unused_versions(table)

    def resolve(self, spec: ExperimentSpec, retry_failed: bool = False) -> dict[str, Target]:
        """Each arm's target, loading an arm's version that is not served yet; an
        ExperimentError names an arm that cannot be served, or the experiment's model
        when the server does not serve it (requests to a name that metadata and
        readiness answer 404 for are not routed to arms of other names). An arm's
        version that failed to load is tried again only once its files change, or with
        ``retry_failed`` (a change on the admin route).

        Nothing is loaded for an experiment that cannot route (its release would retire
        it at the next poll, and the poll would load it again): the arms are checked
        before any is loaded, and only an arm naming a version of the experiment's model
        (which may be what serves the model) is loaded before the model must be served.
        """
        parsed_arms = {arm: parse_model_ref(ref) for arm, ref in spec.arms.items()}
        own_versions = [
            arm
            for arm, parsed in parsed_arms.items()
            if parsed.name == spec.model and parsed.version is not None
        ]
        if not own_versions:
            self._check_served(spec)
        served = self.repository.serves(spec.model)
        for arm, parsed in parsed_arms.items():
            # an alias of a model served only once its arms' versions load waits for them
            if served or parsed.name != spec.model or parsed.version is not None:
                self._serve_arm(spec, arm, parsed, load=False, retry_failed=retry_failed)
        targets = {arm: self._serve_arm(spec, arm, parsed_arms[arm]) for arm in own_versions}
        self._check_served(spec)
        for arm, parsed in parsed_arms.items():
            if arm not in targets:
                targets[arm] = self._serve_arm(spec, arm, parsed)
        return {arm: targets[arm] for arm in spec.arms}

    def _serve_arm(
        self,
        spec: ExperimentSpec,
        arm: str,
        parsed: ModelRef,
        load: bool = True,
        retry_failed: bool = False,
    ) -> Target:
        """The target of one arm, its version loaded when it is not served yet
        (``load=False``: only checked; ``retry_failed``: a version that failed to load
        with the same files may be tried again)."""
        version = None if parsed.version is None else str(parsed.version)
        try:
            self.repository.serve_for_experiment(
                parsed.name, version, parsed.alias, load, retry_failed
            )
        except Exception as err:
            raise ExperimentError(
                f"experiment '{spec.name}': arm '{arm}' ({spec.arms[arm]}) cannot be served: {err}"
            ) from None
        if parsed.alias is not None:
            return Target(f"{parsed.name}@{parsed.alias}", None)
        return Target(parsed.name, version)

    def _check_served(self, spec: ExperimentSpec) -> None:
        if not self.repository.serves(spec.model):
            why = self.repository.not_served(spec.model)
            hint = (
                "; an experiment splits the requests to a served model"
                if isinstance(why, ModelNotFound)
                else ""
            )
            raise ExperimentError(f"experiment '{spec.name}': {why}{hint}")

    def _release_unused_versions(self, table: Mapping[str, ActiveExperiment]) -> None:
        wanted: dict[str, set[str]] = {}
        for experiment in table.values():
            for target in experiment.targets.values():
                if target.version is not None:
                    wanted.setdefault(target.name, set()).add(target.version)
        self.repository.keep_for_experiments(wanted)

    def put(self, name: str, values: object) -> ExperimentSpec:
        """Start or update an experiment from the admin route (blocking). A spec with
        ``"status": "stopped"`` is refused (an ExperimentError: a 400): this route
        stores the experiment running, stopping is the stop route's."""
        spec = ExperimentSpec.from_dict(values, name=name)
        if spec.status == "stopped":
            raise ExperimentError(
                f"experiment '{name}': PUT starts or updates an experiment (it runs); "
                f'to stop it, use POST /v1/experiments/{name}/stop (drop "status": "stopped")'
            )
        store = self.open_store()
        self.resolve(spec, retry_failed=True)  # asked for: a failed version is tried again
        stored = store.start(spec, source="admin")
        self.refresh()
        return stored

    def ramp(self, name: str, weights: object, note: str = "") -> ExperimentSpec:
        store = self.open_store()
        if not isinstance(weights, Mapping):
            raise ExperimentError(
                f"experiment '{name}': send {{\"weights\": {{arm: number, ...}}}}, got {weights!r}"
            )
        spec = store.ramp(name, weights, source="admin", note=note)
        self.refresh()
        return spec

    def stop(self, name: str, note: str = "") -> ExperimentSpec:
        spec = self.open_store().stop(name, source="admin", note=note)
        self.refresh()
        return spec

    def listing(self) -> list[dict[str, Any]]:
        routed = {e.name: e for e in self.active.values()}
        out = []
        for spec in self.open_store().list():
            entry = spec.to_dict()
            entry["routed"] = (
                spec.name in routed
                and routed[spec.name].spec.revision == spec.revision
                and self.repository.serves(spec.model)
            )
            out.append(entry)
        return out

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=5)
        if self.log is not None:
            self.log.close()
        if self.store is not None:
            self.store.close()

    # -- the event loop -------------------------------------------------------------------
    def route(
        self,
        model_name: str,
        scope: Mapping[str, Any],
        parameters: Mapping[str, Any] | None = None,
    ) -> Routed | None:
        """The routing decision for a request to the bare model name ``model_name``
        (None: no experiment on it, or the model is not served now: the request gets
        the repository's own answer, as metadata and readiness do)."""
        experiment = self.active.get(model_name)
        if experiment is None or not self.repository.serves(model_name):
            return None
        unit = experiment.unit_of(scope, parameters)
        arm = experiment.arm_of(unit)
        treatment = experiment.treatment
        if treatment is None:
            return Routed(experiment, arm, unit, experiment.targets[arm])
        control = experiment.control_target
        assert control is not None
        if arm == treatment:
            return Routed(experiment, "control", unit, control, experiment.targets[treatment])
        return Routed(experiment, "control", unit, control)

    def acquire(self, routed: Routed, arm: str | None = None) -> ServedModel:
        """The served model of the request's arm (``arm``: another arm, the shadow's),
        held like :meth:`ModelRepository.acquire`. An arm that is not served (its model
        unloaded, its version removed) is a ModelUnavailable (503) naming the experiment
        and the arm: the client asked for a served model name."""
        arm = arm or routed.arm
        target = routed.experiment.targets[arm]
        try:
            return self.repository.acquire(target.name, target.version)
        except (ModelNotFound, ModelUnavailable) as err:
            experiment = routed.experiment
            raise ModelUnavailable(
                f"experiment '{experiment.name}': arm '{arm}' ({experiment.spec.arms[arm]}) "
                f"is not served: {err}"
            ) from None

    def record_answer(
        self, routed: Routed, info: Mapping[str, Any], status: int, started: float
    ) -> None:
        """Buffer the assignment row of a request answered with ``status``; ``info`` is
        the request's access-log record (request id, model, version), ``started`` its
        ``time.perf_counter()`` at arrival."""
        self.record(
            routed,
            str(info.get("request_id")),
            info.get("model", ""),
            info.get("version", ""),
            status,
            time.perf_counter() - started,
        )

    def record(
        self,
        routed: Routed,
        request_id: str,
        model: str,
        version: str,
        status: int,
        latency_s: float,
        mode: str = "split",
        arm: str | None = None,
    ) -> None:
        """Buffer the request's assignment row (on the loop: no database work)."""
        if self.log is None:
            return
        self.log.offer(
            (
                request_id,
                routed.experiment.name,
                arm or routed.arm,
                routed.unit,
                model,
                version,
                mode,
                time.time(),
                status,
                latency_s * 1000.0,
            )
        )

    def mirror(
        self,
        routed: Routed,
        request_id: str,
        deadline_s: float,
        prepare: Callable[[ServedModel], Awaitable[np.ndarray]],
        error_status: Callable[[Exception], int],
    ) -> None:
        """Send the treatment a mirrored copy of a request in a task of its own; its
        answer is recorded (a ``shadow`` row) and never returned."""
        target = routed.shadow
        assert target is not None
        if len(self._shadow_tasks) >= MAX_SHADOW_INFLIGHT:
            self.metrics.experiment_shadow_skipped.labels(routed.experiment.name).inc()
            return
        task = asyncio.get_running_loop().create_task(
            self._mirrored(routed, target, request_id, deadline_s, prepare, error_status)
        )
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _mirrored(
        self,
        routed: Routed,
        target: Target,
        request_id: str,
        deadline_s: float,
        prepare: Callable[[ServedModel], Awaitable[np.ndarray]],
        error_status: Callable[[Exception], int],
    ) -> None:
        from cycleml.serving.dispatch import infer_rows  # noqa: PLC0415 (import cycle)

        started = time.perf_counter()
        shadow_id = f"{request_id}:shadow"
        model_name, version, status = target.name.partition("@")[0], "", 200
        treatment = routed.experiment.treatment
        assert treatment is not None
        try:
            model = self.acquire(routed, treatment)
            try:
                model_name, version = model.name, model.version
                rows = await prepare(model)
                item = await infer_rows(
                    _never_disconnects, model, rows, started + deadline_s, shadow_id
                )
                if item.error is not None:
                    raise item.error
            finally:
                model.release()
        except Exception as err:
            status = error_status(err)
        self.record(
            routed,
            shadow_id,
            model_name,
            version,
            status,
            time.perf_counter() - started,
            mode="shadow",
            arm=treatment,
        )

    # -- outcomes (blocking: call off the loop) --------------------------------------------
    def record_events(self, items: Sequence[FeedbackEvent]) -> EventReport:
        """Store outcome events next to the assignments they belong to. An event whose
        request id or unit matches no assignment is stored with arm null and reported.
        An event whose request id belongs to another experiment than the one the item
        names is stored with the request's experiment and arm, and reported.
        A unit's arm is that of its latest ``ab_units`` row (in the event's experiment
        when it names one): the arm of its latest split assignment."""
        store = self.open_store()
        if self.log is not None:
            self.log.flush()  # rows of requests answered just now are written first
        by_id = sorted({e.request_id for e in items if e.request_id is not None})
        found: dict[str, tuple[str, str]] = {}
        by_unit: dict[tuple[str | None, str], tuple[str, str]] = {}
        with store.engine.connect() as conn:
            for part in chunked(by_id, _IN_CHUNK):
                for row in conn.execute(
                    select(assignments.c.request_id, assignments.c.experiment, assignments.c.arm)
                    .where(assignments.c.request_id.in_(list(part)))
                    .where(assignments.c.mode == "split")
                ):
                    found[row.request_id] = (row.experiment, row.arm)
            for key in {(e.experiment, e.unit) for e in items if e.unit is not None}:
                experiment, unit = key
                query = select(units.c.experiment, units.c.arm).where(units.c.unit == unit)
                if experiment is not None:
                    query = query.where(units.c.experiment == experiment)
                row = conn.execute(query.order_by(units.c.id.desc()).limit(1)).first()
                if row is not None:
                    by_unit[key] = (row.experiment, row.arm)
        now = utc_now()
        rows = []
        unknown_ids: list[str] = []
        unknown_units: list[str] = []
        mismatched_ids: list[str] = []
        for item in items:
            if item.request_id is not None:
                match = found.get(item.request_id)
                if match is None:
                    unknown_ids.append(item.request_id)
                elif item.experiment is not None and item.experiment != match[0]:
                    mismatched_ids.append(item.request_id)
            else:
                assert item.unit is not None
                match = by_unit.get((item.experiment, item.unit))
                if match is None:
                    unknown_units.append(item.unit)
            rows.append(
                {
                    "received_at": now,
                    "experiment": match[0] if match else item.experiment,
                    "request_id": item.request_id,
                    "unit": item.unit,
                    "event": item.event,
                    "value": item.value,
                    "arm": match[1] if match else None,
                }
            )
        with store.engine.begin() as conn:
            conn.execute(events.insert(), rows)
        unknown = len(unknown_ids) + len(unknown_units)
        if unknown:
            self.metrics.feedback_unknown.inc(unknown)
        return EventReport(
            len(items), len(items) - unknown, unknown_ids, unknown_units, mismatched_ids
        )


def parse_event(item: Mapping[str, Any], where: str) -> FeedbackEvent:
    """One outcome item of a feedback body: ``{request_id | unit, event, value?,
    experiment?}``; a ProtocolError names what is wrong."""
    allowed = {"request_id", "unit", "event", "value", "experiment"}
    unknown = sorted(set(item) - allowed)
    if unknown:
        raise ProtocolError(f"{where}: unknown keys {unknown}; allowed: {sorted(allowed)}")
    if ("request_id" in item) == ("unit" in item):
        raise ProtocolError(f"{where}: give exactly one of request_id and unit")
    event = item["event"]
    if not isinstance(event, str) or not event or len(event) > 64:
        raise ProtocolError(f"{where}: event must be a name of 1 to 64 characters, got {event!r}")
    if not event.strip():
        raise ProtocolError(f"{where}: event must be a name, got only whitespace {event!r}")
    value = item.get("value", 1.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ProtocolError(f"{where}: value must be a finite number, got {value!r}")
    experiment = item.get("experiment")
    if experiment is not None and (not isinstance(experiment, str) or not experiment):
        raise ProtocolError(f"{where}: experiment must be an experiment name")
    key = "request_id" if "request_id" in item else "unit"
    ident = item[key]
    if not isinstance(ident, str) or not ident:
        raise ProtocolError(f"{where}: {key} must be non-empty text, got {type(ident).__name__}")
    if len(ident) > MAX_UNIT_CHARS:
        raise ProtocolError(
            f"{where}: {key} is {len(ident)} characters long; at most {MAX_UNIT_CHARS}"
        )
    return FeedbackEvent(
        event=event,
        value=float(value),
        request_id=ident if key == "request_id" else None,
        unit=ident if key == "unit" else None,
        experiment=experiment,
    )
