"""Convenience endpoint: send an image file or a text, get labels and probabilities.

``POST /v1/models/{model}:predict`` takes a raw image body (``Content-Type: image/*``
or ``application/octet-stream``), a multipart form with image files, or JSON
``{"text": "..."}`` / ``{"instances": [...]}`` (texts for a text model; nested pixel
arrays or ``{"b64": "<encoded image file>"}`` for an image model).
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.responses import Response

from cycleml.serving.decode_limits import check_images, tokenize_within_limits
from cycleml.serving.dispatch import (
    ServerState,
    answered,
    error_parts,
    infer_rows,
    json_response,
    read_body,
    record_item,
    state_of,
    timeout_s,
)
from cycleml.serving.experiments import Routed
from cycleml.serving.protocol import ProtocolError, json_loads
from cycleml.serving.routes_v2 import MODEL_VERSION_HEADER
from cycleml.serving.served_model import ServedModel

router = APIRouter()

TOP_K = 5

_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "text": {"type": "string"},
                        "instances": {"type": "array", "items": {}},
                    },
                }
            },
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
        },
    }
}


def _json_instances(body: bytes, model: ServedModel) -> list[str] | list[bytes | np.ndarray]:
    """The texts (text model) or encoded images and pixel arrays (image model) of a
    JSON body, not yet tokenized or decoded (runs on a decode thread)."""
    try:
        document = json_loads(body)
    except ValueError as err:
        raise ProtocolError(f"request body is not valid JSON: {err}") from None
    if not isinstance(document, dict) or ("text" not in document and "instances" not in document):
        raise ProtocolError('JSON body must be {"text": "..."} or {"instances": [...]}')
    if "text" in document:
        if model.kind != "text":
            raise ProtocolError(
                f"model '{model.name}' is an image model; send an image file "
                'or {"instances": [<H×W×C pixel array> | {"b64": ...}]}'
            )
        instances = [document["text"]]
    else:
        instances = document["instances"]
    if not isinstance(instances, list) or not instances:
        raise ProtocolError("'instances' must be a non-empty list")
    if len(instances) > model.max_batch_size:
        raise ProtocolError(
            f"{len(instances)} instances exceed the maximum of {model.max_batch_size} per request"
        )
    if model.kind == "text":
        return [i.get("text") if isinstance(i, dict) else i for i in instances]
    images: list[bytes | np.ndarray] = []
    for index, instance in enumerate(instances):
        if isinstance(instance, dict) and isinstance(instance.get("b64"), str):
            try:
                images.append(base64.b64decode(instance["b64"], validate=True))
            except binascii.Error:
                raise ProtocolError(f"instances[{index}].b64 is not valid base64") from None
        elif isinstance(instance, list):
            try:
                images.append(np.asarray(instance, dtype=np.uint8))
            except (ValueError, TypeError, OverflowError) as err:
                raise ProtocolError(
                    f"instances[{index}] is not a uint8 pixel array: {err}"
                ) from None
        else:
            raise ProtocolError(
                f'instances[{index}] must be a pixel array or {{"b64": "<encoded image>"}}'
            )
    return images


async def _rows(request: Request, body: bytes, model: ServedModel, deadline: float) -> np.ndarray:
    """The request's rows for the model. The decoding work is bounded before it starts
    (``limits.max_*``), and each image is decoded as a job of its own on the decode
    threads, each started only before the request's deadline. Jobs run in the order they
    are submitted, so a request's next image queues behind what other requests
    submitted meanwhile: a request of many large images takes turns with the others
    instead of holding the decode threads until it is done. (Measured: a 4096×4096 PNG
    takes about 0.4 s to decode and resize, so one job never holds a thread for long.)"""
    state = state_of(request)
    limits = state.settings.limits
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    images: list[bytes | np.ndarray]
    if content_type == "application/json":
        instances = await state.decode_by(deadline, _json_instances, body, model)
        if model.kind == "text":
            return await state.decode_by(
                deadline, tokenize_within_limits, instances, model.preprocess_texts, limits
            )
        images = instances
    elif model.kind != "image":
        raise ProtocolError(
            f"model '{model.name}' is a text model; send JSON "
            '{"text": "..."} or {"instances": ["...", ...]}'
        )
    elif content_type == "multipart/form-data":
        images = await _form_files(request, body, model.max_batch_size)
        if not images:
            raise ProtocolError("multipart body has no file parts")
        if len(images) > model.max_batch_size:
            raise ProtocolError(
                f"{len(images)} files exceed the maximum of {model.max_batch_size} per request"
            )
    elif not body:
        raise ProtocolError("empty body: send an image file, multipart form or JSON")
    else:
        images = [body]
    await state.decode_by(deadline, check_images, images, limits)
    return np.stack([await state.decode_by(deadline, model.preprocess_image, i) for i in images])


async def _form_files(request: Request, body: bytes, max_files: int) -> list[bytes]:
    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        # one more than allowed, so that too many files get the message that says so
        form = await Request(request.scope, replay).form(
            max_files=max_files + 1, max_fields=max_files + 1
        )
    except HTTPException as err:  # what the form parser found wrong with the body
        raise ProtocolError(f"malformed multipart body: {err.detail}") from None
    except (MultiPartException, KeyError, ValueError) as err:
        reason = getattr(err, "message", None) or (
            "no boundary in Content-Type" if isinstance(err, KeyError) else str(err)
        )
        raise ProtocolError(f"malformed multipart body: {reason}") from None
    try:
        return [await v.read() for _, v in form.multi_items() if isinstance(v, UploadFile)]
    finally:
        await form.close()


async def _predict(request: Request, model_name: str, version: str | None) -> Response:
    state = state_of(request)
    received = time.perf_counter()

    held: dict[str, bytes] = {}  # the body, for a mirrored (shadow) copy

    async def handle(info: dict[str, Any]) -> Response:
        router = state.experiments
        if version is None and router is not None and router.active:
            # an experiment on this model name: the unit's arm answers
            routed = router.route(model_name, request.scope)
            if routed is not None:
                info["experiment"] = routed.experiment.name
                info["arm"] = routed.arm
                try:
                    response = await answer(info, partial(router.acquire, routed))
                    status = 200
                except Exception as err:
                    # as on /v2: the failure names the experiment and the arm too
                    status, message, extra = error_parts(err, state.settings)
                    info["error"] = message[:200]
                    response = json_response({"error": message}, status, extra)
                response.headers.update({k.decode(): v.decode() for k, v in routed.headers})
                state.experiments.record_answer(routed, info, status, received)
                if status == 200 and routed.shadow is not None:
                    _mirror_v1(state, routed, request, info, held["body"])
                return response
        return await answer(info, partial(state.repository.acquire, model_name, version))

    async def answer(info: dict[str, Any], acquire: Callable[[], ServedModel]) -> Response:
        body = held["body"] = await read_body(request, state)
        deadline = received + timeout_s(request, state.settings, None)
        model = acquire()
        try:
            info["model"] = model.name
            info["version"] = model.version
            rows = await _rows(request, body, model, deadline)
            model.check_rows(rows)
            item = await infer_rows(request.receive, model, rows, deadline, info.get("request_id"))
            record_item(info, item)
            model.stats.request_succeeded(
                time.perf_counter() - received, item.queue_s, item.inference_s
            )
            predictions = model.predictors[0].to_predictions(item.output, TOP_K)
            return json_response(
                {
                    "model_name": model.name,
                    "model_version": model.version,
                    "id": info["request_id"],
                    **(
                        {"experiment": info["experiment"], "arm": info["arm"]}
                        if "arm" in info
                        else {}
                    ),
                    "predictions": [
                        {
                            "label": p.label,
                            "label_id": p.label_id,
                            "confidence": p.confidence,
                            "probabilities": dict(
                                zip(model.class_names, p.probabilities.tolist(), strict=True)
                            ),
                        }
                        for p in predictions
                    ],
                },
                headers={MODEL_VERSION_HEADER.decode(): model.version},
            )
        finally:
            model.release()

    return await answered(state, request, "v1_predict", model_name, handle)


def _mirror_v1(
    state: ServerState, routed: Routed, request: Request, info: dict[str, Any], body: bytes
) -> None:
    """Send the shadow arm the same request; its answer is recorded, never returned."""
    assert state.experiments is not None
    timeout = state.settings.limits.default_timeout_ms / 1000.0

    async def prepare(model: ServedModel) -> np.ndarray:
        rows = await _rows(request, body, model, time.perf_counter() + timeout)
        model.check_rows(rows)
        return rows

    state.experiments.mirror(
        routed,
        str(info.get("request_id")),
        timeout,
        prepare,
        lambda err: error_parts(err, state.settings)[0],
    )


@router.post(
    "/v1/models/{model_name}:predict",
    tags=["inference"],
    openapi_extra=_PREDICT_BODY,
    summary="Predict labels for an image file or a text",
)
async def predict(request: Request, model_name: str) -> Response:
    return await _predict(request, model_name, None)


@router.post(
    "/v1/models/{model_name}/versions/{model_version}:predict",
    tags=["inference"],
    openapi_extra=_PREDICT_BODY,
    summary="Predict with a pinned version",
)
async def predict_version(request: Request, model_name: str, model_version: str) -> Response:
    return await _predict(request, model_name, model_version)
