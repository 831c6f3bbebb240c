"""A small HTTP/1.1 load generator for measuring a server: closed-loop (fixed number of
clients, each sending its next request when the previous one is answered) and
open-loop (Poisson arrivals at a fixed rate, latency measured from the *intended*
send time, so a slow server cannot hide its queueing by slowing the client down).

It speaks just enough HTTP over an asyncio protocol (keep-alive, Content-Length bodies)
to cost the machine far less per request than a general client library, which
matters when client and server share the same cores.
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


@dataclass(frozen=True)
class Result:
    intended: float  # when the request was meant to be sent (perf_counter)
    sent: float
    done: float
    status: int  # 0: no HTTP answer (connection error or client timeout)
    retry_after: bool = False
    error: str | None = None

    @property
    def latency_s(self) -> float:
        return self.done - self.intended


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run a load coroutine on uvloop where it is installed (a cheaper client leaves more
    of a shared machine to the server under test), else on asyncio's own loop.

    The cyclic garbage collector is off while it runs: a full collection pauses the
    client for tens of milliseconds, which would count against the server.
    """
    try:
        import uvloop
    except ImportError:
        uvloop = None
    gc.collect()
    gc.disable()
    try:
        return asyncio.run(main) if uvloop is None else uvloop.run(main)
    finally:
        gc.enable()


def build_request(
    host: str,
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> bytes:
    """The bytes of one HTTP/1.1 request, built once and sent many times."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _ResponseReader(asyncio.Protocol):
    """Collects one HTTP/1.1 response at a time from a keep-alive connection.

    A protocol rather than stream reader and writer: each request then costs the client
    one write and one callback per read, which leaves more of a shared machine to the
    server under test.
    """

    def __init__(self) -> None:
        self.transport: Any = None  # the loop's TCP transport (uvloop's is not asyncio's class)
        self._buffer = bytearray()
        self._waiter: asyncio.Future | None = None
        self._head: tuple[int, dict[bytes, bytes]] | None = None
        self._need = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def expect(self, waiter: asyncio.Future) -> None:
        self._waiter = waiter
        self._process()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._process()

    def _process(self) -> None:
        if self._waiter is None:
            return
        if self._head is None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > 65536:
                    self._fail(ValueError("response head over 64 KiB"))
                return
            lines = bytes(self._buffer[:end]).split(b"\r\n")
            del self._buffer[: end + 4]
            try:
                status = int(lines[0].split(b" ", 2)[1])
            except (IndexError, ValueError):
                self._fail(ValueError(f"bad status line {lines[0]!r}"))
                return
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            self._head = (status, headers)
            self._need = int(headers.get(b"content-length", b"0"))
        if len(self._buffer) < self._need:
            return
        body = bytes(self._buffer[: self._need])
        del self._buffer[: self._need]
        status, headers = self._head
        self._head = None
        waiter, self._waiter = self._waiter, None
        if not waiter.done():
            waiter.set_result((status, headers, body))

    def _fail(self, error: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail(exc or asyncio.IncompleteReadError(bytes(self._buffer), None))


class Connection:
    """One keep-alive connection; ``exchange`` sends a request and reads the answer."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: _ResponseReader | None = None

    async def exchange(
        self, request: bytes, timeout_s: float | None = None
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        """Send ``request`` and wait for its response; ``asyncio.TimeoutError`` after
        ``timeout_s`` (the connection is closed then, as its answer would come late)."""
        loop = asyncio.get_running_loop()
        if self._reader is None or self._reader.transport is None:
            _, self._reader = await loop.create_connection(_ResponseReader, self.host, self.port)
        reader = self._reader
        assert reader.transport is not None
        waiter = loop.create_future()
        reader.expect(waiter)
        reader.transport.write(request)
        timer = None
        if timeout_s is not None:
            timer = loop.call_later(
                timeout_s,
                lambda: waiter.done() or waiter.set_exception(asyncio.TimeoutError()),
            )
        try:
            status, headers, body = await waiter
        except BaseException:
            self.close()
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()
        return status, headers, body

    def close(self) -> None:
        if self._reader is not None and self._reader.transport is not None:
            self._reader.transport.close()
        self._reader = None


async def _one(connection: Connection, request: bytes, intended: float, timeout_s: float) -> Result:
    sent = time.perf_counter()
    try:
        status, headers, _ = await connection.exchange(request, timeout_s)
    except (
        OSError,
        asyncio.IncompleteReadError,
        asyncio.LimitOverrunError,
        asyncio.TimeoutError,
        ValueError,
    ) as err:
        connection.close()
        return Result(intended, sent, time.perf_counter(), 0, error=type(err).__name__)
    return Result(
        intended, sent, time.perf_counter(), status, retry_after=b"retry-after" in headers
    )


async def closed_loop(
    host: str,
    port: int,
    requests: list[bytes],
    concurrency: int,
    duration_s: float,
    timeout_s: float = 30.0,
    max_requests: int = 1_000_000,
) -> list[Result]:
    """``concurrency`` clients, each on its own connection, for ``duration_s``."""
    results: list[Result] = []
    stop_at = time.perf_counter() + duration_s

    async def client(index: int) -> None:
        connection = Connection(host, port)
        sent = 0
        try:
            while time.perf_counter() < stop_at and len(results) < max_requests:
                request = requests[(index + sent * concurrency) % len(requests)]
                results.append(await _one(connection, request, time.perf_counter(), timeout_s))
                sent += 1
        finally:
            connection.close()

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return results


async def open_loop(
    host: str,
    port: int,
    requests: list[bytes],
    rate_per_s: float,
    duration_s: float,
    seed: int = 0,
    timeout_s: float = 30.0,
    max_connections: int = 512,
) -> list[Result]:
    """Poisson arrivals at ``rate_per_s`` for ``duration_s``; each request goes out on an
    idle connection (a new one while fewer than ``max_connections`` exist, else it waits
    for one, and that wait counts in its latency)."""
    rng = random.Random(seed)
    idle: list[Connection] = []
    available = asyncio.Semaphore(max_connections)
    tasks: list[asyncio.Task] = []

    async def one(intended: float, request: bytes) -> Result:
        async with available:
            connection = idle.pop() if idle else Connection(host, port)
            result = await _one(connection, request, intended, timeout_s)
            idle.append(connection)
            return result

    start = time.perf_counter()
    at = start
    index = 0
    while True:
        at += rng.expovariate(rate_per_s)
        if at - start >= duration_s:
            break
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(at, requests[index % len(requests)])))
        index += 1
    results = list(await asyncio.gather(*tasks))
    for connection in idle:
        connection.close()
    return results


def summarize(results: list[Result]) -> dict[str, float]:
    """Throughput, latency percentiles (ms) and failures of a run."""
    if not results:
        return {"requests": 0, "rps": 0.0, "p50_ms": 0.0, "p99_ms": 0.0, "errors": 0}
    first = min(r.intended for r in results)
    last = max(r.done for r in results)
    ok = [r.latency_s for r in results if r.status == 200]
    latencies = np.asarray(ok if ok else [r.latency_s for r in results]) * 1000.0
    statuses = Counter(r.status for r in results)
    return {
        "requests": len(results),
        "rps": statuses[200] / max(last - first, 1e-9),
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "ok": statuses[200],
        "rejected": sum(n for s, n in statuses.items() if s in (429, 503)),
        "errors": sum(n for s, n in statuses.items() if s not in (200, 429, 503)),
    }
