"""The HTTP/1.1 connection protocol the server runs: uvicorn's httptools protocol with
each response leaving in one write.

uvicorn writes a response's status line and headers the moment the application sends
``http.response.start`` and the body with a second write. With ``TCP_NODELAY`` (set on
every connection) that is two system calls and two TCP segments per response, and a
client that wakes twice to read one answer. Here a connection's writes wait in a small
buffer until the response is complete, then leave together; anything else written
(``100 Continue``, a streamed body, an error answer before closing) leaves at the end
of the event loop's current turn at the latest, so nothing waits on a request that
never completes.

Inference requests also skip uvicorn's general request cycle: a ``POST`` that the
application says it answers directly (``ServingApp.answers_directly``: the inference
routes, a valid key when keys are required, a declared body within the size limit and
the body budget) is read whole, handed to the application with a plain ``receive`` and
``send``, and answered in one write. Its body must arrive within the application's
``body_timeout_s`` (else 408 and the connection closes), and a ``Connection: close``
from the client or in the answer closes the connection once the answer is written.
Anything unusual (``Expect: 100-continue``, a chunked or oversized body, an upgrade,
HTTP/1.0, an escaped path, a request pipelined behind another) takes uvicorn's own path. On two
cores the event loop's CPU per request decides how much is left for the model, and
every microsecond it spends costs the runtime about two: the runtime's threads split
each operator evenly, so when the event loop preempts one, the other waits.
"""

from __future__ import annotations

import asyncio
import http
import importlib
import inspect
import logging
from typing import Any

import httptools

from cycleml.serving.protocol import json_dumps

log = logging.getLogger(__name__)

# What the protocol below takes from uvicorn's private httptools protocol, written for
# uvicorn 0.54 (pyproject.toml pins that range). ``missing_uvicorn_internals`` checks it
# at start-up, so that a uvicorn that changed them is served by its own protocol instead.
UVICORN_MODULE = "uvicorn.protocols.http.httptools_impl"
# methods the protocol overrides or calls, with their parameters
UVICORN_METHODS = {
    "__init__": ("self", "config", "server_state", "app_state", "_loop"),
    "connection_made": ("self", "transport"),
    "connection_lost": ("self", "exc"),
    "data_received": ("self", "data"),
    "on_message_begin": ("self",),
    "on_headers_complete": ("self",),
    "on_body": ("self", "body"),
    "on_message_complete": ("self",),
    "on_response_complete": ("self",),
    "shutdown": ("self",),
}
# attributes of a new connection's protocol the protocol reads or replaces
UVICORN_ATTRIBUTES = (
    "app",
    "cycle",
    "expect_100_continue",
    "headers",
    "loop",
    "parser",
    "root_path",
    "scope",
    "server_state",
    "tasks",
    "transport",
)
# what uvicorn's connection code does with a request cycle: _DirectCycle stands in for it
UVICORN_CYCLE_ATTRIBUTES = ("disconnected", "keep_alive", "message_event", "response_complete")

try:
    HttpToolsProtocol = importlib.import_module(UVICORN_MODULE).HttpToolsProtocol
except (ImportError, AttributeError):  # missing_uvicorn_internals reports it
    HttpToolsProtocol = asyncio.Protocol


def missing_uvicorn_internals() -> list[str]:
    """The uvicorn internals the protocol relies on that the installed uvicorn lacks or
    has changed (names, parameters); empty when it has them all."""
    try:
        module = importlib.import_module(UVICORN_MODULE)
        base = module.HttpToolsProtocol
        cycle = module.RequestResponseCycle
    except (ImportError, AttributeError) as err:
        return [f"{UVICORN_MODULE}: {err}"]
    missing = []
    for name, wanted in UVICORN_METHODS.items():
        method = getattr(base, name, None)
        try:
            found = tuple(inspect.signature(method).parameters) if method else None
        except (TypeError, ValueError):
            found = None
        if found != wanted:
            missing.append(f"HttpToolsProtocol.{name}({', '.join(wanted)})")
    try:
        import uvicorn
        from uvicorn.server import ServerState

        async def no_app(scope: Any, receive: Any, send: Any) -> None:
            return None

        loop = asyncio.new_event_loop()
        try:
            config = uvicorn.Config(no_app, log_config=None)
            connection = base(config=config, server_state=ServerState(), app_state={}, _loop=loop)
        finally:
            loop.close()
    except Exception as err:
        return [*missing, f"HttpToolsProtocol(config, server_state, app_state, _loop): {err}"]
    missing += [f"HttpToolsProtocol.{a}" for a in UVICORN_ATTRIBUTES if not hasattr(connection, a)]
    if not hasattr(connection.server_state, "default_headers"):
        missing.append("ServerState.default_headers")
    assigned = set(cycle.__init__.__code__.co_names)
    missing += [f"RequestResponseCycle.{a}" for a in UVICORN_CYCLE_ATTRIBUTES if a not in assigned]
    return missing


def connection_protocol(choice: str) -> type[asyncio.Protocol] | str:
    """The connection protocol uvicorn is to run (its ``http`` option) for the
    ``http_protocol`` setting: this module's protocol for ``cycleml``, unless the
    installed uvicorn lacks what it relies on (then uvicorn's own, with a warning), and
    uvicorn's httptools protocol for ``uvicorn``."""
    if choice == "uvicorn":
        return "httptools"
    missing = missing_uvicorn_internals()
    if missing:
        import uvicorn

        log.warning(
            "uvicorn %s lacks or has changed what cycleml's HTTP protocol relies on (%s); "
            "serving with uvicorn's own httptools protocol, as http_protocol=uvicorn does",
            uvicorn.__version__,
            "; ".join(missing),
        )
        return "httptools"
    return CoalescingHttpToolsProtocol


class CoalescingTransport:
    """A transport whose writes within one turn of the event loop leave in one call."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._flush_handle: asyncio.Handle | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        self._pending.append(bytes(data) if not isinstance(data, bytes) else data)
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._flush_handle = None
        self.flush()

    def flush(self) -> None:
        """Hand what waits to the socket now."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        if self._transport.is_closing():
            return  # the peer is gone: what it would have read has nowhere to go
        self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def write_now(self, data: bytes) -> None:
        """Write ``data`` (after anything still waiting) at once, in one call."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._pending:
            data = b"".join((*self._pending, data))
            self._pending = []
        self._transport.write(data)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(p) for p in self._pending)

    def __getattr__(self, name: str) -> Any:
        # everything else (is_closing, get_extra_info, pause_reading, ...) is the socket's
        return getattr(self._transport, name)


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")


_STATUS_LINES = {status: _status_line(status) for status in range(100, 600)}


def json_error(message: str) -> bytes:
    return json_dumps({"error": message})


class _DirectCycle:
    """Stands in for uvicorn's request cycle while the protocol answers a request itself.
    uvicorn's connection code reads and sets these attributes: ``response_complete``
    (pipelining), ``keep_alive`` (a graceful shutdown clears it), ``disconnected`` and
    ``message_event`` (the connection was lost)."""

    __slots__ = (
        "body",
        "disconnected",
        "keep_alive",
        "message_event",
        "reserved",
        "response_complete",
        "timer",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, reserved: int, keep_alive: bool) -> None:
        self.body: list[bytes] | None = []
        self.disconnected = False
        self.keep_alive = keep_alive
        self.response_complete = False
        self.message_event = _Disconnection(loop)
        # body bytes reserved in the application's budget, until given back
        self.reserved = reserved
        # the body deadline, armed when a body does not arrive in one read
        self.timer: asyncio.TimerHandle | None = None


class _Disconnection:
    """What ``message_event.set()`` means for a direct request: the client went away."""

    __slots__ = ("_loop", "_waiter", "is_set")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiter: asyncio.Future | None = None
        self.is_set = False

    def set(self) -> None:
        self.is_set = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self) -> None:
        if self.is_set:
            return
        if self._waiter is None:
            self._waiter = self._loop.create_future()
        await self._waiter


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol writing each complete response in one call, and
    answering the application's direct requests without uvicorn's request cycle."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # only the server's own application (uvicorn may wrap an app, e.g. to log
        # messages at trace level; then every request takes the general path)
        self._answers_directly = getattr(self.app, "answers_directly", None)
        self._body_done = getattr(self.app, "body_done", None)
        self._body_timeout_s = getattr(self.app, "body_timeout_s", None)
        # a request has begun to arrive and its headers are not complete yet
        self._arriving = False
        # the server is shutting down: the request still to come is the last
        self._last_request = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]

    def on_response_complete(self) -> None:
        self.transport.flush()  # type: ignore[attr-defined]
        super().on_response_complete()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        cycle = self.cycle
        if type(cycle) is _DirectCycle and cycle.body is not None and cycle.timer is None:
            # a direct body that did not arrive whole in one read: it gets a deadline
            cycle.timer = self.loop.call_later(
                self._body_timeout_s,  # type: ignore[arg-type]
                self._body_timed_out,
                cycle,
            )

    def on_message_begin(self) -> None:
        self._arriving = True
        super().on_message_begin()

    def shutdown(self) -> None:
        """At a graceful shutdown, an idle connection closes at once, but one whose next
        request has begun to arrive is not idle: that request is read, answered with
        ``Connection: close``, and only then is the connection closed (uvicorn would
        close it under the client, which then sees its request reset)."""
        cycle = self.cycle
        if self._arriving and (cycle is None or cycle.response_complete):
            self._last_request = True
            return
        super().shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        if type(cycle) is _DirectCycle and cycle.body is not None:
            self._give_back(cycle)  # the body never came whole; no answer will follow
        super().connection_lost(exc)

    # -- the direct path ---------------------------------------------------------------------
    def on_headers_complete(self) -> None:
        self._arriving = False
        if self._answers_directly is not None and self._take_directly():
            if self._last_request:
                self.cycle.keep_alive = False
            return
        super().on_headers_complete()
        if self._last_request and self.cycle is not None:
            self.cycle.keep_alive = False

    def _take_directly(self) -> bool:
        parser = self.parser
        if (
            parser.get_method() != b"POST"
            or parser.get_http_version() != "1.1"
            or self.expect_100_continue
            or parser.should_upgrade()
            or self.root_path
            or (self.cycle is not None and not self.cycle.response_complete)
        ):
            return False
        declared = authorization = None
        keep_alive = True
        for name, value in self.headers:
            if name == b"content-length":
                declared = value
            elif name == b"authorization":
                authorization = value
            elif name == b"connection":
                keep_alive = b"close" not in value.lower()
            elif name == b"transfer-encoding":
                return False
        if declared is None or not declared.isdigit():
            return False
        url = httptools.parse_url(self.url)
        raw_path = url.path
        if b"%" in raw_path:
            return False
        path = raw_path.decode("ascii")
        length = int(declared)
        if not self._answers_directly(path, length, authorization):  # type: ignore[misc]
            return False
        scope = self.scope
        scope["method"] = "POST"
        scope["path"] = path
        scope["raw_path"] = raw_path
        scope["query_string"] = url.query or b""
        scope["cycleml.direct"] = True  # type: ignore[typeddict-unknown-key]
        self.cycle = _DirectCycle(self.loop, length, keep_alive)  # type: ignore[assignment]
        return True

    def _give_back(self, cycle: _DirectCycle) -> None:
        """The request's body bytes leave the budget (once) and its deadline is off."""
        if cycle.timer is not None:
            cycle.timer.cancel()
            cycle.timer = None
        if cycle.reserved:
            self._body_done(cycle.reserved)  # type: ignore[misc]
            cycle.reserved = 0

    def _body_timed_out(self, cycle: _DirectCycle) -> None:
        cycle.timer = None
        if cycle.body is None or cycle is not self.cycle:
            return
        cycle.body = None
        cycle.response_complete = True
        self._give_back(cycle)
        log.warning(
            "%s: request body not received within %s s; closing the connection",
            self.client,
            self._body_timeout_s,
        )
        error = json_error(
            f"request body not received within {self._body_timeout_s:g} s (limits.body_timeout_s)"
        )
        self.transport.write(
            _STATUS_LINES[408] + b"content-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(error), error)
        )
        self.transport.close()

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if type(cycle) is _DirectCycle:
            if cycle.body is not None:
                cycle.body.append(body)
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        cycle = self.cycle
        if type(cycle) is _DirectCycle:
            if cycle.body is not None and not cycle.response_complete:
                body = b"".join(cycle.body)
                cycle.body = None
                if cycle.timer is not None:
                    cycle.timer.cancel()
                    cycle.timer = None
                task = self.loop.create_task(self._answer(cycle, self.scope, body))
                task.add_done_callback(self.tasks.discard)
                self.tasks.add(task)
            return
        super().on_message_complete()

    async def _answer(self, cycle: _DirectCycle, scope: Any, body: bytes) -> None:
        """Run the application on one whole request; its answer leaves in one write."""
        transport: CoalescingTransport = self.transport  # type: ignore[assignment]
        request: dict[str, Any] | None = {"type": "http.request", "body": body, "more_body": False}
        head: list[bytes] | None = None
        remaining = 0

        async def receive() -> dict[str, Any]:
            nonlocal request
            if request is not None:
                message, request = request, None
                return message
            await cycle.message_event.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal head, remaining
            if cycle.disconnected:
                return
            if head is None:
                if message["type"] != "http.response.start":
                    raise RuntimeError(f"expected http.response.start, got {message['type']}")
                status = message["status"]
                head = [_STATUS_LINES.get(status) or _status_line(status)]
                remaining = -1
                stated = False  # the answer says what becomes of the connection
                for name, value in (*self.server_state.default_headers, *message["headers"]):
                    if name == b"content-length":
                        remaining = int(value)
                    elif name == b"connection":
                        stated = True
                        if b"close" in value.lower():
                            cycle.keep_alive = False
                    head.append(b"%s: %s\r\n" % (name, value))
                if remaining < 0:
                    raise RuntimeError("a direct answer needs a Content-Length header")
                if not cycle.keep_alive and not stated:  # the client asked, or the server stops
                    head.append(b"connection: close\r\n")
                head.append(b"\r\n")
                return
            if message["type"] != "http.response.body" or cycle.response_complete:
                raise RuntimeError(f"unexpected {message['type']} after the response")
            chunk = message.get("body", b"")
            remaining -= len(chunk)
            if remaining < 0:
                raise RuntimeError("response body longer than its Content-Length")
            if head:
                transport.write_now(b"".join((*head, chunk)))
                head.clear()
            elif chunk:
                transport.write_now(chunk)
            if not message.get("more_body", False):
                if remaining:
                    raise RuntimeError("response body shorter than its Content-Length")
                cycle.response_complete = True

        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            self._give_back(cycle)
            transport.close()
            cycle.response_complete = True
            raise
        except Exception as exc:
            self._give_back(cycle)
            log.error("exception in the application", exc_info=exc)
            if head is None and not cycle.disconnected:
                error = b"Internal Server Error"
                transport.write(
                    _STATUS_LINES[500] + b"content-type: text/plain; charset=utf-8\r\n"
                    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(error), error)
                )
            transport.close()
            cycle.response_complete = True
            return
        self._give_back(cycle)
        if not cycle.response_complete:
            if not cycle.disconnected:
                log.error("the application returned without completing its response")
            transport.close()
            cycle.response_complete = True
            return
        if not cycle.keep_alive:
            transport.close()
        self.on_response_complete()
