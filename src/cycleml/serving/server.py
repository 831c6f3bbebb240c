"""The uvicorn server behind `cycleml serve`: draining stop, one or several worker processes.

SIGTERM (or Ctrl-C) stops accepting connections, marks the server not ready, lets
every request in flight finish (up to ``limits.drain_timeout_s``), stops the model
instances after their queues are empty, and exits with status 0.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from types import FrameType

import uvicorn

from cycleml.errors import CycleMLError
from cycleml.serving.accept_loop import raise_open_file_limit
from cycleml.serving.app import ServingApp, create_app
from cycleml.serving.metrics import ServingMetrics
from cycleml.serving.repository import ModelRepository
from cycleml.serving.settings import ServeSettings

log = logging.getLogger(__name__)

SETTINGS_ENV = "CYCLEML_SERVE_SETTINGS"


class DrainingServer(uvicorn.Server):
    """A uvicorn server that flips readiness off as soon as a stop signal arrives and
    treats a drained shutdown as a clean exit."""

    def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_stop = on_stop

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            log.info("signal %d: draining in-flight requests, then stopping", sig)
        self._on_stop()
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals after shutdown, which would end the process
        # with the signal's status; a drained stop is a success (a uvicorn that keeps no
        # such list re-raises nothing)
        captured = getattr(self, "_captured_signals", None)
        if captured is not None:
            captured.clear()


def uvicorn_options(settings: ServeSettings) -> dict:
    """How uvicorn runs the server (also used by tests that run it in a thread)."""
    return {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,  # keep the logging set up by Hydra
        "access_log": False,  # the server writes its own structured access log
        "timeout_graceful_shutdown": int(settings.limits.drain_timeout_s),
        "backlog": 2048,
        "timeout_keep_alive": 30,
        # proxy headers are read inside the app, for the routes that use them (app.py)
        "proxy_headers": False,
        "http": "httptools",
        # uvloop, accepting every waiting connection in one turn (accept_loop.py), and
        # with coalesce_writes sending a response in one write (coalescing.py); it
        # applies to servers started on an open socket, as serve() starts them
        "loop": "cycleml.serving.accept_loop:"
        + ("new_event_loop" if settings.coalesce_writes else "new_event_loop_sending_each_write"),
    }


def use_gil_switch_interval(settings: ServeSettings) -> None:
    """Set this process's GIL switch interval (``runtime.gil_switch_interval_ms``).

    A batcher thread whose ONNX Runtime run has ended needs the GIL to hand the results
    back, and the event loop, busy under load, gives it up only when asked: after
    Python's 5 ms default, during which that instance's core idles. Measured on two
    cores (ResNet-18 32x32, 64 clients, two runs of 4 and 5 alternating turns), 0.2 ms
    served 5.4 % more requests/s than 5 ms; 0.1 and 0.05 ms gained less (3.9 %), with
    smaller batches.
    """
    sys.setswitchinterval(settings.runtime.gil_switch_interval_ms / 1000.0)


def serve(settings: ServeSettings) -> None:
    """Run the server until SIGTERM/SIGINT."""
    raise_open_file_limit()
    if settings.workers == 1:
        use_gil_switch_interval(settings)
        app = create_app(settings)
        state = app.state.serving
        config = uvicorn.Config(app, **uvicorn_options(settings))
        server = DrainingServer(config, on_stop=lambda: setattr(state, "draining", True))
        state.on_no_model = lambda: setattr(server, "should_exit", True)
        log.info("serving %s on http://%s:%d", settings.path, settings.host, settings.port)
        # on an open socket, as uvicorn runs its worker processes too (see "loop" above)
        server.run(sockets=[config.bind_socket()])
        if state.load_failure is not None and state.load_failure.startswith("experiments:"):
            raise CycleMLError(f"cannot serve '{settings.path}': {state.load_failure}")
        if state.load_failure is not None:
            raise CycleMLError(
                f"no model could be loaded from '{settings.path}': {state.load_failure}"
            )
        return
    # several processes: a repository without a bundle would leave every worker unready
    # (a bundle that fails to load is reported by each worker's readiness and index)
    if not ModelRepository(settings, ServingMetrics()).scan():
        raise CycleMLError(f"no model bundles found under '{settings.path}'")
    # several processes: each worker builds its own app from the settings in the
    # environment, and Prometheus values are shared through a directory
    os.environ[SETTINGS_ENV] = json.dumps(settings.to_dict())
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="cycleml-metrics-")
    log.info(
        "serving %s on http://%s:%d with %d worker processes",
        settings.path,
        settings.host,
        settings.port,
        settings.workers,
    )
    uvicorn.run(
        f"{__name__}:app_from_environment",
        factory=True,
        workers=settings.workers,
        **uvicorn_options(settings),
    )


def app_from_environment() -> ServingApp:
    """The app of one worker process (``workers > 1``)."""
    settings = ServeSettings.from_dict(json.loads(os.environ[SETTINGS_ENV]))
    use_gil_switch_interval(settings)
    return create_app(settings)
