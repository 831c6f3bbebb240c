"""The server's event loop: uvloop, accepting every waiting connection in one turn.

libuv, under uvloop, accepts one connection each time a listening socket polls
readable (since libuv 1.45; the rest wait for the next turn of the event loop). A turn
serves every connection whose data has arrived, so under load a turn is long: with
1,024 connections busy with inference on two cores the loop turned 10-40 times a
second, the kernel's accept queue held 150-800 connections, draining at that rate, and
a new connection's health check waited 10-20 s in the queue. A liveness probe would
kill a healthy server. asyncio's own loop accepts up to the backlog in one turn.

:class:`GreedyAcceptLoop` is uvloop's loop whose servers on a listening socket do the
same: each time the socket polls readable they accept every connection waiting (up to
the backlog) and hand each to the loop as an accepted socket, with uvloop's own
transports (``TCP_NODELAY`` on). Their protocols write through a
:class:`~cycleml.serving.coalescing.CoalescingTransport` (one send per response) unless
the loop comes from :func:`new_event_loop_sending_each_write`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

from cycleml.serving.coalescing import coalescing

try:
    import uvloop
except ImportError:  # uvloop is not built for Windows: asyncio's loop serves instead
    uvloop = None

log = logging.getLogger(__name__)

# after accept() fails for want of file descriptors or memory, how long to wait before
# trying again (a socket that stays readable would otherwise spin the loop)
ACCEPT_RETRY_S = 1.0
# the open-file limit the server asks for where the hard limit is unlimited
OPEN_FILES_WANTED = 65536

_BaseLoop: type[asyncio.AbstractEventLoop] = (
    uvloop.Loop if uvloop is not None else asyncio.SelectorEventLoop
)


class GreedyAcceptServer(asyncio.AbstractServer):
    """A server on one listening socket that accepts, each time the socket polls
    readable, every connection waiting (at most ``batch``)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        sock: socket.socket,
        batch: int,
        coalesce_writes: bool = True,
    ) -> None:
        self._loop = loop
        self._protocol_factory = (
            coalescing(protocol_factory, loop) if coalesce_writes else protocol_factory
        )
        self._sock: socket.socket | None = sock
        self._batch = max(1, batch)
        self._serving = False
        self._retry: asyncio.TimerHandle | None = None
        self._closed = loop.create_future()
        # accepted connections whose transport is still being set up
        self._connecting: set[asyncio.Task] = set()

    # -- accepting --------------------------------------------------------------------------
    def _listen(self) -> None:
        if self._sock is not None and not self._serving:
            self._serving = True
            self._loop.add_reader(self._sock, self._accept_waiting)

    def _accept_waiting(self) -> None:
        assert self._sock is not None
        for _ in range(self._batch):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # the queue is empty
            except ConnectionAbortedError:
                continue  # the client gave up while it waited in the queue
            except OSError as err:
                # out of file descriptors or memory: the connections wait in the queue
                log.error(
                    "cannot accept connections: %s; trying again in %g s", err, ACCEPT_RETRY_S
                )
                self._loop.remove_reader(self._sock)
                self._serving = False
                self._retry = self._loop.call_later(ACCEPT_RETRY_S, self._resume)
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._connect(conn))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)

    def _resume(self) -> None:
        self._retry = None
        self._listen()

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._protocol_factory, conn)
        except Exception as err:
            log.warning("could not set up an accepted connection: %s", err)
            conn.close()

    # -- asyncio.AbstractServer -------------------------------------------------------------
    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._sock is None else (self._sock,)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        self._listen()

    async def serve_forever(self) -> None:
        self._listen()
        try:
            await asyncio.shield(self._closed)
        except asyncio.CancelledError:
            self.close()
            raise

    def close(self) -> None:
        """Stop accepting and close the listening socket; connections being set up are
        dropped (the ones already served are the application's to finish)."""
        if self._sock is None:
            return
        if self._serving:
            self._loop.remove_reader(self._sock)
            self._serving = False
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        for task in self._connecting:
            task.cancel()
        self._sock.close()
        self._sock = None
        if not self._closed.done():
            self._closed.set_result(None)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)


class GreedyAcceptLoop(_BaseLoop):  # type: ignore[misc, valid-type]
    """uvloop's event loop whose servers on an open TCP socket (the way the server
    starts uvicorn) accept every waiting connection in one turn, and send the writes of
    one turn on a connection together (``coalesce_writes``). Other servers (a host and
    port, TLS, Unix sockets) are uvloop's own."""

    coalesce_writes = True

    async def create_server(  # type: ignore[override]
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        host: Any = None,
        port: Any = None,
        *,
        sock: socket.socket | None = None,
        backlog: int = 100,
        ssl: Any = None,
        start_serving: bool = True,
        **options: Any,
    ) -> asyncio.AbstractServer:
        if (
            sock is None
            or ssl is not None
            or options
            or sock.family not in (socket.AF_INET, socket.AF_INET6)
            or sock.type != socket.SOCK_STREAM
        ):
            return await super().create_server(
                protocol_factory,
                host,
                port,
                sock=sock,
                backlog=backlog,
                ssl=ssl,
                start_serving=start_serving,
                **options,
            )
        sock.setblocking(False)
        sock.listen(backlog)
        server = GreedyAcceptServer(
            self, protocol_factory, sock, batch=backlog, coalesce_writes=self.coalesce_writes
        )
        if start_serving:
            await server.start_serving()
        return server


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The event loop uvicorn runs the server on (``uvicorn.Config(loop=...)``)."""
    return GreedyAcceptLoop()


def new_event_loop_sending_each_write() -> asyncio.AbstractEventLoop:
    """The same loop with each write sent on its own (``coalesce_writes=false``)."""
    loop = GreedyAcceptLoop()
    loop.coalesce_writes = False
    return loop


def raise_open_file_limit() -> None:
    """Lift the process's soft limit on open files to its hard limit. Every connection
    holds a file descriptor, and the usual soft limit (1,024) would leave the
    connections beyond it waiting in the accept queue."""
    try:
        import resource
    except ImportError:  # Windows has no such limit
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as err:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, err)
            return
        log.info("open-file limit raised from %d to %d", soft, target)
