"""Request guards (deadline and disconnect while queued) and one write per response."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from cycleml.errors import ConfigError
from cycleml.serving import dispatch
from cycleml.serving.batch_policy import ArrivalRate
from cycleml.serving.batcher import Cancelled, DeadlineExceeded, RequestQueue, WorkItem
from cycleml.serving.fast_path import InferenceFastPath
from cycleml.serving.http_protocol import (
    CoalescingHttpToolsProtocol,
    CoalescingTransport,
    connection_protocol,
    missing_uvicorn_internals,
)
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


# -- one write per response ----------------------------------------------------------------------


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5)}.get(name, default)


def test_response_head_and_body_leave_in_one_write() -> None:
    async def scenario() -> RecordingTransport:
        raw = RecordingTransport()
        transport = CoalescingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        transport.write(bytearray(b"{}"))
        assert raw.writes == []  # held until the response is complete
        transport.flush()  # what the protocol does when the response is complete
        assert transport.get_extra_info("peername") == ("127.0.0.1", 5)
        return raw

    raw = asyncio.run(scenario())
    assert raw.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]


def test_write_now_sends_what_waits_first_in_the_same_call() -> None:
    async def scenario() -> RecordingTransport:
        raw = RecordingTransport()
        transport = CoalescingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(b"waiting ")
        transport.write_now(b"answer")
        await asyncio.sleep(0.01)  # the deferred flush has nothing left to send
        return raw

    assert asyncio.run(scenario()).writes == [b"waiting answer"]


def test_a_write_without_a_complete_response_leaves_by_the_next_turn() -> None:
    async def scenario() -> tuple[list[bytes], list[bytes], RecordingTransport]:
        raw = RecordingTransport()
        transport = CoalescingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        first = list(raw.writes)
        transport.write(b"a chunk")
        transport.close()  # closing sends what waits first
        second = list(raw.writes)
        transport.write(b"after close")
        await asyncio.sleep(0.01)
        return first, second, raw

    first, second, raw = asyncio.run(scenario())
    assert first == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    assert second == [*first, b"a chunk"] and raw.closed
    assert raw.writes == second  # nothing goes to a closed connection


# -- the direct path through a real server -------------------------------------------------------


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


def test_application_failure_on_the_direct_path_answers_500_and_closes(
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


# -- which connection protocol ---------------------------------------------------------------


def _served_protocols(running: RunningServer) -> set[type]:
    """The protocol classes of the server's open connections, after one inference on a
    kept-alive connection (answered on the application's fast path)."""
    body, headers = binary_body(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8))
    with httpx.Client(base_url=running.url, timeout=10) as client:
        response = client.post("/v2/models/shapes/infer", content=body, headers=headers)
        assert response.status_code == 200, response.text
        return {type(connection) for connection in list(running.server.server_state.connections)}


def _counting_fast_path(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    answered: list[str] = []
    original = InferenceFastPath.answer

    async def answer(self: InferenceFastPath, scope: Any, receive: Any, route: Any) -> Any:
        answered.append(scope["path"])
        return await original(self, scope, receive, route)

    monkeypatch.setattr(InferenceFastPath, "answer", answer)
    return answered


def test_http_protocol_uvicorn_serves_with_uvicorns_protocol_and_the_fast_path(
    image_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answered = _counting_fast_path(monkeypatch)
    with RunningServer(settings(image_bundle, http_protocol="uvicorn")) as running:
        assert _served_protocols(running) == {HttpToolsProtocol}
    assert answered == ["/v2/models/shapes/infer"]
    with RunningServer(settings(image_bundle)) as running:
        assert _served_protocols(running) == {CoalescingHttpToolsProtocol}


def test_an_unknown_http_protocol_is_refused(image_bundle: Path) -> None:
    with pytest.raises(ConfigError, match="http_protocol must be one of cycleml, uvicorn"):
        settings(image_bundle, http_protocol="h11")


def _changed_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if a new uvicorn passed its parser to on_headers_complete (it still works)."""
    original = HttpToolsProtocol.on_headers_complete

    def on_headers_complete(self: HttpToolsProtocol, parser: Any = None) -> None:
        original(self)

    monkeypatch.setattr(HttpToolsProtocol, "on_headers_complete", on_headers_complete)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (_changed_signature, "HttpToolsProtocol.on_headers_complete(self)"),
        (
            lambda mp: mp.delattr(HttpToolsProtocol, "on_response_complete"),
            "HttpToolsProtocol.on_response_complete(self)",
        ),
        (
            lambda mp: mp.delattr(httptools_impl, "RequestResponseCycle"),
            "RequestResponseCycle",
        ),
    ],
    ids=["changed signature", "missing method", "missing class"],
)
def test_a_uvicorn_without_the_internals_falls_back_to_its_own_protocol(
    change: Any, named: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert missing_uvicorn_internals() == []  # the installed uvicorn is the one written for
    assert connection_protocol("cycleml") is CoalescingHttpToolsProtocol
    change(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="cycleml.serving.http_protocol"):
        assert connection_protocol("cycleml") == "httptools"
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert named in warning.getMessage()
    assert "serving with uvicorn's own httptools protocol" in warning.getMessage()


def test_a_server_on_a_changed_uvicorn_serves_with_uvicorns_protocol(
    image_bundle: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _changed_signature(monkeypatch)
    answered = _counting_fast_path(monkeypatch)
    with (
        caplog.at_level(logging.WARNING, logger="cycleml.serving.http_protocol"),
        RunningServer(settings(image_bundle)) as running,
    ):
        assert _served_protocols(running) == {HttpToolsProtocol}
    assert answered == ["/v2/models/shapes/infer"]
    warnings = [r for r in caplog.records if r.name == "cycleml.serving.http_protocol"]
    assert len(warnings) == 1 and "on_headers_complete" in warnings[0].getMessage()
