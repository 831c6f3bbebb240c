"""Per-request context as plain ASGI middleware: request id, API-key check, body size
check, and one structured access log line per request."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cycleml.serving.access_log import AccessLog
from cycleml.serving.auth import ApiKeyAuth
from cycleml.serving.body_guard import BodyBudget, GuardedReceive
from cycleml.serving.fast_path import InferenceFastPath
from cycleml.serving.protocol import json_dumps
from cycleml.serving.routes_v2 import send_answer
from cycleml.serving.settings import LimitSettings

REQUEST_ID_HEADER = b"x-request-id"

# request ids: random per process, then a counter (os.urandom per request costs a
# system call, which shows at thousands of requests per second)
_ID_PREFIX = uuid.uuid4().hex[:12]
_ID_COUNTER = itertools.count(1)


class RequestContextMiddleware:
    """Gives every HTTP request an id (the client's ``X-Request-Id`` or a new one), echoes
    it in the response, refuses requests without a valid API key (401) or with a declared
    body over the limit (413), refuses work beyond ``limits.max_inflight`` requests in
    the process at once (the overload status, with ``Retry-After``), and logs one JSON
    line when the response is sent.

    The in-flight bound matters when the HTTP front end, not a model, is the bottleneck:
    the model queues stay short, and without it requests would wait unbounded in the
    event loop instead of being refused at once.

    Inference requests (``fast_path``) are answered here directly; every other request
    goes on to ``app``. Every request reads its body through a :class:`GuardedReceive`:
    within ``limits.body_timeout_s`` and within the bytes ``budget`` leaves. The key and the declared size are checked on the headers,
    before any of the body is read. The ``Authorization`` header is never logged; a proxy's
    ``X-Forwarded-For`` is logged as ``forwarded_for`` next to the connection's address.
    """

    def __init__(
        self,
        app: ASGIApp,
        fast_path: InferenceFastPath | None,
        auth: ApiKeyAuth | None,
        limits: LimitSettings,
        access_log: AccessLog | None,
        on_busy: Callable[[], None],
        budget: BodyBudget,
    ) -> None:
        self.app = app
        self.budget = budget
        self.fast_path = fast_path
        self.auth = auth
        self.limits = limits
        self.access_log = access_log
        self.on_busy = on_busy
        self.inflight = 0
        # health, readiness and metrics must answer however busy the server is
        self.unlimited_paths = frozenset(("/v2/health/live", "/v2/health/ready", "/metrics"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = None
        authorization = None
        content_length = None
        forwarded_for = None
        for name, value in scope["headers"]:
            if name == REQUEST_ID_HEADER:
                request_id = value.decode("latin-1")[:128]
            elif name == b"authorization":
                authorization = value
            elif name == b"content-length":
                content_length = value
            elif name == b"x-forwarded-for":
                forwarded_for = value
        declared = int(content_length) if content_length and content_length.isdigit() else 0
        # a client's id is echoed in a response header: printable ASCII only
        if not request_id or not (request_id.isascii() and request_id.isprintable()):
            request_id = f"{_ID_PREFIX}-{next(_ID_COUNTER):x}"
        info: dict[str, Any] = {"request_id": request_id}
        scope["cycleml"] = info
        status_holder = [0]
        id_header = (REQUEST_ID_HEADER, request_id.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder[0] = message["status"]
                message["headers"] = [*message.get("headers", []), id_header]
            await send(message)

        path = scope["path"]
        if (
            self.auth is not None
            and path not in self.auth.public_paths
            and not (self.auth.allows(authorization))
        ):
            info["error"] = "missing or invalid API key"
            await _refuse(
                send_with_id,
                401,
                "missing or invalid API key: send 'Authorization: Bearer <key>'",
                # the body it may be sending is never read: the connection ends here
                [(b"www-authenticate", b"Bearer"), (b"connection", b"close")],
            )
        elif declared > self.limits.max_body_bytes:
            info["error"] = "body too large"
            await _refuse(
                send_with_id,
                413,
                f"request body of {declared} bytes "
                f"exceeds the limit of {self.limits.max_body_bytes}",
                [(b"connection", b"close")],
            )
        elif declared and not self.budget.fits(declared):
            info["error"] = "body buffer full"
            await _refuse(
                send_with_id,
                503,
                f"{self.budget.refusal(declared)}; retry after {self.limits.retry_after_s} s",
                [
                    (b"retry-after", str(self.limits.retry_after_s).encode()),
                    (b"connection", b"close"),
                ],
            )
        elif path in self.unlimited_paths:
            await self.app(scope, receive, send_with_id)
        elif self.inflight >= self.limits.max_inflight:
            info["error"] = "server busy"
            self.on_busy()
            await _refuse(
                send_with_id,
                self.limits.overload_status,
                f"server busy: {self.inflight} requests in flight; retry after "
                f"{self.limits.retry_after_s} s",
                [(b"retry-after", str(self.limits.retry_after_s).encode())],
            )
        else:
            self.inflight += 1
            # the declared length is reserved now (it fits: checked above, and nothing
            # ran in between); the body is read within its deadline
            self.budget.take(declared)
            receive = guarded = GuardedReceive(
                receive, self.budget, self.limits.body_timeout_s, declared
            )
            try:
                route = None if self.fast_path is None else self.fast_path.match(scope)
                if route is None:
                    await self.app(scope, receive, send_with_id)
                else:
                    status, headers, body = await self.fast_path.answer(scope, receive, route)
                    status_holder[0] = status
                    headers.append(id_header)
                    await send_answer(send, (status, headers, body))
            finally:
                self.inflight -= 1
                guarded.release()
        if self.access_log is not None:
            info["method"] = scope["method"]
            info["path"] = path
            info["status"] = status_holder[0]
            info["latency_ms"] = round((time.perf_counter() - started) * 1000.0, 3)
            client = scope.get("client")
            if client:
                info["client"] = f"{client[0]}:{client[1]}"
            if forwarded_for is not None:
                info["forwarded_for"] = forwarded_for.decode("latin-1")[:256]
            # a copy: the line is written later, on another thread
            self.access_log.add(dict(info))


async def _refuse(send: Send, status: int, message: str, headers: list) -> None:
    body = json_dumps({"error": message})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
