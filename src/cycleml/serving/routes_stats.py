"""The statistics extension (Triton's shape): ``GET /v2/models/stats``,
``/v2/models/{m}/stats`` and ``/v2/models/{m}/versions/{v}/stats``.

Its router is included before the KServe routes, whose ``/v2/models/{model_name}``
would otherwise take ``/v2/models/stats`` for a model called ``stats``.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from cycleml.serving.dispatch import error_response, json_response, state_of
from cycleml.serving.repository import BadModelRef, ModelNotFound, ModelUnavailable
from cycleml.serving.served_model import ServedModel

router = APIRouter()

_RESPONSES: dict[int | str, dict] = {
    400: {"description": "malformed model reference (name@alias)"},
    404: {"description": "unknown model or version"},
}


def _answer(request: Request, models: list[ServedModel]) -> Response:
    return json_response({"model_stats": [m.stats.to_triton(m.name, m.version) for m in models]})


@router.get("/v2/models/stats", tags=["models"], summary="Inference statistics of every model")
async def all_stats(request: Request) -> Response:
    models = sorted(state_of(request).repository.all_models(), key=lambda m: (m.name, m.version))
    return _answer(request, models)


@router.get(
    "/v2/models/{model_name}/stats",
    tags=["models"],
    summary="Inference statistics of a model's versions",
    responses=_RESPONSES,
)
async def model_stats(request: Request, model_name: str) -> Response:
    return _lookup_answer(request, model_name, None)


@router.get(
    "/v2/models/{model_name}/versions/{model_version}/stats",
    tags=["models"],
    summary="Inference statistics of a model version",
    responses=_RESPONSES,
)
async def model_version_stats(request: Request, model_name: str, model_version: str) -> Response:
    return _lookup_answer(request, model_name, model_version)


def _lookup_answer(request: Request, model_name: str, version: str | None) -> Response:
    state = state_of(request)
    repository = state.repository
    try:
        # every served version of a bare name, from one snapshot of the routing table
        # (a version retired by an alias move between two look-ups is no error)
        models = [m for m in repository.all_models() if m.name == model_name and not version]
        if not models:
            models = [repository.get(model_name, version)]
    except (ModelNotFound, ModelUnavailable, BadModelRef) as err:
        return error_response(err, state.settings)[1]
    return _answer(request, models)
