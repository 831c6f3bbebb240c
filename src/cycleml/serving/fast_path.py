"""A direct route for the inference endpoints.

The inference handlers take a plain Starlette request and return a response; they
need none of the framework's routing, dependency solving or exception middleware.
Measured on two cores, going through those layers cost as much CPU per request as the
handler itself, so ``POST /v2/models/{m}[/versions/{v}]/infer`` is matched here with
one regular expression and handed to the same handler the documented route uses,
whose answer it sends without building a response object.
Everything else continues into the application unchanged. The fast path wraps the
application from outside, so inference requests skip its middleware as well.
"""

from __future__ import annotations

import re

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from cycleml.serving.routes_v2 import infer_answer, send_answer

INFER_PATH = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")


class InferenceFastPath:
    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = INFER_PATH.match(scope["path"])
            if match is not None:
                answer = await infer_answer(
                    self.app.state.serving, scope, receive, match["model"], match["version"]
                )
                await send_answer(send, answer)
                return
        await self.app(scope, receive, send)
