"""``POST /v1/feedback``: true labels for logged predictions, by request id.

The body is ``{"request_id": "...", "label": "..."}`` or a list of such objects; the
label is the class name. The answer counts what was attached and names every request
id that matches no logged prediction (nothing is dropped silently).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from cycleml.db import safe_url
from cycleml.serving.dispatch import error_response, json_response, read_body, state_of
from cycleml.serving.protocol import ProtocolError, json_loads

log = logging.getLogger(__name__)

router = APIRouter()

_ITEM = {
    "type": "object",
    "required": ["request_id", "label"],
    "properties": {"request_id": {"type": "string"}, "label": {"type": "string"}},
}
_FEEDBACK_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"oneOf": [_ITEM, {"type": "array", "items": _ITEM}]}}
        },
    }
}


def parse_feedback(body: bytes) -> list[tuple[str, str]]:
    """``(request_id, label)`` pairs from a feedback body; a ProtocolError names what
    is wrong with it."""
    try:
        value = json_loads(body)
    except ValueError:
        raise ProtocolError("feedback body is not valid JSON") from None
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ProtocolError("feedback body is an empty list; send at least one label")
    pairs = []
    for index, item in enumerate(items):
        where = "feedback" if not isinstance(value, list) else f"feedback item #{index}"
        if not isinstance(item, dict) or set(item) != {"request_id", "label"}:
            raise ProtocolError(
                f'{where} must be an object {{"request_id": ..., "label": ...}}, got '
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
    return pairs


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
        labels = parse_feedback(await read_body(request, state))
    except Exception as err:
        return error_response(err, state.settings)[1]
    logger = state.repository.prediction_logger
    if logger is None:
        return json_response(
            {"error": "the prediction log is off; start the server with monitoring.enabled=true"},
            409,
        )
    try:
        # database work: off the event loop
        report = await asyncio.to_thread(logger.attach_labels, labels)
    except Exception as err:
        where = safe_url(logger.db_url)
        log.warning("feedback: the prediction log at %s failed: %s", where, err)
        return json_response(
            {"error": f"the prediction log's database ({where}) failed: {type(err).__name__}"},
            503,
            {"Retry-After": str(state.settings.limits.retry_after_s)},
        )
    return json_response(
        {
            "received": report.received,
            "attached": report.attached,
            "unknown": report.unknown,
            "unknown_request_ids": report.unknown_ids,
        }
    )
