"""KServe v2 / Open Inference Protocol endpoints, with the binary-tensor and
model-repository extensions."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from cycleml.serving.dispatch import (
    ServerState,
    account,
    decode_body,
    error_parts,
    error_response,
    infer_rows,
    json_response,
    receive_body,
    record_item,
    request_timeout_s,
    state_of,
)
from cycleml.serving.experiments import Routed
from cycleml.serving.protocol import (
    BYTES,
    encode_response,
    json_dumps,
    parse_binary_request,
    parse_json_request,
)
from cycleml.serving.repository import BadModelRef, LoadFailed, ModelNotFound, ModelUnavailable
from cycleml.serving.served_model import ServedModel

router = APIRouter()

_TENSOR_SCHEMA = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string", "example": "UINT8"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "data": {"type": "array", "description": "flat or nested, row-major"},
        "parameters": {"type": "object"},
    },
}
_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {"type": "array", "items": _TENSOR_SCHEMA},
                        "outputs": {"type": "array", "items": {"type": "object"}},
                    },
                }
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "binary-tensor extension: a JSON header of "
                "Inference-Header-Content-Length bytes, then the tensor bytes",
            },
        },
    }
}
_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {
        "description": "malformed request or model reference (name@alias), wrong input "
        "name, datatype or shape"
    },
    404: {"description": "unknown model or version"},
    413: {"description": "body too large"},
    415: {"description": "unsupported Content-Encoding (gzip and deflate are accepted)"},
    429: {"description": "queue full; retry after Retry-After seconds"},
    503: {"description": "model not ready, or queue full (limits.overload_status=503)"},
    504: {"description": "the request could not start before its timeout"},
}


# (status, headers, body) of an HTTP answer, ready to send
Answer = tuple[int, list[tuple[bytes, bytes]], bytes]

_JSON = (b"content-type", b"application/json")
# every inference answer names the model version that computed it
MODEL_VERSION_HEADER = b"x-model-version"
_BINARY = (b"content-type", b"application/octet-stream")


async def infer_answer(
    state: ServerState,
    scope: Scope,
    receive: Receive,
    model_name: str,
    version: str | None,
) -> Answer:
    """Run one inference request from its ASGI scope to the bytes of its answer, counted
    in the metrics and noted in the access log fields.

    This is the whole of ``POST /v2/models/{m}[/versions/{v}]/infer``: the fast path
    sends its answer directly, the documented routes wrap it in a response. Every
    request pays for each step here, so it reads the headers in one pass and builds the
    answer without a framework response object.
    """
    started = time.perf_counter()
    info: dict[str, Any] = scope.setdefault("cycleml", {})
    info["model"] = model_name
    header_length = encoding = timeout_header = declared = None
    for name, value in scope["headers"]:
        if name == b"inference-header-content-length":
            header_length = value.decode("latin-1")
        elif name == b"content-length":
            declared = value
        elif name == b"content-encoding":
            encoding = value.decode("latin-1")
        elif name == b"x-timeout-ms":
            timeout_header = value.decode("latin-1")
    settings = state.settings
    served = None
    routed: Routed | None = None
    try:
        body = await receive_body(receive, settings.limits.max_body_bytes, declared)
        if encoding is not None:
            body = await decode_body(state, body, encoding)
        if header_length is not None:
            # binary tensors: a small JSON header, the tensors are views of the body
            parsed = parse_binary_request(body, header_length)
        else:
            parsed = await state.off_loop(parse_json_request, body)
        deadline = started + request_timeout_s(settings, timeout_header, parsed.timeout_us)
        router = state.experiments
        if version is None and router is not None and router.active:
            # an experiment on this model name: the unit's arm answers
            routed = router.route(model_name, scope, parsed.parameters)
        if routed is None:
            model = served = state.repository.acquire(model_name, version)
        else:
            info["experiment"] = routed.experiment.name
            info["arm"] = routed.arm
            model = served = router.acquire(routed)
        try:
            # the model that computes the answer names it (an alias may move meanwhile)
            info["model"] = model.name
            info["version"] = model.version
            if parsed.inputs[0].datatype == BYTES:  # texts, tokenized here
                rows = await state.decode_by(
                    deadline, model.rows_from_texts, parsed, settings.limits
                )
            else:
                rows = model.check_request(parsed)
            item = await infer_rows(receive, model, rows, deadline, info.get("request_id"))
            record_item(info, item)
            encoded = encode_response(
                model.name,
                model.version,
                parsed,
                {model.output_name: item.output},
                None if routed is None else routed.body_fields,
            )
        finally:
            model.release()
        model.stats.request_succeeded(time.perf_counter() - started, item.queue_s, item.inference_s)
    except Exception as err:
        status, message, extra = error_parts(err, settings)
        info["error"] = message[:200]
        if served is not None:
            served.stats.request_failed(time.perf_counter() - started)
        account(state, info, "v2_infer", status, started)
        headers = [_JSON, *((k.lower().encode(), v.encode()) for k, v in extra.items())]
        if "version" in info:
            headers.append((MODEL_VERSION_HEADER, info["version"].encode()))
        if routed is not None:
            headers += routed.headers
            state.experiments.record_answer(routed, info, status, started)
        return status, headers, json_dumps({"error": message})
    account(state, info, "v2_infer", 200, started)
    version_header = (MODEL_VERSION_HEADER, model.version.encode())
    if encoded.header_length is None:
        headers = [_JSON, version_header]
    else:
        headers = [
            _BINARY,
            (b"inference-header-content-length", str(encoded.header_length).encode()),
            version_header,
        ]
    if routed is not None:
        headers += routed.headers
        state.experiments.record_answer(routed, info, 200, started)
        if routed.shadow is not None:
            _mirror_v2(state, routed, info, parsed)
    return 200, headers, encoded.body


def _mirror_v2(state: ServerState, routed: Routed, info: dict[str, Any], parsed: Any) -> None:
    """Send the shadow arm the same request; its answer is recorded, never returned."""
    assert state.experiments is not None
    settings = state.settings
    timeout = settings.limits.default_timeout_ms / 1000.0

    async def prepare(model: ServedModel) -> np.ndarray:
        if parsed.inputs[0].datatype == BYTES:
            deadline = time.perf_counter() + timeout
            return await state.decode_by(deadline, model.rows_from_texts, parsed, settings.limits)
        return model.check_request(parsed)

    state.experiments.mirror(
        routed,
        str(info.get("request_id")),
        timeout,
        prepare,
        lambda err: error_parts(err, settings)[0],
    )


def _with_length(headers: list[tuple[bytes, bytes]], body: bytes) -> list[tuple[bytes, bytes]]:
    return [*headers, (b"content-length", str(len(body)).encode())]


async def send_answer(send: Send, answer: Answer) -> None:
    status, headers, body = answer
    await send(
        {"type": "http.response.start", "status": status, "headers": _with_length(headers, body)}
    )
    await send({"type": "http.response.body", "body": body})


async def infer_response(request: Request, model_name: str, version: str | None) -> Response:
    """The inference answer as a response object (the documented routes below)."""
    status, headers, body = await infer_answer(
        state_of(request), request.scope, request.receive, model_name, version
    )
    response = Response(body, status_code=status)
    response.raw_headers = _with_length(headers, body)
    return response


@router.post(
    "/v2/models/{model_name}/infer",
    tags=["inference"],
    openapi_extra=_INFER_BODY,
    responses=_INFER_RESPONSES,
    summary="Run inference (the default version, or model@alias)",
)
async def infer(request: Request, model_name: str) -> Response:
    return await infer_response(request, model_name, None)


@router.post(
    "/v2/models/{model_name}/versions/{model_version}/infer",
    tags=["inference"],
    openapi_extra=_INFER_BODY,
    responses=_INFER_RESPONSES,
    summary="Run inference on a pinned version",
)
async def infer_version(request: Request, model_name: str, model_version: str) -> Response:
    return await infer_response(request, model_name, model_version)


def _lookup(request: Request, model_name: str, version: str | None) -> Any:
    state = state_of(request)
    try:
        return state.repository.get(model_name, version), None
    except (ModelNotFound, ModelUnavailable, BadModelRef) as err:
        return None, error_response(err, state.settings)[1]


@router.get("/v2/models/{model_name}", tags=["models"], summary="Model metadata")
async def model_metadata(request: Request, model_name: str) -> Response:
    return _metadata(request, model_name, None)


@router.get(
    "/v2/models/{model_name}/versions/{model_version}",
    tags=["models"],
    summary="Model version metadata",
)
async def model_version_metadata(request: Request, model_name: str, model_version: str) -> Response:
    return _metadata(request, model_name, model_version)


def _metadata(request: Request, model_name: str, version: str | None) -> Response:
    model, failure = _lookup(request, model_name, version)
    if failure is not None:
        return failure
    repository = state_of(request).repository
    meta = model.metadata(repository.versions(model.name))
    # which version this name resolves to, and where each alias of the model points
    meta["version"] = model.version
    meta["aliases"] = repository.aliases(model.name)
    return json_response(meta)


@router.get("/v2/models/{model_name}/ready", tags=["health"], summary="Model readiness")
async def model_ready(request: Request, model_name: str) -> Response:
    return _ready(request, model_name, None)


@router.get(
    "/v2/models/{model_name}/versions/{model_version}/ready",
    tags=["health"],
    summary="Model version readiness",
)
async def model_version_ready(request: Request, model_name: str, model_version: str) -> Response:
    return _ready(request, model_name, model_version)


def _ready(request: Request, model_name: str, version: str | None) -> Response:
    model, failure = _lookup(request, model_name, version)
    if failure is not None:
        return failure
    state = state_of(request)
    ready = model.ready and not state.draining
    answer = {"name": model.name, "version": model.version, "ready": ready}
    # a newer version that failed to load: the model still serves, but says why not that one
    reason = state.repository.failure_reason(model.name)
    if reason is not None:
        answer["reason"] = reason
    return json_response(answer, 200 if ready else 503)


@router.get(
    "/v2/models/{model_name}/config",
    tags=["models"],
    summary="Model configuration (batching and instances)",
)
async def model_config(request: Request, model_name: str) -> Response:
    model, failure = _lookup(request, model_name, None)
    if failure is not None:
        return failure
    settings = state_of(request).settings
    return json_response(
        {
            "name": model.name,
            "platform": "onnxruntime_onnx",
            "max_batch_size": model.max_batch_size,
            "input": [
                {
                    "name": model.input_name,
                    "data_type": f"TYPE_{model.input_datatype}",
                    "dims": list(model.input_shape[1:]),
                }
            ],
            "output": [
                {
                    "name": model.output_name,
                    "data_type": "TYPE_FP32",
                    "dims": [len(model.class_names)],
                }
            ],
            "dynamic_batching": {
                "max_queue_delay_microseconds": int(settings.batching.max_queue_delay_ms * 1000),
                "max_queue_size": settings.batching.max_queue_size,
            },
            "instance_group": [{"count": len(model.batchers), "kind": "KIND_CPU"}],
        }
    )


# -- model repository extension ------------------------------------------------------------
@router.post("/v2/repository/index", tags=["repository"], summary="Models and their states")
async def repository_index(request: Request) -> Response:
    return json_response(state_of(request).repository.index())


@router.post(
    "/v2/repository/models/{model_name}/load",
    tags=["repository"],
    summary="Load or reload a model from the repository folder",
    responses={
        400: {
            "description": "a malformed model name, or a version failed to load (the "
            "versions served before stay)"
        },
        404: {"description": "no such model on disk"},
        503: {"description": "the model failed to load"},
    },
)
async def repository_load(request: Request, model_name: str) -> Response:
    state = state_of(request)
    try:
        versions = await asyncio.to_thread(state.repository.load_model, model_name)
    except (ModelNotFound, ModelUnavailable, LoadFailed, BadModelRef) as err:
        return error_response(err, state.settings)[1]
    return json_response({"name": model_name, "versions": versions})


@router.post(
    "/v2/repository/models/{model_name}/unload",
    tags=["repository"],
    summary="Stop serving a model (after its queued requests)",
    responses={
        400: {"description": "a malformed model name"},
        404: {"description": "the model is not loaded"},
    },
)
async def repository_unload(request: Request, model_name: str) -> Response:
    state = state_of(request)
    try:
        await asyncio.to_thread(state.repository.unload_model, model_name)
    except (ModelNotFound, BadModelRef) as err:
        return error_response(err, state.settings)[1]
    return json_response({"name": model_name, "unloaded": True})
