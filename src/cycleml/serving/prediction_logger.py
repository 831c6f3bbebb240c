"""The server's side of the prediction log: sampling, a bounded buffer, a writer thread.

A batcher thread hands each finished batch's sampled rows to :meth:`PredictionLogger.offer`,
which only appends to a bounded buffer (no database work, never blocks). One background
thread takes what waits and hands it whole to a writer process
(:mod:`cycleml.serving.writer_process`), which computes the records' features and
writes them in one transaction through :class:`cycleml.monitoring.log.PredictionLog`:
that work holds a GIL of its own, not the server's. A full buffer, a slow database, an
unreachable one or a writer process that died costs log records, never requests: what
could not be written is counted (``cycleml_prediction_log_dropped_total``) and logged,
at most once per ``WARN_EVERY_S``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cycleml.db import safe_url
from cycleml.monitoring.log import (
    LabelReport,
    PredictionColumns,
    PredictionLog,
    columns_from_batch,
)
from cycleml.serving.writer_process import WriterProcess

log = logging.getLogger(__name__)

# at most one warning about dropped records per this many seconds
WARN_EVERY_S = 10.0
# after a failed write (or a failed connect), the next write waits this long; records
# arriving meanwhile stay buffered up to the buffer's bound
RETRY_AFTER_S = 1.0
# the writer gathers records this long (or until WRITE_ROWS wait) before a write: it
# wakes a few times a second, and each transaction's fixed cost is shared by many rows
GATHER_S = 0.25
WRITE_ROWS = 1000


@dataclass(frozen=True)
class LoggedBatch:
    """The sampled rows of one served batch, as the batcher thread hands them over."""

    model: str
    version: str
    kind: str
    class_names: Sequence[str]
    pad_id: int
    request_ids: list[str]
    inputs: np.ndarray
    probabilities: np.ndarray
    embeddings: np.ndarray | None
    logged_at: dt.datetime

    @property
    def rows(self) -> int:
        return len(self.request_ids)

    def head(self, rows: int) -> LoggedBatch:
        """The first ``rows`` rows, copied (a view would keep the whole batch's arrays)."""
        return dataclasses.replace(
            self,
            request_ids=self.request_ids[:rows],
            inputs=self.inputs[:rows].copy(),
            probabilities=self.probabilities[:rows].copy(),
            embeddings=None if self.embeddings is None else self.embeddings[:rows].copy(),
        )


class PredictionLogger:
    """Samples requests and writes their predictions off the serving threads.

    The writes run in a writer process; with ``open_log`` given they run in the writer
    thread itself, through the log that ``open_log`` opens."""

    def __init__(
        self,
        db_url: str,
        sample_rate: float,
        buffer_rows: int,
        buffer_bytes: int,
        on_dropped: Callable[[int], None],
        open_log: Callable[[str], PredictionLog] | None = None,
    ) -> None:
        self.db_url = db_url
        self.sample_rate = sample_rate
        self.buffer_rows = buffer_rows
        self.buffer_bytes = buffer_bytes
        self._on_dropped = on_dropped
        self._open_log = open_log or PredictionLog
        self._log: PredictionLog | None = None
        self.process: WriterProcess | None = (
            WriterProcess("prediction-log-writer", PredictionWriter, db_url)
            if open_log is None
            else None
        )
        self._open_lock = threading.Lock()
        self._pending: deque[LoggedBatch] = deque()
        self._pending_rows = 0
        self._pending_bytes = 0
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._dropped_since_warning = 0
        self._last_warning = 0.0
        self.written = 0
        self.dropped = 0
        if self.process is not None:
            self.process.start()
        self._thread = threading.Thread(target=self._write_loop, name="prediction-log", daemon=True)
        self._thread.start()

    def sampled(self) -> bool:
        """Whether to log the next request (``sample_rate`` of them, at random)."""
        return self.sample_rate >= 1.0 or random.random() < self.sample_rate

    def offer(self, batch: LoggedBatch) -> None:
        """Buffer ``batch`` for the writer; what does not fit in the buffer (a whole
        batch, or the rows of it beyond the bounds) is counted dropped."""
        with self._cond:
            room = 0 if self._closed else self._room(batch)
            if room:
                kept = batch if room == batch.rows else batch.head(room)
                self._pending.append(kept)
                self._pending_rows += kept.rows
                self._pending_bytes += kept.inputs.nbytes
                # wake the writer when it idles, or to write a full batch; not per record
                if len(self._pending) == 1 or self._pending_rows >= WRITE_ROWS:
                    self._cond.notify()
        if room < batch.rows:
            self._drop(batch.rows - room, "the buffer is full")

    def _room(self, batch: LoggedBatch) -> int:
        """How many of ``batch``'s rows the buffer's bounds (rows, input bytes) take."""
        rows = min(batch.rows, self.buffer_rows - self._pending_rows)
        row_bytes = batch.inputs.nbytes // max(batch.rows, 1)
        if row_bytes:
            rows = min(rows, (self.buffer_bytes - self._pending_bytes) // row_bytes)
        return max(rows, 0)

    def attach_labels(self, labels: Sequence[tuple[str, str]]) -> LabelReport:
        """Attach true labels by request id (blocking database work: call it off the
        event loop). A prediction still in the buffer is not yet known to the log."""
        return self.prediction_log().attach_labels(labels)

    def prediction_log(self) -> PredictionLog:
        """The log, opened on first use: a database down at start-up must not stop
        the server."""
        with self._open_lock:
            if self._log is None:
                self._log = self._open_log(self.db_url)
            return self._log

    def close(self, timeout: float = 10.0) -> None:
        """Write what is buffered (within ``timeout``), then stop the writer (and its
        process: one still writing after ``timeout`` is stopped, its rows dropped)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)
        if self.process is not None:
            self.process.close()
        if self._log is not None:
            self._log.close()

    # -- the writer thread -------------------------------------------------------------
    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                gather_until = time.monotonic() + GATHER_S
                while self._pending_rows < WRITE_ROWS and not self._closed:
                    left = gather_until - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if not self._pending:
                    return
                batches = list(self._pending)
                self._pending.clear()
                self._pending_rows = 0
                self._pending_bytes = 0
            rows = sum(batch.rows for batch in batches)
            try:
                self._write(batches)
            except Exception as err:
                self._drop(rows, f"writing to {safe_url(self.db_url)} failed: {err}")
                if not self._closed:
                    time.sleep(RETRY_AFTER_S)
            else:
                self.written += rows

    def _write(self, batches: list[LoggedBatch]) -> None:
        if self.process is not None:
            self.process.write(batches)
        else:
            write_batches(self.prediction_log(), batches)

    def _drop(self, rows: int, why: str) -> None:
        self._on_dropped(rows)
        now = time.monotonic()
        with self._cond:
            self.dropped += rows
            self._dropped_since_warning += rows
            due = now - self._last_warning >= WARN_EVERY_S
            if due:
                count, self._dropped_since_warning = self._dropped_since_warning, 0
                self._last_warning = now
        if due:
            log.warning("prediction log: %d record(s) dropped (%s)", count, why)


def joined(arrays: list[np.ndarray]) -> np.ndarray:
    """The arrays one after the other (the one array itself, uncopied, when alone)."""
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def write_batches(prediction_log: PredictionLog, batches: list[LoggedBatch]) -> None:
    """Write the batches' rows in one transaction: one columns_from_batch per model
    version over all its batches (its features computed on whole arrays, its arrays
    turned to bytes at once)."""
    groups: dict[tuple, list[LoggedBatch]] = {}
    for batch in batches:
        key = (batch.model, batch.version, batch.embeddings is None)
        groups.setdefault(key, []).append(batch)
    columns: list[PredictionColumns] = []
    for group in groups.values():
        first = group[0]
        columns.append(
            columns_from_batch(
                model=first.model,
                version=first.version,
                kind=first.kind,
                class_names=first.class_names,
                request_ids=[rid for batch in group for rid in batch.request_ids],
                inputs=joined([batch.inputs for batch in group]),
                probabilities=joined([batch.probabilities for batch in group]),
                embeddings=None
                if first.embeddings is None
                else joined([batch.embeddings for batch in group]),
                pad_id=first.pad_id,
                logged_at=[batch.logged_at for batch in group for _ in range(batch.rows)],
            )
        )
    prediction_log.write_columns(columns)


class PredictionWriter:
    """The writer process's side (:class:`WriterProcess`): its own log, the batches it
    is sent written through :func:`write_batches`."""

    def __init__(self, db_url: str) -> None:
        self.log = PredictionLog(db_url)

    def __call__(self, batches: list[LoggedBatch]) -> None:
        write_batches(self.log, batches)

    def close(self) -> None:
        self.log.close()
