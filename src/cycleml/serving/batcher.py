"""The load-aware dynamic batcher: a bounded request queue per model version and one
batching thread per model instance.

An idle instance blocks on the queue and runs a request the moment it arrives. While
instances are busy, requests accumulate; the next free instance takes everything that
waits, up to ``max_rows`` rows, and waits for more only as long as
:func:`~cycleml.serving.batch_policy.extra_wait_s` says it pays. Inference runs on the
batching thread (ONNX Runtime releases the GIL); results go back to the event loop
with one ``call_soon_threadsafe`` per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cycleml.serving.batch_policy import ArrivalRate, BatchLatencyModel, extra_wait_s

log = logging.getLogger(__name__)


class DeadlineExceeded(Exception):
    """The request could not start before its deadline; it was dropped before compute."""


class Cancelled(Exception):
    """The client went away while the request was queued."""


class InferenceFailed(Exception):
    """The runtime raised while running the batch that held this request."""


class InputRejected(ValueError):
    """The runtime refused this request's own values (HTTP 400), e.g. an index out of
    range that checks before batching could not see."""


@dataclass(eq=False)
class WorkItem:
    """One request's rows on their way through the queue and a batch."""

    inputs: np.ndarray
    deadline: float  # time.perf_counter() by which the request must have started
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    finished_at: float | None = None
    batch_rows: int = 0
    output: np.ndarray | None = None
    error: Exception | None = None
    # the id this request's prediction is logged under; None: not sampled for the log
    log_id: str | None = None
    # the bundle's embedding output for these rows (asked for only when logged)
    embedding: np.ndarray | None = None
    # what watches the item for its deadline and its client while it waits (set by the
    # HTTP layer, on the event loop)
    guard: Any = None

    @property
    def rows(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def queue_s(self) -> float:
        return (self.started_at or self.finished_at or time.perf_counter()) - self.enqueued_at

    @property
    def inference_s(self) -> float:
        if self.started_at is None or self.finished_at is None:
            return 0.0
        return self.finished_at - self.started_at


def _settle(items: list[WorkItem]) -> None:
    """On the event loop: wake the handlers waiting for these items."""
    for item in items:
        if not item.future.done():
            item.future.set_result(item)


def settle_from_thread(items: list[WorkItem]) -> None:
    """Hand finished items back to their event loops (one wake-up per loop)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[WorkItem]] = {}
    for item in items:
        by_loop.setdefault(item.loop, []).append(item)
    for loop, group in by_loop.items():
        # a closed loop has nobody waiting for these any more
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, group)


class RequestQueue:
    """A bounded FIFO of work items shared by the instances of one model version."""

    def __init__(
        self,
        max_requests: int,
        arrival_rate: ArrivalRate,
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        self.max_requests = max_requests
        self.arrival_rate = arrival_rate
        self._items: deque[WorkItem] = deque()
        self._rows = 0
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._on_depth = on_depth
        # instances blocked in take(), waiting for work
        self._idle = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: WorkItem) -> bool:
        """Queue ``item``; False (and nothing queued) when the queue is full or closed."""
        with self._cond:
            if self._closed or len(self._items) >= self.max_requests:
                return False
            self._items.append(item)
            self._rows += item.rows
            depth = len(self._items)
            self._cond.notify()
        self.arrival_rate.record(item.rows, item.enqueued_at)
        if self._on_depth is not None:
            self._on_depth(depth)
        return True

    def remove(self, item: WorkItem) -> bool:
        """Take ``item`` out if it is still waiting; False if a batch already holds it."""
        with self._cond:
            try:
                self._items.remove(item)
            except ValueError:
                return False
            self._rows -= item.rows
            depth = len(self._items)
        if self._on_depth is not None:
            self._on_depth(depth)
        return True

    def take(self, max_rows: int, wait_until: float | None = None) -> tuple[list, list]:
        """Block until work waits (or ``wait_until`` passes, or the queue closes), then pop
        the waiting items that fit in ``max_rows`` rows.

        Returns ``(ready, expired)``: items to run, and items whose deadline passed in
        the queue (dropped before compute).
        """
        with self._cond:
            self._idle += 1
            try:
                while not self._items and not self._closed:
                    timeout = None if wait_until is None else wait_until - time.perf_counter()
                    if timeout is not None and timeout <= 0:
                        return [], []
                    self._cond.wait(timeout)
            finally:
                self._idle -= 1
            # other instances wait for work: take a fair share of what waits and leave
            # them the rest, so that they run at once instead of idling until this
            # batch ends (with as many clients as one batch holds, all would wait on it)
            share = -(-self._rows // (self._idle + 1)) if self._idle else max_rows
            ready, expired = self._pop_fitting(max_rows, share)
            depth = len(self._items)
            if self._items and self._idle:
                self._cond.notify()
        if self._on_depth is not None and (ready or expired):
            self._on_depth(depth)
        return ready, expired

    def take_more(self, max_rows: int, wait_until: float) -> tuple[list, list]:
        """Wait until ``max_rows`` rows wait or ``wait_until`` passes, then pop what fits."""
        with self._cond:
            while self._rows < max_rows and not self._closed:
                timeout = wait_until - time.perf_counter()
                if timeout <= 0:
                    break
                self._cond.wait(timeout)
            ready, expired = self._pop_fitting(max_rows)
            depth = len(self._items)
        if self._on_depth is not None and (ready or expired):
            self._on_depth(depth)
        return ready, expired

    def _pop_fitting(self, max_rows: int, target: int | None = None) -> tuple[list, list]:
        """Pop waiting items in order while they fit in ``max_rows`` rows, stopping once
        ``target`` rows are taken (at least one item is, when it fits); expired items on
        the way are popped and returned apart."""
        ready: list[WorkItem] = []
        expired: list[WorkItem] = []
        rows = 0
        target = max_rows if target is None else target
        now = time.perf_counter()
        while self._items:
            item = self._items[0]
            if item.deadline < now:
                self._items.popleft()
                self._rows -= item.rows
                expired.append(item)
                continue
            if rows + item.rows > max_rows or rows >= target:
                break
            self._items.popleft()
            self._rows -= item.rows
            rows += item.rows
            ready.append(item)
        return ready, expired

    def close(self) -> None:
        """No more puts; takers drain what is queued and then get nothing."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed


class DynamicBatcher:
    """One model instance: a thread that forms batches from the queue and runs them."""

    def __init__(
        self,
        name: str,
        queue: RequestQueue,
        run: Callable[[np.ndarray], np.ndarray],
        max_rows: int,
        max_delay_s: float,
        latency: BatchLatencyModel,
        # called after each batch the runtime answered (not after a failed one):
        # (items, inputs, outputs, embeddings, seconds), the arrays of the whole batch
        on_batch: Callable[[list[WorkItem], np.ndarray, np.ndarray, np.ndarray | None, float], None]
        | None = None,
        run_logged: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]] | None = None,
    ) -> None:
        self.name = name
        self._queue = queue
        self._run = run
        self._max_rows = max_rows
        self._max_delay_s = max_delay_s
        self._latency = latency
        self._on_batch = on_batch
        # runs a batch that holds a logged request: probabilities and the embedding
        # (None: the prediction log is off, only probabilities are ever asked for)
        self._run_logged = run_logged
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self.batches = 0

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to finish (after the queue closed and drained)."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _serve(self) -> None:
        while True:
            ready, expired = self._queue.take(self._max_rows)
            if not ready and not expired:
                if self._queue.closed:
                    return
                continue
            rows = sum(item.rows for item in ready)
            wait = extra_wait_s(
                rows,
                self._max_rows,
                self._queue.arrival_rate.rows_per_s(),
                self._latency.coefficients(),
                self._max_delay_s,
            )
            if ready and wait > 0:
                more, more_expired = self._queue.take_more(
                    self._max_rows - rows, time.perf_counter() + wait
                )
                ready += more
                expired += more_expired
            for item in expired:
                item.error = DeadlineExceeded()
                item.finished_at = time.perf_counter()
            if expired:
                settle_from_thread(expired)
            if ready:
                self._run_batch(ready)

    def _run_batch(self, items: list[WorkItem]) -> None:
        rows = sum(item.rows for item in items)
        start = time.perf_counter()
        for item in items:
            item.started_at = start
            item.batch_rows = rows
        try:
            inputs = (
                items[0].inputs
                if len(items) == 1
                else np.concatenate([item.inputs for item in items])
            )
            embeddings = None
            if self._run_logged is not None and any(item.log_id for item in items):
                outputs, embeddings = self._run_logged(inputs)
            else:
                outputs = self._run(inputs)
            if outputs.shape[0] != rows:
                raise InferenceFailed(
                    f"model returned {outputs.shape[0]} rows for a batch of {rows}"
                )
        except Exception as err:
            if len(items) > 1:
                # one request's values can fail a whole batch: run each alone so that
                # only the guilty one hears of it, never its neighbours
                log.warning(
                    "instance %s: batch of %d rows failed (%s); running its %d requests one by one",
                    self.name,
                    rows,
                    err,
                    len(items),
                )
                for item in items:
                    self._run_alone(item)
                settle_from_thread(items)
                return
            items[0].error = _failure(err, self.name, rows)
            items[0].finished_at = time.perf_counter()
            settle_from_thread(items)
            return
        end = time.perf_counter()
        self._latency.record(rows, end - start)
        self.batches += 1
        offset = 0
        for item in items:
            item.output = outputs[offset : offset + item.rows]
            if embeddings is not None:
                item.embedding = embeddings[offset : offset + item.rows]
            item.finished_at = end
            offset += item.rows
        settle_from_thread(items)
        if self._on_batch is not None:
            self._on_batch(items, inputs, outputs, embeddings, end - start)

    def _run_alone(self, item: WorkItem) -> None:
        """Run one request of a failed batch on its own (no batch statistics kept)."""
        item.started_at = time.perf_counter()
        item.batch_rows = item.rows
        try:
            output = self._run(item.inputs)
            if output.shape[0] != item.rows:
                raise InferenceFailed(
                    f"model returned {output.shape[0]} rows for a batch of {item.rows}"
                )
            item.output = output
        except Exception as err:
            item.error = _failure(err, self.name, item.rows)
        item.finished_at = time.perf_counter()


def _failure(err: Exception, instance: str, rows: int) -> Exception:
    """What a request hears when the runtime raised on it: its own bad values (a
    ``ValueError`` from the predictor) are the client's to fix, anything else is the
    server's and is logged in full."""
    if isinstance(err, InferenceFailed | InputRejected):
        return err
    if isinstance(err, ValueError):
        return InputRejected(str(err))
    log.error("instance %s: batch of %d rows failed", instance, rows, exc_info=err)
    return InferenceFailed(str(err))
