"""Admin routes of the A/B experiments: list, start or update, ramp, stop.

``GET /v1/experiments`` lists them; ``PUT /v1/experiments/{name}`` starts or updates
one from a JSON spec, running (an arm's version that is not served yet is loaded first;
a spec with ``"status": "stopped"`` is refused: stopping is the stop route's);
``POST /v1/experiments/{name}/ramp`` takes ``{"weights": {arm: number}, "note": "..."}``
and ``POST /v1/experiments/{name}/stop`` takes an optional ``{"note": "..."}``. Each
change is written to the experiments' store (and its change history) and routes at
once in this process; other server processes pick it up when they next poll the
store. With ``auth.enabled`` they need an API key like every other non-public route.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from cycleml.db import safe_url
from cycleml.errors import CycleMLError
from cycleml.experiments.store import ExperimentError
from cycleml.serving.dispatch import error_response, json_response, read_body, state_of
from cycleml.serving.protocol import ProtocolError, json_loads

log = logging.getLogger(__name__)

router = APIRouter(tags=["experiments"])

# control characters other than tab and line breaks (PostgreSQL refuses NUL in text)
_NOTE_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


async def _json(request: Request, required: bool) -> Any:
    body = await read_body(request, state_of(request))
    if not body.strip():
        if required:
            raise ProtocolError("send a JSON body")
        return {}
    try:
        return json_loads(body)
    except ValueError:
        raise ProtocolError("request body is not valid JSON") from None


async def _run(request: Request, work: Callable[..., Any], *args: Any) -> Response:
    """Run blocking store work off the event loop; errors as 4xx/5xx answers."""
    state = state_of(request)
    router_ = state.experiments
    try:
        assert router_ is not None
        result = await asyncio.to_thread(work, router_, *args)
    except ExperimentError as err:
        status = 404 if str(err).startswith("no experiment named") else 400
        return json_response({"error": str(err)}, status)
    except (CycleMLError, ProtocolError, ValueError) as err:
        message = str(err)
        if "need a database" in message:  # how the server runs, not bad input
            return json_response({"error": message}, 409)
        if "cannot connect" in message or "cannot create the tables" in message:
            return json_response(
                {"error": message}, 503, {"Retry-After": str(state.settings.limits.retry_after_s)}
            )
        return json_response({"error": message}, 400)
    except Exception as err:
        where = safe_url(router_.db_url) if router_ and router_.db_url else "?"
        log.warning("experiments: the store at %s failed: %s", where, err)
        return json_response(
            {"error": f"the experiments' database ({where}) failed: {type(err).__name__}"},
            503,
            {"Retry-After": str(state.settings.limits.retry_after_s)},
        )
    return json_response(result)


@router.get("/v1/experiments", summary="The experiments, their weights and status")
async def list_experiments(request: Request) -> Response:
    return await _run(request, lambda r: {"experiments": r.listing()})


@router.put("/v1/experiments/{name}", summary="Start or update an experiment")
async def put_experiment(request: Request, name: str) -> Response:
    try:
        spec = await _json(request, required=True)
    except Exception as err:
        return error_response(err, state_of(request).settings)[1]
    return await _run(request, lambda r: r.put(name, spec).to_dict())


@router.post("/v1/experiments/{name}/ramp", summary="Change an experiment's weights live")
async def ramp_experiment(request: Request, name: str) -> Response:
    try:
        body = await _json(request, required=True)
        if not isinstance(body, dict) or "weights" not in body:
            raise ProtocolError('send {"weights": {arm: number, ...}, "note": "..."}')
        note = _note(body, {"weights", "note"})
    except Exception as err:
        return error_response(err, state_of(request).settings)[1]
    return await _run(request, lambda r: r.ramp(name, body["weights"], note).to_dict())


@router.post("/v1/experiments/{name}/stop", summary="Stop an experiment")
async def stop_experiment(request: Request, name: str) -> Response:
    try:
        body = await _json(request, required=False)
        note = _note(body, {"note"})
    except Exception as err:
        return error_response(err, state_of(request).settings)[1]
    return await _run(request, lambda r: r.stop(name, note).to_dict())


def _note(body: Any, allowed: set[str]) -> str:
    """The note of a ramp or stop body; a key it does not know (a misspelled ``note``)
    is refused rather than dropped."""
    if not isinstance(body, dict):
        raise ProtocolError("the body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ProtocolError(f"unknown keys {unknown} in the body; allowed: {sorted(allowed)}")
    note = body.get("note", "")
    if not isinstance(note, str) or len(note) > 1000:
        raise ProtocolError("note must be text of at most 1000 characters")
    control = _NOTE_CONTROL.search(note)
    if control:
        raise ProtocolError(
            f"note holds the control character U+{ord(control.group()):04X} at position "
            f"{control.start()}; send printable text (line breaks and tabs are fine)"
        )
    return note
