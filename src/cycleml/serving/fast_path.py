"""A direct route for the inference endpoints.

The inference handler takes the ASGI scope and returns ``(status, headers, body)``; it
needs none of the framework's routing, dependency solving, exception middleware or
response objects. Measured on two cores, going through those layers cost as much CPU
per request as the handler itself, so ``POST /v2/models/{m}[/versions/{v}]/infer`` is
matched here with one regular expression and handed to the same handler the documented
route uses. The request-context middleware asks :meth:`InferenceFastPath.match` first
and sends the answer itself; everything else continues into the application.
"""

from __future__ import annotations

import re

from starlette.types import Receive, Scope

from cycleml.serving.dispatch import ServerState
from cycleml.serving.routes_v2 import Answer, infer_answer

INFER_PATH = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")


class InferenceFastPath:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    def match(self, scope: Scope) -> re.Match | None:
        """The model and version of an inference request; None for any other request."""
        if scope["method"] != "POST":
            return None
        return INFER_PATH.match(scope["path"])

    async def answer(self, scope: Scope, receive: Receive, route: re.Match) -> Answer:
        return await infer_answer(self.state, scope, receive, route["model"], route["version"])
