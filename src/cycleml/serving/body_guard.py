"""Bounds on reading request bodies: how long a body may take to arrive
(``limits.body_timeout_s``) and how many body bytes all connections together may hold
(``limits.max_buffered_bytes``).

Without them a client that declares a large body and sends it slowly, or many clients
at once, hold memory and connections for as long as they like; the per-request size
limit alone does not bound the sum. A request that declares its length reserves it in
:class:`BodyBudget` before a byte of its body is read (the request-context middleware
refuses it with 503 when it does not fit); a chunked body takes its bytes as they
arrive. Every request reads its body through :class:`GuardedReceive`.
"""

from __future__ import annotations

import asyncio
import time

from starlette.types import Message, Receive


class BodyTimeout(Exception):
    """The request body did not arrive within ``limits.body_timeout_s`` (HTTP 408)."""


class BodyBufferFull(Exception):
    """Taking this body would exceed ``limits.max_buffered_bytes`` across all
    connections (HTTP 503, retry later)."""


class BodyBudget:
    """The body bytes the connections of one server process may hold at once. Used on
    the event loop only, so it needs no lock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> bool:
        """Reserve ``size`` bytes; False (nothing reserved) when they do not fit."""
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def fits(self, size: int) -> bool:
        return self.held + size <= self.limit

    def give(self, size: int) -> None:
        self.held -= size

    def refusal(self, size: int) -> str:
        return (
            f"server busy: a request body of {size} bytes does not fit in the "
            f"{self.limit} bytes all connections may buffer (limits.max_buffered_bytes)"
        )


class GuardedReceive:
    """An ASGI ``receive`` whose body messages must arrive within the body deadline and
    fit in the budget. ``reserved`` bytes (a declared Content-Length) were taken from
    the budget by the caller before the body was read; bytes beyond them are taken as
    they arrive. Call :meth:`release` when the request is done: it gives back all."""

    __slots__ = ("_budget", "_deadline", "_receive", "_timeout_s", "done", "held", "received")

    def __init__(
        self, receive: Receive, budget: BodyBudget, timeout_s: float, reserved: int = 0
    ) -> None:
        self._receive = receive
        self._budget = budget
        self._timeout_s = timeout_s
        self._deadline = time.monotonic() + timeout_s
        self.held = reserved
        self.received = 0
        self.done = False

    async def __call__(self) -> Message:
        if self.done:  # the body is in: what follows is a disconnect, whenever it comes
            return await self._receive()
        remaining = self._deadline - time.monotonic()
        try:
            async with asyncio.timeout(max(remaining, 0.0)):
                message = await self._receive()
        except TimeoutError:
            raise BodyTimeout(
                f"request body not received within {self._timeout_s:g} s (limits.body_timeout_s)"
            ) from None
        if message["type"] != "http.request":
            self.done = True
            return message
        self.received += len(message.get("body", b""))
        beyond = self.received - self.held
        if beyond > 0:
            if not self._budget.take(beyond):
                raise BodyBufferFull(self._budget.refusal(self.received))
            self.held += beyond
        if not message.get("more_body", False):
            self.done = True
        return message

    def release(self) -> None:
        self._budget.give(self.held)
        self.held = 0
