"""``POST /v1/feedback``: true labels for logged predictions, and experiment outcomes.

The body is one object or a list of them. ``{"request_id": "...", "label": "..."}``
attaches a true label (a class name) to a logged prediction.
``{"request_id" | "unit": "...", "event": "click", "value": 1.0, "experiment": "..."}``
records an outcome of an A/B experiment next to the request's (or the unit's latest)
assignment, in ``ab_events``. The answer counts what was attached and names every
request id (and unit) that matches nothing: such events are stored with arm null and
counted in ``cycleml_feedback_unknown_total``, never dropped silently. An event whose
request id belongs to another experiment than the one the item names is stored under
the request's experiment and arm and its request id listed in ``mismatched_request_ids``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from cycleml.db import safe_url
from cycleml.experiments.tables import events as events_table
from cycleml.monitoring.tables import predictions, text_problem
from cycleml.serving.dispatch import error_response, json_response, read_body, state_of
from cycleml.serving.experiments import FeedbackEvent, parse_event
from cycleml.serving.protocol import ProtocolError, json_loads

log = logging.getLogger(__name__)

router = APIRouter()

_ITEM = {
    "type": "object",
    "required": ["request_id", "label"],
    "properties": {"request_id": {"type": "string"}, "label": {"type": "string"}},
}
_EVENT = {
    "type": "object",
    "required": ["event"],
    "properties": {
        "request_id": {"type": "string"},
        "unit": {"type": "string"},
        "event": {"type": "string", "example": "click"},
        "value": {"type": "number", "default": 1.0},
        "experiment": {"type": "string"},
    },
}
_ANY = {"oneOf": [_ITEM, _EVENT]}
_FEEDBACK_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"oneOf": [_ANY, {"type": "array", "items": _ANY}]}}
        },
    }
}


# the longest text each field may hold: its column's length, so no database refuses it
_MAX_CHARS = {
    "request_id": predictions.c.request_id.type.length,
    "label": predictions.c.label.type.length,
    "unit": events_table.c.unit.type.length,
    "event": events_table.c.event.type.length,
    "experiment": events_table.c.experiment.type.length,
}


def _check_text_fields(item: dict, where: str) -> None:
    """Refuse an item whose text fields could not be stored as given: longer than
    their column, or holding control characters (a ProtocolError names the field)."""
    for key, limit in _MAX_CHARS.items():
        value = item.get(key)
        if not isinstance(value, str):
            continue  # the item's own checks name a wrong type
        problem = text_problem(key, value, limit)
        if problem:
            raise ProtocolError(f"{where}: {problem}")


def parse_feedback(body: bytes) -> list[tuple[str, str]]:
    """``(request_id, label)`` pairs from a feedback body of labels only; a
    ProtocolError names what is wrong with it."""
    labels, events = parse_feedback_items(body)
    if events:
        raise ProtocolError("feedback body holds outcome events; expected labels only")
    return labels


def parse_feedback_items(body: bytes) -> tuple[list[tuple[str, str]], list[FeedbackEvent]]:
    """The labels ``(request_id, label)`` and the outcome events of a feedback body; a
    ProtocolError names what is wrong with it."""
    try:
        value = json_loads(body)
    except ValueError:
        raise ProtocolError("feedback body is not valid JSON") from None
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ProtocolError("feedback body is an empty list; send at least one label")
    pairs = []
    events = []
    for index, item in enumerate(items):
        where = "feedback" if not isinstance(value, list) else f"feedback item #{index}"
        if isinstance(item, dict):
            _check_text_fields(item, where)
        if isinstance(item, dict) and "event" in item:
            events.append(parse_event(item, where))
            continue
        if not isinstance(item, dict) or set(item) != {"request_id", "label"}:
            raise ProtocolError(
                f'{where} must be an object {{"request_id": ..., "label": ...}} or '
                f'{{"request_id" | "unit": ..., "event": ..., "value": ...}}, got '
                f"{_describe(item)}"
            )
        request_id, label = item["request_id"], item["label"]
        if not isinstance(request_id, str) or not request_id:
            raise ProtocolError(f"{where}: request_id must be a non-empty string")
        # a class name; integer class names (digits) may come as numbers
        if isinstance(label, int) and not isinstance(label, bool):
            label = str(label)
        if not isinstance(label, str) or not label:
            raise ProtocolError(f"{where}: label must be a class name (a non-empty string)")
        pairs.append((request_id, label))
    return pairs, events


def _describe(item: Any) -> str:
    if isinstance(item, dict):
        return "an object with keys " + ", ".join(sorted(map(str, item))) if item else "{}"
    return type(item).__name__


@router.post(
    "/v1/feedback",
    tags=["monitoring"],
    openapi_extra=_FEEDBACK_BODY,
    summary="Attach true labels to logged predictions by request id",
)
async def feedback(request: Request) -> Response:
    state = state_of(request)
    try:
        labels, events = parse_feedback_items(await read_body(request, state))
    except Exception as err:
        return error_response(err, state.settings)[1]
    logger = state.repository.prediction_logger
    if labels and logger is None:
        return json_response(
            {"error": "the prediction log is off; start the server with monitoring.enabled=true"},
            409,
        )
    answer = {"received": 0, "attached": 0, "unknown": 0, "unknown_request_ids": []}
    if labels:
        assert logger is not None
        try:
            # database work: off the event loop
            report = await asyncio.to_thread(logger.attach_labels, labels)
        except Exception as err:
            return _database_failed(state, logger.db_url, err)
        if report.unknown:
            state.metrics.feedback_unknown.inc(report.unknown)
        answer["received"] += report.received
        answer["attached"] += report.attached
        answer["unknown"] += report.unknown
        answer["unknown_request_ids"] += report.unknown_ids
    if events:
        router = state.experiments
        if router is None or router.db_url is None:
            return json_response(
                {"error": "outcome events need the experiments' database: set monitoring.db_url"},
                409,
            )
        try:
            outcome = await asyncio.to_thread(router.record_events, events)
        except Exception as err:
            return _database_failed(state, router.db_url, err)
        answer["received"] += outcome.received
        answer["attached"] += outcome.attached
        answer["unknown"] += len(outcome.unknown_request_ids) + len(outcome.unknown_units)
        answer["unknown_request_ids"] += outcome.unknown_request_ids
        answer["unknown_units"] = outcome.unknown_units
        answer["mismatched_request_ids"] = outcome.mismatched_request_ids
    return json_response(answer)


def _database_failed(state: Any, db_url: str, err: Exception) -> Response:
    where = safe_url(db_url)
    log.warning("feedback: the database at %s failed: %s", where, err)
    return json_response(
        {"error": f"the feedback database ({where}) failed: {type(err).__name__}"},
        503,
        {"Retry-After": str(state.settings.limits.retry_after_s)},
    )
