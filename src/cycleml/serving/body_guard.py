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
    they arrive. Call :meth:`release` when the request is done: it gives back all.

    The deadline costs no timer of its own: the requests of one event loop are watched
    together by a :class:`_BodyDeadlines` (an ``asyncio.timeout`` per request took about
    four times the event-loop time of this read, and nearly every body is complete
    before the application asks for it)."""

    __slots__ = (
        "_budget",
        "_deadlines",
        "_receive",
        "_task",
        "_timeout_s",
        "deadline",
        "done",
        "held",
        "received",
        "timed_out",
        "waiting",
    )

    def __init__(
        self, receive: Receive, budget: BodyBudget, timeout_s: float, reserved: int = 0
    ) -> None:
        self._receive = receive
        self._budget = budget
        self._timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.held = reserved
        self.received = 0
        self.done = False
        self.waiting = False  # awaiting a body message now
        self.timed_out = False  # the deadline passed while it waited
        self._task: asyncio.Task | None = None
        self._deadlines: _BodyDeadlines | None = None  # the watch that holds it

    def _timeout(self) -> BodyTimeout:
        return BodyTimeout(
            f"request body not received within {self._timeout_s:g} s (limits.body_timeout_s)"
        )

    async def __call__(self) -> Message:
        if self.done:  # the body is in: what follows is a disconnect, whenever it comes
            return await self._receive()
        if self._task is None:
            self._task = asyncio.current_task()
            self._deadlines = _watch(self)
        if time.monotonic() >= self.deadline:
            raise self._timeout()
        self.waiting = True
        try:
            message = await self._receive()
        except asyncio.CancelledError:
            if self.timed_out and self._task is not None:
                self._task.uncancel()
                raise self._timeout() from None
            raise
        finally:
            self.waiting = False
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
        self.done = True
        if self._deadlines is not None:
            # out of the watch at once: it would otherwise keep the request's task and
            # connection objects alive until its next sweep
            self._deadlines.forget(self)
            self._deadlines = None

    def expire(self) -> None:
        """The deadline has passed: a receive waiting now ends with :class:`BodyTimeout`
        (a later one checks the deadline itself)."""
        if self.waiting and self._task is not None and not self.timed_out:
            self.timed_out = True
            self._task.cancel()


# how often, at most, the watch of an event loop's bodies forgets the finished ones
SWEEP_S = 1.0


class _BodyDeadlines:
    """The bodies being read on one event loop, checked by one timer: at the earliest
    deadline of those still arriving, and at least every ``SWEEP_S`` while any are
    watched (to forget those that finished without being released)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._watched: set[GuardedReceive] = set()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, guarded: GuardedReceive) -> None:
        self._watched.add(guarded)
        if self._timer is None:
            self._arm(guarded.deadline)

    def forget(self, guarded: GuardedReceive) -> None:
        self._watched.discard(guarded)

    def _arm(self, deadline: float) -> None:
        now = time.monotonic()
        delay = min(max(deadline - now, 0.0), SWEEP_S)
        self._timer = self._loop.call_later(delay, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        now = time.monotonic()
        arriving = set()
        for guarded in self._watched:
            if guarded.done:
                continue
            if guarded.deadline <= now:
                # a receive waiting now ends; a later one checks the deadline itself
                guarded.expire()
            else:
                arriving.add(guarded)
        self._watched = arriving
        if arriving:
            self._arm(min(g.deadline for g in arriving))
        elif _deadlines.get(self._loop) is self:
            del _deadlines[self._loop]  # nothing arrives: a new body starts a new watch


_deadlines: dict[asyncio.AbstractEventLoop, _BodyDeadlines] = {}


def _watch(guarded: GuardedReceive) -> _BodyDeadlines:
    loop = asyncio.get_running_loop()
    deadlines = _deadlines.get(loop)
    if deadlines is None:
        deadlines = _deadlines[loop] = _BodyDeadlines(loop)
    deadlines.add(guarded)
    return deadlines
