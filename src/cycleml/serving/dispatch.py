"""From an HTTP request to a finished batch row: body limits, deadlines, queueing,
cancellation on disconnect, and the mapping of every failure to an HTTP answer."""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive

from cycleml.errors import CycleMLError
from cycleml.serving.auth import ApiKeyAuth
from cycleml.serving.batcher import Cancelled, DeadlineExceeded, InferenceFailed, WorkItem
from cycleml.serving.body_guard import BodyBufferFull, BodyTimeout
from cycleml.serving.decode_limits import DecodeLimitExceeded
from cycleml.serving.experiments import ExperimentRouter
from cycleml.serving.metrics import ServingMetrics
from cycleml.serving.protocol import ProtocolError, json_dumps
from cycleml.serving.repository import ModelNotFound, ModelRepository, ModelUnavailable
from cycleml.serving.served_model import QueueFull, ServedModel
from cycleml.serving.settings import ServeSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

TIMEOUT_HEADER = "x-timeout-ms"


class BodyTooLarge(Exception):
    """The request body exceeds ``limits.max_body_bytes`` (HTTP 413)."""


class UnsupportedEncoding(Exception):
    """A ``Content-Encoding`` other than gzip or deflate (HTTP 415)."""


@dataclass
class ServerState:
    """Everything the request handlers share."""

    settings: ServeSettings
    metrics: ServingMetrics
    repository: ModelRepository
    decode_pool: ThreadPoolExecutor
    auth: ApiKeyAuth | None = None
    draining: bool = False
    # why no model could be loaded at start-up (the server then stops: on_no_model)
    load_failure: str | None = None
    on_no_model: Callable[[], None] | None = None
    # the A/B experiments that route requests by unit (None: not set up)
    experiments: ExperimentRouter | None = None
    # False until the configured experiments route (readiness waits for them)
    experiments_started: bool = True

    async def off_loop(self, work: Callable[..., T], *args: Any) -> T:
        """Run CPU work (JSON and image decoding) on the decode threads."""
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, work, *args)

    async def decode_by(self, deadline: float, work: Callable[..., T], *args: Any) -> T:
        """:meth:`off_loop` for work that is only worth starting before ``deadline``
        (``time.perf_counter()``): it may have waited behind other requests' decoding."""
        return await asyncio.get_running_loop().run_in_executor(
            self.decode_pool, _unless_late, deadline, work, args
        )


def _unless_late(deadline: float, work: Callable[..., T], args: tuple) -> T:
    if time.perf_counter() > deadline:
        raise DeadlineExceeded()
    return work(*args)


def state_of(request: Request) -> ServerState:
    return request.app.state.serving


async def read_body(request: Request, state: ServerState) -> bytes:
    """The whole body, decompressed if it came gzip/deflate encoded, refused when it is
    (or grows, or inflates) larger than ``limits.max_body_bytes``."""
    body = await receive_body(
        request.receive,
        state.settings.limits.max_body_bytes,
        request.headers.get("content-length"),
    )
    encoding = request.headers.get("content-encoding")
    return body if encoding is None else await decode_body(state, body, encoding)


async def decode_body(state: ServerState, body: bytes, encoding: str) -> bytes:
    """``body`` as sent with ``Content-Encoding: encoding`` (identity, gzip or deflate)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedEncoding(
            f"Content-Encoding '{encoding}' is not supported; use gzip, deflate or none"
        )
    return await state.off_loop(_inflate, body, encoding, state.settings.limits.max_body_bytes)


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as err:
        raise ProtocolError(f"request body is not valid {encoding} data: {err}") from None
    if len(data) > limit:
        raise BodyTooLarge(f"decompressed request body exceeds the limit of {limit} bytes")
    if not inflater.eof:
        raise ProtocolError(f"request body is truncated {encoding} data")
    return data


async def receive_body(receive: Receive, limit: int, declared: bytes | str | None) -> bytes:
    """The raw request body from the ASGI ``receive`` channel; ``BodyTooLarge`` when the
    declared Content-Length or the bytes that arrive exceed ``limit``."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        length = declared.decode("latin-1") if isinstance(declared, bytes) else declared
        raise BodyTooLarge(f"request body of {length} bytes exceeds the limit of {limit}")
    message = await receive()
    if message["type"] != "http.request":
        raise Cancelled()
    body = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
        return body
    chunks = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise Cancelled()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def timeout_s(request: Request, settings: ServeSettings, requested_us: float | None) -> float:
    """The request's time budget: the header, else the request parameter, else the
    default; never more than ``limits.max_timeout_ms``."""
    return request_timeout_s(settings, request.headers.get(TIMEOUT_HEADER), requested_us)


def request_timeout_s(
    settings: ServeSettings, header: str | None, requested_us: float | None
) -> float:
    """:func:`timeout_s` from the value of the X-Timeout-Ms header (None: not sent)."""
    limits = settings.limits
    if header is not None:
        try:
            millis = float(header)
        except ValueError:
            raise ProtocolError(f"header X-Timeout-Ms must be a number, got '{header}'") from None
        if not millis > 0:
            raise ProtocolError(f"header X-Timeout-Ms must be positive, got '{header}'")
    elif requested_us is not None:
        millis = requested_us / 1000.0
    else:
        millis = limits.default_timeout_ms
    return min(millis, limits.max_timeout_ms) / 1000.0


# A request that is answered within this long gains nothing from being cancelled, so
# only requests still queued after it get a task listening for their client to leave.
WATCH_DISCONNECT_AFTER_S = 0.05


async def infer_rows(
    receive: Receive,
    model: ServedModel,
    rows: np.ndarray,
    deadline: float,
    request_id: str | None = None,
) -> WorkItem:
    """Queue ``rows`` on ``model`` and wait for the batch that runs them.

    A request still queued at its deadline is withdrawn and answered 504; one whose
    client disconnects while it waits is withdrawn too. Once a batch holds it, it runs
    to the end. ``request_id`` names the prediction in the prediction log.
    """
    item = model.submit(rows, deadline, request_id)
    if deadline - item.enqueued_at <= WATCH_DISCONNECT_AFTER_S:
        # answered or expired before a watch would start: only the deadline matters
        item.guard = _Guard(receive, model, item)
        item.guard.expire_at(deadline)
    else:
        loop = item.loop
        watchlist = _watchlists.get(loop)
        if watchlist is None:
            watchlist = _watchlists[loop] = _Watchlist(loop)
        watchlist.add(item, receive, model)
    try:
        return await item.future
    finally:
        if item.guard is not None:
            item.guard.close()


class _Guard:
    """Withdraws a queued item at its deadline or when its client goes away."""

    def __init__(self, receive: Receive, model: ServedModel, item: WorkItem) -> None:
        self._receive, self._model, self._item = receive, model, item
        self._loop = item.loop  # the loop the request waits on
        self._timer: asyncio.TimerHandle | None = None
        self._watcher: asyncio.Task | None = None

    def expire_at(self, deadline: float) -> None:
        self._timer = self._loop.call_later(max(deadline - time.perf_counter(), 0.0), self._expire)

    def watch(self) -> None:
        self._watcher = self._loop.create_task(self._on_disconnect())
        self.expire_at(self._item.deadline)

    def _expire(self) -> None:
        self._withdraw(DeadlineExceeded())

    async def _on_disconnect(self) -> None:
        receive = self._receive
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._withdraw(Cancelled())
                return

    def _withdraw(self, error: Exception) -> None:
        if self._model.withdraw(self._item):
            self._item.error = error
            self._item.finished_at = time.perf_counter()
            if not self._item.future.done():
                self._item.future.set_result(self._item)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()


class _Watchlist:
    """The requests of one event loop that wait longer than ``WATCH_DISCONNECT_AFTER_S``
    get a guard (deadline timer, disconnect listener) when they reach that age. Requests
    arrive in order of age, so one timer for the oldest covers them all: most are
    answered before they reach it and cost no timer of their own, which matters at
    thousands of requests per second."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiting: deque[tuple[float, WorkItem, Receive, ServedModel]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, item: WorkItem, receive: Receive, model: ServedModel) -> None:
        self._waiting.append((item.enqueued_at + WATCH_DISCONNECT_AFTER_S, item, receive, model))
        if self._timer is None:
            self._timer = self._loop.call_later(WATCH_DISCONNECT_AFTER_S, self._check)

    def _check(self) -> None:
        self._timer = None
        waiting = self._waiting
        now = time.perf_counter()
        while waiting:
            due, item, receive, model = waiting[0]
            if item.future.done():
                waiting.popleft()
            elif due <= now:
                waiting.popleft()
                item.guard = _Guard(receive, model, item)
                item.guard.watch()
            else:
                self._timer = self._loop.call_later(due - now, self._check)
                return
        if _watchlists.get(self._loop) is self:
            del _watchlists[self._loop]  # nothing waits: a new request starts a new list


_watchlists: dict[asyncio.AbstractEventLoop, _Watchlist] = {}


def error_parts(err: Exception, settings: ServeSettings) -> tuple[int, str, dict[str, str]]:
    """The HTTP answer for a failure: ``(status, message, extra headers)``."""
    headers: dict[str, str] = {}
    if isinstance(err, ProtocolError | CycleMLError | ValueError):
        # bad input, an undecodable image or text, a model of the other kind
        status, message = 400, str(err)
    elif isinstance(err, ModelNotFound):
        status, message = 404, str(err)
    elif isinstance(err, BodyTooLarge | DecodeLimitExceeded):
        status, message = 413, str(err)
    elif isinstance(err, UnsupportedEncoding):
        status, message = 415, str(err)
    elif isinstance(err, BodyTimeout):
        # the rest of the body may still be on its way: the connection cannot be reused
        status, message = 408, str(err)
        headers["Connection"] = "close"
    elif isinstance(err, BodyBufferFull):
        status, message = 503, f"{err}; retry after {settings.limits.retry_after_s} s"
        headers["Retry-After"] = str(settings.limits.retry_after_s)
        headers["Connection"] = "close"
    elif isinstance(err, QueueFull):
        status = settings.limits.overload_status
        message = f"{err}; retry after {settings.limits.retry_after_s} s"
        headers["Retry-After"] = str(settings.limits.retry_after_s)
    elif isinstance(err, ModelUnavailable):
        status, message = 503, str(err)
        headers["Retry-After"] = str(settings.limits.retry_after_s)
    elif isinstance(err, DeadlineExceeded):
        status, message = 504, "request timed out in the queue before it could start"
    elif isinstance(err, Cancelled):
        status, message = 499, "client closed the request"
    elif isinstance(err, InferenceFailed):
        status, message = 500, f"inference failed: {err}"
    else:  # a bug, not a bad request: log it in full, tell the client only what kind
        log.error("internal error", exc_info=err)
        status, message = 500, f"internal server error ({type(err).__name__})"
    return status, message, headers


def error_response(err: Exception, settings: ServeSettings) -> tuple[int, Response]:
    """The HTTP answer for a failure, as ``(status, response)``."""
    status, message, headers = error_parts(err, settings)
    return status, json_response({"error": message}, status, headers)


def json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json_dumps(value), status_code=status, headers=headers, media_type="application/json"
    )


REJECTION_REASONS = {429: "queue_full", 503: "queue_full", 504: "deadline", 499: "cancelled"}


def account(
    state: ServerState, info: dict[str, Any], endpoint: str, status: int, started: float
) -> None:
    """Count one finished inference request in the metrics (by model, version, endpoint
    and status; latency and queue time of the successful ones; rejections by reason)."""
    version = info.get("version")
    state.metrics.request_done(
        info.get("model", ""),
        version or "",
        endpoint,
        status,
        time.perf_counter() - started,
        info.get("queue_ms"),
        REJECTION_REASONS.get(status) if version is not None else None,
    )


async def answered(
    state: ServerState,
    request: Request,
    endpoint: str,
    model_name: str,
    handle: Callable[[dict[str, Any]], Awaitable[Response]],
) -> Response:
    """Run one inference handler and account for it: status and latency metrics, the
    fields of the access log line, and the HTTP answer for any failure."""
    info: dict[str, Any] = request.scope.setdefault("cycleml", {})
    info["model"] = model_name
    started = time.perf_counter()
    try:
        response = await handle(info)
        status = response.status_code
    except Exception as err:
        status, message, headers = error_parts(err, state.settings)
        response = json_response({"error": message}, status, headers)
        info["error"] = message[:200]
    account(state, info, endpoint, status, started)
    return response


def record_item(info: dict[str, Any], item: WorkItem) -> None:
    """Copy a finished item's timings into the access log fields, or raise its error."""
    info["queue_ms"] = round(item.queue_s * 1000.0, 3)
    if item.error is not None:
        raise item.error
    info["inference_ms"] = round(item.inference_s * 1000.0, 3)
    info["batch_rows"] = item.batch_rows
