"""The ASGI application: KServe v2 endpoints, the convenience endpoint, health,
metrics and OpenAPI docs, over a model repository that loads in the background."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

import cycleml
from cycleml.errors import CycleMLError
from cycleml.serving import (
    routes_experiments,
    routes_feedback,
    routes_stats,
    routes_v1,
    routes_v2,
)
from cycleml.serving.access_log import AccessLog
from cycleml.serving.auth import ApiKeyAuth
from cycleml.serving.body_guard import BodyBudget
from cycleml.serving.dispatch import ServerState, json_response, state_of
from cycleml.serving.experiments import ExperimentRouter
from cycleml.serving.fast_path import InferenceFastPath
from cycleml.serving.metrics import ServingMetrics
from cycleml.serving.middleware import RequestContextMiddleware
from cycleml.serving.prediction_logger import PredictionLogger
from cycleml.serving.repository import ModelRepository
from cycleml.serving.settings import ServeSettings, read_api_keys

log = logging.getLogger(__name__)


class ServingApp:
    """The ASGI application the server runs: request context (id, auth, limits, access
    log), which answers inference requests on the fast path and passes every other
    request to the FastAPI application that holds every route and the OpenAPI document.
    Inference requests thus skip the framework's middleware too; ``state`` is the
    FastAPI app's state."""

    def __init__(self, api: FastAPI, asgi: RequestContextMiddleware) -> None:
        self.api = api
        self.state = api.state
        self._asgi = asgi

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._asgi(scope, receive, send)


def create_app(settings: ServeSettings) -> ServingApp:
    """The server application. Models load after start-up, in the background: the server
    is live at once and ready (``/v2/health/ready``) once every model is warm."""
    metrics = ServingMetrics()
    keys = read_api_keys(settings.auth) if settings.auth.enabled else []
    auth = ApiKeyAuth(keys, settings.auth.public_paths) if settings.auth.enabled else None
    prediction_logger = (
        PredictionLogger(
            str(settings.monitoring.db_url),
            settings.monitoring.sample_rate,
            settings.monitoring.buffer_rows,
            settings.monitoring.buffer_bytes,
            on_dropped=metrics.prediction_log_dropped.inc,
        )
        if settings.monitoring.enabled
        else None
    )
    drift_reporter = None
    if prediction_logger is not None and settings.monitoring.report_interval_s:
        # the drift tests need scipy and pandas: loaded only when the gauges are on
        from cycleml.serving.drift_gauges import DriftGauges, DriftReporter

        gauges = DriftGauges()
        metrics.add_collector(gauges)
        drift_reporter = DriftReporter(
            gauges,
            prediction_logger.prediction_log,
            lambda: state.repository.all_models(),
            settings.monitoring.report_interval_s,
            settings.monitoring.report_window,
        )
    state = ServerState(
        settings=settings,
        metrics=metrics,
        repository=ModelRepository(settings, metrics, prediction_logger),
        decode_pool=ThreadPoolExecutor(
            settings.runtime.decode_threads, thread_name_prefix="decode"
        ),
        auth=auth,
    )
    state.experiments = ExperimentRouter(settings, state.repository, metrics)
    state.experiments_started = not state.experiments.wanted
    access_log = AccessLog() if settings.access_log else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.ensure_future(asyncio.to_thread(_load, state))
        loading.add_done_callback(lambda _: _stop_if_nothing_loaded(state))
        if drift_reporter is not None:
            drift_reporter.start()
        try:
            yield
        finally:
            state.draining = True
            await loading
            if drift_reporter is not None:
                await asyncio.to_thread(drift_reporter.close)
            if state.experiments is not None:
                await asyncio.to_thread(state.experiments.close)
            await asyncio.to_thread(state.repository.close)
            if prediction_logger is not None:
                await asyncio.to_thread(prediction_logger.close)
            state.decode_pool.shutdown(wait=True)
            if access_log is not None:
                await asyncio.to_thread(access_log.close)
            log.info("server stopped")

    app = FastAPI(
        title="cycleml serving",
        version=cycleml.__version__,
        description="KServe v2 / Open Inference Protocol over HTTP, with a load-aware "
        "dynamic batcher per model.",
        lifespan=lifespan,
        # no interactive pages: they load Swagger UI / ReDoc from a CDN, which a server
        # without internet cannot reach, and no installed package ships their assets;
        # the OpenAPI document itself is served at /openapi.json
        docs_url=None,
        redoc_url=None,
    )
    # every error, also an unknown route or method, in the documented {"error": ...} shape
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.state.serving = state
    app.include_router(routes_stats.router)  # before /v2/models/{model_name}
    app.include_router(routes_v2.router)
    app.include_router(routes_v1.router)
    app.include_router(routes_feedback.router)
    app.include_router(routes_experiments.router)
    app.add_api_route(
        "/v2", server_metadata, methods=["GET"], tags=["health"], summary="Server metadata"
    )
    app.add_api_route("/v2/health/live", live, methods=["GET"], tags=["health"], summary="Liveness")
    app.add_api_route(
        "/v2/health/ready",
        ready,
        methods=["GET"],
        tags=["health"],
        summary="Readiness: every model loaded and warm, not draining",
    )
    app.add_api_route(
        "/metrics", metrics_endpoint, methods=["GET"], tags=["health"], summary="Prometheus metrics"
    )
    asgi = RequestContextMiddleware(
        # X-Forwarded-For/-Proto from a trusted proxy (FORWARDED_ALLOW_IPS, as uvicorn
        # reads it) set the client address and scheme the framework routes see
        ProxyHeadersMiddleware(app, os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")),
        fast_path=InferenceFastPath(state),
        auth=auth,
        limits=settings.limits,
        access_log=access_log,
        on_busy=metrics.rejected.labels("", "", "server_busy").inc,
        budget=BodyBudget(settings.limits.max_buffered_bytes),
    )
    return ServingApp(app, asgi)


# allocations between young-generation collections once the server is loaded
GC_YOUNG_THRESHOLD = 20_000


def _load(state: ServerState) -> None:
    state.repository.load_all()
    if not state.repository.all_models():
        reasons = [
            f"{e['name']}: " + (f"version {e['version']} " if "version" in e else "") + e["reason"]
            for e in state.repository.index()
            if "reason" in e
        ]
        # a repository-wide problem (an unreadable registry or folder) comes first
        wide = state.repository.failure_reason("*")
        parts = ([wide] if wide else []) + reasons
        state.load_failure = (
            "; ".join(parts) or f"no model bundles found under '{state.settings.path}'"
        )
        log.error("no model could be loaded: %s", state.load_failure)
        return
    if state.experiments is not None and not state.experiments_started:
        try:
            state.experiments.start()
        except (CycleMLError, ValueError) as err:
            # a configured experiment that cannot run stops the server with the reason
            state.load_failure = f"experiments: {err}"
            log.error("%s", state.load_failure)
            return
        state.experiments_started = True
    # Everything loaded so far (the libraries, the sessions, the app) lives as long as
    # the server. Moved out of the collector's reach, it is not scanned again: without
    # this, each full collection walked it all and held the event loop and the batchers
    # for about 30 ms, which showed as latency spikes and lost throughput under load.
    gc.collect()
    gc.freeze()
    # A request allocates a few hundred objects that die with it; at the default young
    # generation threshold (700) the collector ran every few requests. Measured on two
    # cores under load (ResNet-18 32x32, 64 clients, 4 alternating turns), 20,000 took
    # the event loop's CPU per request from 302 to 274 us and the whole server's from
    # 1.73 to 1.57 ms; what survives is collected as before, only less often.
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    if not state.draining:  # the folder watch (reload.watch) and a registry's aliases
        state.repository.start_watching()


def _stop_if_nothing_loaded(state: ServerState) -> None:
    """A server that could load no model would stay unready for good: stop it, so that
    ``cycleml serve`` exits with the reason instead."""
    if state.load_failure is not None and state.on_no_model is not None:
        state.on_no_model()


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    return json_response({"error": str(exc.detail)}, exc.status_code, exc.headers)


async def server_metadata(request: Request) -> Response:
    return json_response(
        {
            "name": "cycleml",
            "version": cycleml.__version__,
            "extensions": ["binary_tensor_data", "model_repository", "statistics"],
        }
    )


async def live(request: Request) -> Response:
    return json_response({"live": True})


async def ready(request: Request) -> Response:
    state = state_of(request)
    is_ready = state.repository.ready and state.experiments_started and not state.draining
    return json_response({"ready": is_ready}, 200 if is_ready else 503)


async def metrics_endpoint(request: Request) -> Response:
    body, content_type = state_of(request).metrics.exposition()
    return Response(body, media_type=content_type)
