"""Request guards (deadline and disconnect while queued), the server's HTTP behaviour on
raw connections, and its event loop that accepts every waiting connection."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from cycleml.serving import body_guard, dispatch
from cycleml.serving.accept_loop import GreedyAcceptServer, new_event_loop
from cycleml.serving.batch_policy import ArrivalRate
from cycleml.serving.batcher import Cancelled, DeadlineExceeded, RequestQueue, WorkItem
from cycleml.serving.body_guard import BodyBudget, BodyTimeout, GuardedReceive
from cycleml.serving.coalescing import CoalescingTransport
from cycleml.serving.fast_path import InferenceFastPath
from test_serving_support import (  # noqa: F401 - the *_fixture names register fixtures
    IMAGE_SIZE,
    RunningServer,
    binary_body,
    image_bundle_fixture,
    settings,
)

# -- guards ----------------------------------------------------------------------------------


class QueueOnlyModel:
    """A model whose queue nobody takes from: requests wait until withdrawn."""

    def __init__(self) -> None:
        self.queue = RequestQueue(16, ArrivalRate())

    def submit(self, rows: np.ndarray, deadline: float, request_id: str | None = None) -> WorkItem:
        loop = asyncio.get_running_loop()
        item = WorkItem(inputs=rows, deadline=deadline, loop=loop, future=loop.create_future())
        assert self.queue.put(item)
        return item

    def withdraw(self, item: WorkItem) -> bool:
        return self.queue.remove(item)


def _rows() -> np.ndarray:
    return np.zeros((1, 2), np.float32)


async def _never_disconnects() -> dict[str, Any]:
    await asyncio.sleep(3600)
    return {"type": "http.disconnect"}


def test_queued_request_is_withdrawn_at_its_deadline_long_or_short() -> None:
    model = QueueOnlyModel()

    async def scenario(timeout_s: float) -> tuple[WorkItem, float]:
        start = time.perf_counter()
        item = await dispatch.infer_rows(
            _never_disconnects,
            model,
            _rows(),
            start + timeout_s,  # type: ignore[arg-type]
        )
        return item, time.perf_counter() - start

    # 20 ms: its own timer; 150 ms: watched from 50 ms on, with the others of its loop
    for timeout_s in (0.02, 0.15):
        item, waited = asyncio.run(scenario(timeout_s))
        assert isinstance(item.error, DeadlineExceeded)
        assert timeout_s <= waited < timeout_s + 0.25
        assert len(model.queue) == 0
    assert not dispatch._watchlists  # nothing waits: no list, no timer left behind


def test_request_answered_quickly_needs_no_guard_of_its_own() -> None:
    model = QueueOnlyModel()

    async def scenario() -> list[WorkItem]:
        async def answered_soon() -> WorkItem:
            task = asyncio.ensure_future(
                dispatch.infer_rows(
                    _never_disconnects,  # type: ignore[arg-type]
                    model,
                    _rows(),
                    time.perf_counter() + 10,
                )
            )
            await asyncio.sleep(0.005)
            ready, _ = model.queue.take(1)
            ready[0].future.set_result(ready[0])
            return await task

        items = [await answered_soon() for _ in range(5)]
        await asyncio.sleep(0.1)  # past the watch age: the list finds them answered
        return items

    items = asyncio.run(scenario())
    assert all(item.guard is None and item.error is None for item in items)
    assert not dispatch._watchlists


def test_client_that_leaves_after_the_watch_age_is_cancelled() -> None:
    model = QueueOnlyModel()

    async def scenario() -> tuple[WorkItem, float]:
        start = time.perf_counter()

        async def leaves_at_80ms() -> dict[str, Any]:
            await asyncio.sleep(max(start + 0.08 - time.perf_counter(), 0))
            return {"type": "http.disconnect"}

        item = await dispatch.infer_rows(leaves_at_80ms, model, _rows(), start + 10)
        return item, time.perf_counter() - start

    item, waited = asyncio.run(scenario())
    assert isinstance(item.error, Cancelled)
    assert 0.08 <= waited < 0.5
    assert len(model.queue) == 0


def test_a_body_deadline_ends_a_waiting_receive_and_the_watch_forgets_finished_bodies() -> None:
    budget = BodyBudget(1000)

    async def scenario() -> tuple[float, bool, int, bool]:
        async def complete() -> dict[str, Any]:
            return {"type": "http.request", "body": b"x" * 10, "more_body": False}

        finished = []
        for _ in range(50):  # bodies that arrived at once: watched, and soon forgotten
            guarded = GuardedReceive(complete, budget, 0.2, reserved=10)
            budget.take(10)
            await guarded()
            guarded.release()
            finished.append(guarded)
        # a released body leaves the watch at once (it would keep its request's task
        # alive until the next sweep)
        watch = body_guard._deadlines[asyncio.get_running_loop()]
        assert not watch._watched
        start = time.perf_counter()
        stalled = GuardedReceive(_never_disconnects, budget, 0.2)
        with pytest.raises(BodyTimeout, match="limits.body_timeout_s"):
            await stalled()
        waited = time.perf_counter() - start
        # the task that waited is not left cancelled: the request can still be answered
        task = asyncio.current_task()
        assert task is not None
        await asyncio.sleep(0)
        watched = asyncio.get_running_loop() in body_guard._deadlines
        return waited, task.cancelling() == 0, budget.held, watched

    waited, not_cancelled, held, watched = asyncio.run(scenario())
    assert 0.2 <= waited < 1.2
    assert not_cancelled and held == 0
    assert not watched  # nothing arrives any more: no watch, no timer left behind


# -- through a real server ------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes_server(image_bundle: Path) -> Iterator[RunningServer]:
    with RunningServer(settings(image_bundle)) as running:
        yield running


def _infer_request(request_id: str, extra: str = "") -> tuple[bytes, bytes]:
    pixels = np.random.default_rng(0).integers(0, 256, (1, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    body, headers = binary_body(pixels)
    head = (
        f"POST /v2/models/shapes/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        f"X-Request-Id: {request_id}\r\n{extra}"
        + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        + "\r\n"
    ).encode("latin-1")
    return head, body


def _read_responses(sock: socket.socket, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    """``count`` HTTP/1.1 responses (Content-Length bodies) from ``sock``."""
    data = b""
    responses = []
    sock.settimeout(10)
    while len(responses) < count:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            lines = data[:end].decode("latin-1").split("\r\n")
            headers = dict(line.lower().split(": ", 1) for line in lines[1:])
            size = int(headers.get("content-length", "0"))
            if len(data) >= end + 4 + size:
                status = int(lines[0].split()[1])
                if status != 100:
                    responses.append((status, headers, data[end + 4 : end + 4 + size]))
                data = data[end + 4 + size :]
                continue
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed after {len(responses)} responses")
        data += chunk
    return responses


def test_pipelined_requests_are_answered_in_order(shapes_server: RunningServer) -> None:
    first, second = _infer_request("first"), _infer_request("third")
    health = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Request-Id: second\r\n\r\n"
    with socket.create_connection(("127.0.0.1", shapes_server.port)) as sock:
        sock.sendall(b"".join((*first, health, *second)))  # three requests in one packet
        responses = _read_responses(sock, 3)
    assert [r[0] for r in responses] == [200, 200, 200]
    assert [r[1]["x-request-id"] for r in responses] == ["first", "second", "third"]
    assert json.loads(responses[1][2]) == {"live": True}


def test_a_request_id_that_is_not_printable_ascii_is_replaced(
    shapes_server: RunningServer,
) -> None:
    head, body = _infer_request("café")  # sent as latin-1, which HTTP allows in values
    with socket.create_connection(("127.0.0.1", shapes_server.port)) as sock:
        sock.sendall(head + body)
        [(status, headers, _)] = _read_responses(sock, 1)
    assert status == 200
    assert headers["x-request-id"] != "café" and headers["x-request-id"].isascii()


def test_expect_continue_and_chunked_bodies_are_answered(shapes_server: RunningServer) -> None:
    head, body = _infer_request("asks-first", extra="Expect: 100-continue\r\n")
    with socket.create_connection(("127.0.0.1", shapes_server.port)) as sock:
        sock.sendall(head)
        sock.settimeout(10)
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        [(status, headers, _)] = _read_responses(sock, 1)
    assert status == 200 and headers["x-request-id"] == "asks-first"

    _, body = _infer_request("chunked")
    length = body.index(b"}]}") + 3  # the JSON header of the binary body
    response = httpx.post(
        f"{shapes_server.url}/v2/models/shapes/infer",
        content=iter([body[:100], body[100:]]),  # no Content-Length: sent chunked
        headers={"Inference-Header-Content-Length": str(length)},
    )
    assert response.status_code == 200, response.text


def test_application_failure_on_the_fast_path_answers_500_and_closes(
    shapes_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(shapes_server.app._asgi.fast_path, "answer", broken)
    with socket.create_connection(("127.0.0.1", shapes_server.port)) as sock:
        sock.sendall(b"".join(_infer_request("doomed")))
        [(status, headers, body)] = _read_responses(sock, 1)
        assert status == 500 and body == b"Internal Server Error"
        assert headers["connection"] == "close"
        assert sock.recv(1) == b""  # closed
    monkeypatch.undo()
    assert httpx.get(f"{shapes_server.url}/v2/health/ready").status_code == 200


def _counting_fast_path(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    answered: list[str] = []
    original = InferenceFastPath.answer

    async def answer(self: InferenceFastPath, scope: Any, receive: Any, route: Any) -> Any:
        answered.append(scope["path"])
        return await original(self, scope, receive, route)

    monkeypatch.setattr(InferenceFastPath, "answer", answer)
    return answered


def test_inference_on_a_kept_alive_connection_takes_the_fast_path(
    shapes_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    answered = _counting_fast_path(monkeypatch)
    body, headers = binary_body(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8))
    with httpx.Client(base_url=shapes_server.url, timeout=10) as client:
        for _ in range(3):
            response = client.post("/v2/models/shapes/infer", content=body, headers=headers)
            assert response.status_code == 200, response.text
            assert "close" not in response.headers.get("connection", "")
        assert client.get("/v2/health/live").status_code == 200
    assert answered == ["/v2/models/shapes/infer"] * 3  # health went through the framework


# -- the event loop --------------------------------------------------------------------------


def test_the_server_accepts_on_the_greedy_accept_loop(shapes_server: RunningServer) -> None:
    assert [type(s) for s in shapes_server.server.servers] == [GreedyAcceptServer]


def test_every_waiting_connection_is_accepted_in_one_turn_and_other_servers_fall_back() -> None:
    class Counting(asyncio.Protocol):
        made: list[asyncio.BaseTransport] = []

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            Counting.made.append(transport)

    async def scenario() -> tuple[int, int, type, type]:
        loop = asyncio.get_running_loop()
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        server = await loop.create_server(Counting, sock=listening, backlog=64)
        port = listening.getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        # the connections wait in the kernel's queue; one readable poll takes them all
        server._accept_waiting()  # type: ignore[attr-defined]
        queued = len(server._connecting)  # type: ignore[attr-defined]
        await asyncio.sleep(0.05)
        made = len(Counting.made)
        # a host and port, or options the loop does not handle: uvloop's own server
        on_port = await loop.create_server(Counting, "127.0.0.1", 0)
        other = socket.socket()
        other.bind(("127.0.0.1", 0))
        with_options = await loop.create_server(Counting, sock=other, ssl_handshake_timeout=None)
        kinds = type(on_port), type(with_options)
        for each in (server, on_port, with_options):
            each.close()
            await each.wait_closed()
        for client in clients:
            client.close()
        for transport in Counting.made:
            transport.close()
        return queued, made, *kinds

    loop = new_event_loop()
    try:
        queued, made, on_port, with_options = loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert queued == 5 and made == 5
    assert on_port is not GreedyAcceptServer and with_options is not GreedyAcceptServer


@pytest.mark.parametrize("coalesce", [True, False])
def test_each_response_leaves_in_one_write_unless_coalescing_is_off(
    image_bundle: Path, monkeypatch: pytest.MonkeyPatch, coalesce: bool
) -> None:
    """uvicorn writes a response's head and its body each on its own; with
    ``coalesce_writes`` (the default) the connection's transport sends them in one
    write: three responses on a kept-alive connection, three writes."""
    writes: list[int] = []  # pieces joined into each write
    original = CoalescingTransport.flush

    def counting(self: CoalescingTransport) -> None:
        if self._pending:
            writes.append(len(self._pending))
        original(self)

    monkeypatch.setattr(CoalescingTransport, "flush", counting)
    with RunningServer(settings(image_bundle, coalesce_writes=coalesce)) as running:
        health = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
        with socket.create_connection(("127.0.0.1", running.port)) as sock:
            for name in ("one", "two"):
                sock.sendall(b"".join(_infer_request(name)))
                [(status, headers, _)] = _read_responses(sock, 1)
                assert status == 200 and headers["x-request-id"] == name
            sock.sendall(health)
            [(status, _, body)] = _read_responses(sock, 1)
            assert status == 200 and json.loads(body) == {"live": True}
        # a connection httpx made to see the server ready had its responses coalesced too
        connection_writes = writes[-3:]
    if coalesce:
        assert connection_writes == [2, 2, 2]
    else:
        assert writes == []
