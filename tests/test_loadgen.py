"""The closed-loop load generator against small canned servers on loopback: request
order, heads and bodies split over reads, closes, timeouts and connection errors."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest

from cycleml.serving.loadgen import Result, build_request, closed_loop, run

T = TypeVar("T")

# an answer writes the response to one request: True to keep the connection for the next
Answer = Callable[[str, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


def _response(status: int = 200, body: bytes = b"ok", extra: str = "") -> bytes:
    reason = {200: "OK", 201: "Created", 429: "Too Many Requests"}.get(status, "Other")
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


async def _plain(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(_response())
    await writer.drain()
    return True


class CannedServer:
    """An asyncio server on a free loopback port that reads HTTP/1.1 requests (with
    Content-Length bodies) and lets ``answer`` respond; it notes each request's
    connection number and path."""

    def __init__(self, answer: Answer = _plain) -> None:
        self.answer = answer
        self.requests: list[tuple[int, str]] = []
        self.connections = 0
        self.open = 0  # connections the server has not seen closed yet

    async def __aenter__(self) -> CannedServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = self.connections
        self.connections += 1
        self.open += 1
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).lower()
                length = int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
                await reader.readexactly(length)
                path = head.split(b" ", 2)[1].decode()
                self.requests.append((number, path))
                if not await self.answer(path, reader, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()


def _requests(port: int, count: int, body: bytes = b"") -> list[bytes]:
    return [build_request("127.0.0.1", port, "POST", f"/r{i}", body) for i in range(count)]


async def _against(
    answer: Answer,
    paths: int,
    concurrency: int,
    duration_s: float,
    timeout_s: float,
    max_requests: int = 1_000_000,
) -> tuple[list[Result], CannedServer]:
    """A closed loop against a canned server answering with ``answer``, over requests
    for ``paths`` paths; the results and the server."""
    async with CannedServer(answer) as server:
        requests = _requests(server.port, paths)
        results = await closed_loop(
            "127.0.0.1", server.port, requests, concurrency, duration_s, timeout_s, max_requests
        )
        return results, server


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, T]], T]:
    """Runs a coroutine on asyncio's own loop, or on uvloop through ``loadgen.run``."""
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
        return run
    return asyncio.run


def test_each_client_sends_its_share_of_the_requests_in_order(loop_run: Callable) -> None:
    async def scenario() -> tuple[list[Result], CannedServer]:
        async with CannedServer() as server:
            body = b"x" * 300
            results = await closed_loop(
                "127.0.0.1", server.port, _requests(server.port, 5, body), 3, 10.0, 5.0, 40
            )
            return results, server

    results, server = loop_run(scenario())
    # it stops sending at 40 results; the clients' last exchanges still end
    assert 40 <= len(results) <= 42
    assert len(server.requests) == len(results)
    assert {r.status for r in results} == {200} and {r.error for r in results} == {None}
    assert all(r.intended == r.sent <= r.done for r in results)
    assert [r.done for r in results] == sorted(r.done for r in results)
    assert server.connections == 3  # keep-alive: one connection per client
    for number in range(3):
        paths = [path for n, path in server.requests if n == number]
        client = int(paths[0][2:])  # client i's first request is requests[i]
        assert paths == [f"/r{(client + n * 3) % 5}" for n in range(len(paths))]
    assert sorted(int(paths[2:]) for n, paths in server.requests[:3]) == [0, 1, 2]


def test_it_stops_at_the_duration(loop_run: Callable) -> None:
    async def scenario() -> tuple[list[Result], float]:
        async with CannedServer() as server:
            started = time.perf_counter()
            results = await closed_loop("127.0.0.1", server.port, _requests(server.port, 2), 4, 0.3)
            return results, time.perf_counter() - started

    results, took = loop_run(scenario())
    assert 0.3 <= took < 1.0
    assert len(results) > 20 and {r.status for r in results} == {200}
    assert max(r.sent for r in results) < min(r.intended for r in results) + 0.3


def test_heads_and_bodies_split_over_reads_and_header_case(loop_run: Callable) -> None:
    pieces = {
        # the head cut inside a name, before its blank line and within the CRLFCRLF
        "/r0": [
            b"HTTP/1.1 200 OK\r\nContent-Le",
            b"ngth: 10\r\nX-A: b\r",
            b"\n\r\n0123",
            b"456789",
        ],
        # the body in three parts, the header names in other cases
        "/r1": [b"HTTP/1.1 201 Created\r\nRETRY-AFTER: 1\r\ncontent-LENGTH:  6 \r\n\r\n", b"ab"]
        + [b"cd", b"ef"],
        "/r2": [b"HTTP/1.1 429 Too Many Requests\r\nretry-after:2\r\nContent-Length: 0\r\n\r\n"],
    }

    async def answer(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        for piece in pieces[path]:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.02)
        return True

    async def scenario() -> list[Result]:
        async with CannedServer(answer) as server:
            return await closed_loop(
                "127.0.0.1", server.port, _requests(server.port, 3), 1, 10.0, 5.0, 9
            )

    results = loop_run(scenario())
    # one client: the n-th result answers requests[n % 3]; each waited for its last piece
    assert [r.status for r in results] == [200, 201, 429] * 3
    assert [r.retry_after for r in results] == [False, True, True] * 3
    assert {r.error for r in results} == {None}
    waits = [0.06, 0.04, 0.0] * 3  # the sleeps before each response's last piece
    assert all(r.done - r.sent >= wait for r, wait in zip(results, waits, strict=True))


def test_bytes_beyond_an_answer_are_taken_as_the_next_answer(loop_run: Callable) -> None:
    """As a keep-alive client reads a stream: an extra response is the next one's answer."""
    answers = {
        "/r0": _response(200) + _response(201),
        "/r1": _response(202),
        "/r2": _response(203, b"a longer body"),
    }

    async def answer(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(answers[path])
        await writer.drain()
        return True

    results, server = loop_run(_against(answer, 3, 1, 10.0, 5.0, 8))
    assert [r.status for r in results] == [200, 201, 202, 203] * 2
    assert [path for _, path in server.requests] == ["/r0", "/r1", "/r2"] * 2 + ["/r0", "/r1"]
    assert server.connections == 1


def test_connection_close_answers_count_and_the_next_goes_on_a_new_connection(
    loop_run: Callable,
) -> None:
    async def answer(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        close = path in ("/r1", "/r3")
        writer.write(_response(extra="Connection: Close\r\n" if close else ""))
        await writer.drain()
        return not close

    results, server = loop_run(_against(answer, 4, 2, 10.0, 5.0, 40))
    assert len(results) in (40, 41) and {r.status for r in results} == {200}
    assert {r.error for r in results} == {None} and len(server.requests) == len(results)
    # client 1 sends /r1, /r3, /r1, ... each on a connection of its own; client 0 keeps one
    closing = [n for n, path in server.requests if path in ("/r1", "/r3")]
    kept = {n for n, path in server.requests if path in ("/r0", "/r2")}
    assert len(closing) >= 5 and len(set(closing)) == len(closing) and len(kept) == 1
    assert server.connections == 1 + len(closing)


def test_a_request_left_unanswered_times_out_and_the_client_goes_on(loop_run: Callable) -> None:
    async def answer(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if path == "/r0":
            await reader.read()  # no answer, until the client gives up and closes
            return False
        writer.write(_response())
        await writer.drain()
        return True

    results, server = loop_run(_against(answer, 3, 1, 0.8, 0.2))
    timeouts = [r for r in results if r.status == 0]
    assert {r.error for r in timeouts} == {"TimeoutError"}
    assert timeouts and all(0.2 <= r.done - r.sent < 0.35 for r in timeouts)
    # after each time-out the client opened a new connection and went on with /r1, /r2
    assert server.connections == len(timeouts) + (results[-1].status != 0)
    assert [r.status for r in results[:4]] == [0, 200, 200, 0]
    assert len(results) == len(server.requests)


def test_a_server_that_never_answers_ends_the_run_after_the_timeout(loop_run: Callable) -> None:
    async def answer(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await reader.read()
        return False

    async def scenario() -> tuple[list[Result], CannedServer, float]:
        async with CannedServer(answer) as server:
            started = time.perf_counter()
            results = await closed_loop(
                "127.0.0.1", server.port, _requests(server.port, 1), 2, 0.5, 0.2
            )
            return results, server, time.perf_counter() - started

    results, server, took = loop_run(scenario())
    # each client: sent at 0, 0.2, 0.4, each timing out 0.2 s later; none sent from 0.5 on
    # (on a busy machine a late watchdog may leave the third one unsent)
    assert 4 <= len(results) <= 6
    assert {(r.status, r.error) for r in results} == {(0, "TimeoutError")}
    assert server.connections == len(results)
    assert 0.5 <= took < 1.2


@pytest.mark.parametrize(
    ("how", "error"),
    [
        ("close_mid_body", "IncompleteReadError"),
        ("close_mid_head", "IncompleteReadError"),
        ("close_at_once", "IncompleteReadError"),
        ("reset", "ConnectionResetError"),
        ("bad_status_line", "ValueError"),
        ("bad_content_length", "ValueError"),
        ("huge_head", "ValueError"),
    ],
)
def test_a_broken_answer_is_an_error_and_the_client_reconnects(
    loop_run: Callable, how: str, error: str
) -> None:
    async def answer(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if path != "/r1":
            writer.write(_response())
            await writer.drain()
            return True
        if how == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        writer.write(
            {
                "close_mid_body": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
                "close_mid_head": b"HTTP/1.1 200 OK\r\nContent-Len",
                "close_at_once": b"",
                "bad_status_line": b"HTTP/1.1 OK\r\nContent-Length: 0\r\n\r\n",
                "bad_content_length": b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
                "huge_head": b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000,
            }[how]
        )
        await writer.drain()
        if how == "huge_head":
            await reader.read()  # the client gives up on the head and closes
        return False

    results, server = loop_run(_against(answer, 3, 1, 10.0, 5.0, 12))
    assert [r.status for r in results] == [200, 0, 200] * 4
    assert [r.error for r in results] == [None, error, None] * 4
    assert server.connections == 5  # a new connection after each broken answer
    assert [path for _, path in server.requests] == ["/r0", "/r1", "/r2"] * 4


def test_a_refused_port_gives_errors_at_a_bounded_rate_until_the_duration(
    loop_run: Callable,
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound but not listening: connections are refused

        async def scenario() -> tuple[list[Result], float]:
            started = time.perf_counter()
            results = await closed_loop("127.0.0.1", port, _requests(port, 2), 2, 0.3, 1.0)
            return results, time.perf_counter() - started

        results, took = loop_run(scenario())
    assert {(r.status, r.error) for r in results} == {(0, "ConnectionRefusedError")}
    assert 0.3 <= took < 1.0
    # a failed connect is retried 10 ms later: about 30 tries per client, not thousands
    assert 2 * 5 <= len(results) <= 2 * 32


def test_no_time_means_no_requests(loop_run: Callable) -> None:
    async def scenario() -> tuple[list[Result], CannedServer]:
        async with CannedServer() as server:
            results = await closed_loop("127.0.0.1", server.port, _requests(server.port, 1), 4, 0)
            await asyncio.sleep(0.05)
            return results, server

    results, server = loop_run(scenario())
    assert results == [] and server.connections == 0


def test_a_cancelled_run_closes_its_connections(loop_run: Callable) -> None:
    async def scenario() -> tuple[CannedServer, int, int]:
        async with CannedServer() as server:
            load = closed_loop("127.0.0.1", server.port, _requests(server.port, 2), 8, 30.0)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(load, 0.3)
            for _ in range(100):
                if server.open == 0:
                    break
                await asyncio.sleep(0.01)
            sent = len(server.requests)
            await asyncio.sleep(0.1)
            # counted here, while the loop runs (its end would close everything anyway)
            return server, server.open, len(server.requests) - sent

    server, still_open, sent_after = loop_run(scenario())
    assert server.connections == 8 and len(server.requests) > 8
    assert still_open == 0 and sent_after == 0


def test_no_requests_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="at least one request"):
        asyncio.run(closed_loop("127.0.0.1", 1, [], 2, 0.1))
