"""The load-aware batcher: wait policy, bounded queue, batch formation, failures."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from cycleml.serving.batch_policy import ArrivalRate, BatchLatencyModel, extra_wait_s
from cycleml.serving.batcher import (
    DeadlineExceeded,
    DynamicBatcher,
    InferenceFailed,
    RequestQueue,
    WorkItem,
)

# -- policy ----------------------------------------------------------------------------------


def test_latency_model_recovers_fixed_and_per_row_cost() -> None:
    model = BatchLatencyModel()
    assert model.coefficients() is None
    for rows in (1, 4, 16, 32) * 5:
        model.record(rows, 0.002 + 0.0005 * rows)
    a, c = model.coefficients()
    assert a == pytest.approx(0.002, rel=1e-6)
    assert c == pytest.approx(0.0005, rel=1e-6)
    assert model.predict(10) == pytest.approx(0.007, rel=1e-6)


def test_latency_model_needs_two_batch_sizes() -> None:
    model = BatchLatencyModel()
    for _ in range(10):
        model.record(8, 0.01)
    assert model.coefficients() is None


def test_arrival_rate_tracks_gaps_and_decays_in_silence() -> None:
    rate = ArrivalRate(smoothing=0.5)
    for i in range(50):
        rate.record(1, now=i * 0.001)  # 1000 rows/s
    assert rate.rows_per_s(now=0.049) == pytest.approx(1000, rel=0.01)
    # a second of silence: the rate cannot still be 1000/s
    assert rate.rows_per_s(now=1.049) < 1.01


def test_no_wait_at_low_load() -> None:
    # 10 rows/s, 2 ms fixed cost: waiting for the next row would take 100 ms
    assert extra_wait_s(1, 32, 10.0, (0.002, 0.0001), max_delay_s=0.005) == 0.0


def test_wait_when_fixed_cost_dominates_and_rows_arrive_fast() -> None:
    # 20k rows/s, 4 ms fixed, 10 us per row: the batch grows by 20 rows per ms
    wait = extra_wait_s(2, 64, 20_000.0, (0.004, 0.00001), max_delay_s=0.010)
    a, c, n, r = 0.004, 0.00001, 2, 20_000.0
    assert wait == pytest.approx((a - n * c - n / r) / 2)  # the optimum, inside the bounds
    assert 0 < wait < 0.010


def test_wait_is_bounded_by_config_and_by_time_to_fill() -> None:
    latency = (0.050, 0.0)
    assert extra_wait_s(1, 64, 10_000.0, latency, max_delay_s=0.002) == 0.002
    # 4 rows missing at 100k rows/s: 40 us fills the batch
    assert extra_wait_s(60, 64, 100_000.0, latency, max_delay_s=0.010) == pytest.approx(4e-5)
    assert extra_wait_s(64, 64, 100_000.0, latency, max_delay_s=0.010) == 0.0
    assert extra_wait_s(1, 64, 100_000.0, latency, max_delay_s=0.0) == 0.0
    assert extra_wait_s(1, 64, 100_000.0, None, max_delay_s=0.010) == 0.0


def test_no_wait_when_per_row_cost_dominates() -> None:
    # compute-bound model: a row costs as much as the fixed part; batching gains nothing
    assert extra_wait_s(1, 64, 50_000.0, (0.001, 0.001), max_delay_s=0.010) == 0.0


# -- queue -----------------------------------------------------------------------------------


def _item(loop: asyncio.AbstractEventLoop, rows: int = 1, deadline_s: float = 10.0) -> WorkItem:
    return WorkItem(
        inputs=np.zeros((rows, 2), np.float32),
        deadline=time.perf_counter() + deadline_s,
        loop=loop,
        future=loop.create_future(),
    )


def test_queue_is_bounded_and_fifo_within_max_rows() -> None:
    loop = asyncio.new_event_loop()
    try:
        depths = []
        queue = RequestQueue(3, ArrivalRate(), on_depth=depths.append)
        items = [_item(loop, rows) for rows in (2, 3, 1)]
        assert all(queue.put(item) for item in items)
        assert not queue.put(_item(loop))  # full
        ready, expired = queue.take(max_rows=5)
        assert ready == items[:2] and not expired  # 2 + 3 rows; the third would make 6
        ready, _ = queue.take(max_rows=5)
        assert ready == items[2:]
        assert depths[-1] == 0 and max(depths) == 3
    finally:
        loop.close()


def test_a_taker_leaves_waiting_instances_their_share() -> None:
    loop = asyncio.new_event_loop()
    try:
        queue = RequestQueue(64, ArrivalRate())
        items = [_item(loop) for _ in range(9)]
        for item in items:
            queue.put(item)
        # another instance waits in take() (set directly: a real one would have taken
        # the items one by one as they came, before they could pile up)
        queue._idle = 1
        ready, _ = queue.take(max_rows=64)
        assert ready == items[:5]  # half of 9 rows, rounded up; the rest is the other's
        queue._idle = 2
        ready, _ = queue.take(max_rows=64)
        assert ready == items[5:7]  # 4 rows, three takers
        queue._idle = 0  # nobody else waits: all that fits
        ready, _ = queue.take(max_rows=64)
        assert ready == items[7:]
        # a request bigger than the share still goes whole (never past max_rows)
        big, small = _item(loop, rows=6), _item(loop)
        queue.put(big)
        queue.put(small)
        queue._idle = 1
        ready, _ = queue.take(max_rows=64)
        assert ready == [big]
        queue._idle = 0
        ready, _ = queue.take(max_rows=64)
        assert ready == [small]
    finally:
        loop.close()


def test_queue_drops_expired_items_and_removes_withdrawn_ones() -> None:
    loop = asyncio.new_event_loop()
    try:
        queue = RequestQueue(10, ArrivalRate())
        stale, withdrawn, fresh = _item(loop, deadline_s=-1), _item(loop), _item(loop)
        for item in (stale, withdrawn, fresh):
            queue.put(item)
        assert queue.remove(withdrawn)
        assert not queue.remove(withdrawn)
        ready, expired = queue.take(max_rows=8)
        assert ready == [fresh] and expired == [stale]
    finally:
        loop.close()


def test_take_more_waits_for_rows_until_its_deadline() -> None:
    loop = asyncio.new_event_loop()
    try:
        queue = RequestQueue(10, ArrivalRate())
        late = _item(loop, rows=2)
        threading.Timer(0.02, queue.put, args=(late,)).start()
        start = time.perf_counter()
        ready, _ = queue.take_more(max_rows=2, wait_until=start + 1.0)
        assert ready == [late]
        assert time.perf_counter() - start < 0.5  # woke when the rows came, not at 1 s
        start = time.perf_counter()
        ready, _ = queue.take_more(max_rows=2, wait_until=start + 0.03)
        assert ready == [] and time.perf_counter() - start >= 0.025
    finally:
        loop.close()


# -- batcher ---------------------------------------------------------------------------------


class RecordingModel:
    """Doubles its input; records batch sizes; can be held busy by a gate."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.started.set()
        self.gate.wait(5)
        self.batches.append(batch.shape[0])
        if batch.shape[1] == 0:
            raise RuntimeError("bad batch")
        return batch * 2


def _batcher(
    model: RecordingModel, max_rows: int = 8, max_delay_s: float = 0.0, max_requests: int = 64
) -> tuple[RequestQueue, DynamicBatcher]:
    queue = RequestQueue(max_requests, ArrivalRate())
    batcher = DynamicBatcher(
        "test",
        queue,
        model,
        max_rows=max_rows,
        max_delay_s=max_delay_s,
        latency=BatchLatencyModel(),
    )
    batcher.start()
    return queue, batcher


async def _submit(queue: RequestQueue, rows: np.ndarray, deadline_s: float = 10.0) -> WorkItem:
    loop = asyncio.get_running_loop()
    item = WorkItem(
        inputs=rows,
        deadline=time.perf_counter() + deadline_s,
        loop=loop,
        future=loop.create_future(),
    )
    assert queue.put(item)
    return item


def test_idle_instance_runs_a_lone_request_at_once() -> None:
    model = RecordingModel()
    queue, batcher = _batcher(model, max_delay_s=0.5)

    async def scenario() -> WorkItem:
        item = await _submit(queue, np.ones((1, 3), np.float32))
        return await item.future

    start = time.perf_counter()
    item = asyncio.run(scenario())
    assert time.perf_counter() - start < 0.25  # no 0.5 s wait: the rate says it would not pay
    np.testing.assert_array_equal(item.output, np.full((1, 3), 2.0))
    assert model.batches == [1] and item.batch_rows == 1
    queue.close()
    assert batcher.join(5)


def test_busy_instance_batches_what_waits_up_to_max_rows() -> None:
    model = RecordingModel()
    queue, batcher = _batcher(model, max_rows=8)

    async def scenario() -> list[WorkItem]:
        model.gate.clear()
        first = await _submit(queue, np.zeros((1, 2), np.float32))
        while not model.started.is_set():  # the instance is now busy with `first`
            await asyncio.sleep(0.001)
        rest = [await _submit(queue, np.full((2, 2), i, np.float32)) for i in range(6)]
        model.gate.set()
        return [await item.future for item in [first, *rest]]

    items = asyncio.run(scenario())
    # 1 alone, then 12 waiting rows in batches of at most 8 rows, requests never split
    assert model.batches == [1, 8, 4]
    for i, item in enumerate(items[1:]):
        np.testing.assert_array_equal(item.output, np.full((2, 2), 2.0 * i))
    queue.close()
    assert batcher.join(5)


def test_request_past_its_deadline_is_dropped_before_compute() -> None:
    model = RecordingModel()
    queue, batcher = _batcher(model)

    async def scenario() -> tuple[WorkItem, WorkItem]:
        model.gate.clear()
        busy = await _submit(queue, np.zeros((1, 2), np.float32))
        while not model.started.is_set():
            await asyncio.sleep(0.001)
        late = await _submit(queue, np.zeros((1, 2), np.float32), deadline_s=0.01)
        await asyncio.sleep(0.05)
        model.gate.set()
        return await busy.future, await late.future

    busy, late = asyncio.run(scenario())
    assert busy.error is None
    assert isinstance(late.error, DeadlineExceeded) and late.output is None
    assert model.batches == [1]
    queue.close()
    assert batcher.join(5)


def test_runtime_failure_reaches_every_request_of_the_batch() -> None:
    model = RecordingModel()
    queue, batcher = _batcher(model)

    async def scenario() -> WorkItem:
        item = await _submit(queue, np.zeros((1, 0), np.float32))
        return await item.future

    item = asyncio.run(scenario())
    assert isinstance(item.error, InferenceFailed) and "bad batch" in str(item.error)
    queue.close()
    assert batcher.join(5)


def test_closing_the_queue_drains_it_before_the_thread_stops() -> None:
    model = RecordingModel()
    queue, batcher = _batcher(model, max_rows=1)

    async def scenario() -> list[WorkItem]:
        model.gate.clear()
        items = [await _submit(queue, np.zeros((1, 2), np.float32)) for _ in range(4)]
        queue.close()
        assert not queue.put(_item(asyncio.get_running_loop()))
        model.gate.set()
        return [await item.future for item in items]

    items = asyncio.run(scenario())
    assert all(item.error is None for item in items)
    assert batcher.join(5) and model.batches == [1, 1, 1, 1]
