"""A direct route for the inference endpoints.

The inference handlers take a plain Starlette request and return a response; they
need none of the framework's routing, dependency solving or exception middleware.
Measured on two cores, going through those layers cost as much CPU per request as the
handler itself, so ``POST /v2/models/{m}[/versions/{v}]/infer`` is matched here with
one regular expression and handed to the same handler the documented route uses.
Everything else continues into the application unchanged. The fast path wraps the
application from outside, so inference requests skip its middleware as well.
"""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from cycleml.serving.routes_v2 import infer_response

INFER_PATH = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")


class InferenceFastPath:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = INFER_PATH.match(scope["path"])
            if match is not None:
                scope["app"] = self.app  # where the handlers find the server state
                request = Request(scope, receive)
                response = await infer_response(request, match["model"], match["version"])
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
