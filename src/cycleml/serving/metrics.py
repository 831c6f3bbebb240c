"""Prometheus metrics of the server, served at ``/metrics``.

With several server processes (``workers > 1``) the values live in
``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics`` sums them over the processes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector


def _zero() -> int:
    return 0


LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.004,
    0.008,
    0.016,
    0.032,
    0.064,
    0.128,
    0.256,
    0.512,
    1.0,
    2.0,
    4.0,
    8.0,
    16.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

# the model label of requests for a model the server does not serve: names come from the
# URL, and a label value per made-up name would grow the series without bound
UNKNOWN_MODEL = "_unknown"


class ServingMetrics:
    """The server's counters, histograms and gauges, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # several server processes (workers > 1) keep their values in files
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        labels = ("model", "version")
        self.requests = Counter(
            "cycleml_requests_total",
            "Inference requests by model, version, endpoint and HTTP status.",
            (*labels, "endpoint", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "cycleml_request_latency_seconds",
            "Time from receiving an inference request to its response.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "cycleml_queue_time_seconds",
            "Time a request waited in its model's queue before its batch started.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inference_time = Histogram(
            "cycleml_inference_time_seconds",
            "Runtime of one batch in ONNX Runtime.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "cycleml_batch_size",
            "Rows per batch run by a model instance.",
            labels,
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "cycleml_queue_depth",
            "Requests waiting in a model's queue.",
            labels,
            multiprocess_mode="livesum",
            registry=self.registry,
        )
        self.rejected = Counter(
            "cycleml_rejected_total",
            "Requests refused before compute: queue_full, deadline, cancelled, server_busy "
            "(the in-flight limit of the process; model and version empty).",
            (*labels, "reason"),
            registry=self.registry,
        )
        self.load_failures = Counter(
            "cycleml_model_load_failures_total",
            "Loads of a model version that failed; the versions served before stay served.",
            labels,
            registry=self.registry,
        )
        self.models_ready = Gauge(
            "cycleml_model_ready",
            "1 while a model version is loaded, warm and serving.",
            labels,
            multiprocess_mode="livemax",
            registry=self.registry,
        )
        self.prediction_log_dropped = Counter(
            "cycleml_prediction_log_dropped_total",
            "Prediction log records dropped: the writer's buffer was full, or the "
            "database refused or could not be reached.",
            registry=self.registry,
        )
        self.experiment_requests = Counter(
            "cycleml_experiment_requests_total",
            "Requests routed by an experiment, by experiment, answering arm and how the "
            "arm was chosen: unit (hash of the unit id) or random (no unit id sent).",
            ("experiment", "arm", "assigned"),
            registry=self.registry,
        )
        self.experiment_dropped = Counter(
            "cycleml_experiment_assignments_dropped_total",
            "Experiment assignment rows dropped: the writer's buffer was full, or the "
            "database refused or could not be reached.",
            registry=self.registry,
        )
        self.experiment_shadow_skipped = Counter(
            "cycleml_experiment_shadow_skipped_total",
            "Mirrored (shadow) calls not made: too many were in flight already.",
            ("experiment",),
            registry=self.registry,
        )
        self.feedback_unknown = Counter(
            "cycleml_feedback_unknown_total",
            "Feedback items (labels and outcome events) whose request id or unit "
            "matched no logged prediction or experiment assignment.",
            registry=self.registry,
        )
        # collectors of values computed elsewhere (the drift gauges), in every exposition
        self._collectors: list[Collector] = []
        # (model, version, endpoint, status) -> the children request_done updates
        self._children: dict[tuple[str, str, str, int], tuple] = {}
        # (model, version) -> the length of the queue cycleml_queue_depth reports
        self._queues: dict[tuple[str, str], Callable[[], int]] = {}
        # model name -> its loaded versions (instances of ServedModel not yet stopped);
        # loads and stops come from several threads (the watch, loads on request, the
        # threads that retire old versions) and update it under the lock; request_done
        # only tests membership, which needs none
        self._served: dict[str, int] = {}
        self._served_lock = threading.Lock()

    def model_loaded(self, name: str) -> None:
        """A version of ``name`` is loaded: its requests are counted under its name."""
        with self._served_lock:
            self._served[name] = self._served.get(name, 0) + 1

    def model_stopped(self, name: str) -> None:
        with self._served_lock:
            left = self._served.get(name, 0) - 1
            if left > 0:
                self._served[name] = left
            else:
                self._served.pop(name, None)

    def queue_depth_writer(self, labels: tuple[str, str]) -> Callable[[int], None] | None:
        """What a queue calls with its depth on every change: only with several server
        processes, whose values live in files; otherwise the depth is read when scraped
        (:meth:`watch_queue`)."""
        return self.queue_depth.labels(*labels).set if self.multiprocess else None

    def watch_queue(self, labels: tuple[str, str], length: Callable[[], int]) -> None:
        """Report ``length()`` as the queue depth of ``labels`` when scraped. The latest
        model registered with a label set wins: a reload of the same version registers
        its new queue before the old model stops."""
        if self.multiprocess:
            return
        self._queues[labels] = length
        self.queue_depth.labels(*labels).set_function(lambda: self._queues.get(labels, _zero)())

    def unwatch_queue(self, labels: tuple[str, str], length: Callable[[], int]) -> None:
        """Stop reporting ``length`` (a stopped model), unless another took its place."""
        if self.multiprocess:
            self.queue_depth.labels(*labels).set(0)
        elif self._queues.get(labels) == length:
            del self._queues[labels]

    def request_done(
        self,
        model: str,
        version: str,
        endpoint: str,
        status: int,
        latency_s: float,
        queue_ms: float | None,
        rejection: str | None,
    ) -> None:
        """Count one inference request. The labelled children are looked up once per label
        set and kept: ``labels()`` costs more than the update itself, and this runs for
        every request. A request that reached no served model (no version) for a name
        the server does not serve counts under ``UNKNOWN_MODEL``."""
        if not version and model not in self._served:
            model = UNKNOWN_MODEL
        key = (model, version, endpoint, status)
        children = self._children.get(key)
        if children is None:
            ok = status == 200
            children = (
                self.requests.labels(model, version, endpoint, str(status)),
                self.latency.labels(model, version) if ok else None,
                self.queue_time.labels(model, version) if ok else None,
                self.rejected.labels(model, version, rejection) if rejection else None,
            )
            self._children[key] = children
        requests, latency, queue_time, rejected = children
        requests.inc()
        if latency is not None:
            latency.observe(latency_s)
            if queue_ms is not None:
                queue_time.observe(queue_ms / 1000.0)
        elif rejected is not None:
            rejected.inc()

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)
        self._collectors.append(collector)

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition format of all metrics (summed over processes if several)."""
        if self.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            for collector in self._collectors:
                registry.register(collector)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
