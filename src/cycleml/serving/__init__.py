"""Online serving: `cycleml serve` puts model bundles behind a KServe v2 HTTP API with a
load-aware dynamic batcher (see docs/serving.md).

Modules: ``cli`` (the command), ``app`` (the ASGI application), ``server`` / ``accept_loop``
(uvicorn and its event loop), ``routes_v2`` / ``routes_v1`` / ``fast_path`` (endpoints), ``dispatch`` (deadlines, limits, errors),
``protocol`` (request and response bodies), ``repository`` / ``served_model`` (models,
versions, reload), ``batcher`` / ``batch_policy`` (queueing and batching), ``metrics``,
``middleware``, ``auth``, ``settings``, and ``loadgen`` (a load generator for measuring
a server).
"""
