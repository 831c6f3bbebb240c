"""Prometheus gauges of the latest window of each served model version's prediction log.

Every ``monitoring.report_interval_s`` a background thread reads the newest
``monitoring.report_window`` logged predictions of each served version, tests them
against the bundle's reference as ``cycleml monitor`` does
(:func:`cycleml.monitoring.monitor.evaluate`) and keeps the window's
:func:`~cycleml.monitoring.monitor.gauge_values`. ``/metrics`` exposes them with the
labels model and version (``cycleml_drift_detected``, ``cycleml_drift_p_value_<feature>``,
``cycleml_estimated_accuracy``, ...). The tests run off the event loop; a version with
no logged predictions yet has no gauges.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cycleml.monitoring.drift import DriftSettings
from cycleml.monitoring.log import PredictionLog
from cycleml.monitoring.monitor import evaluate, fallback_reference, gauge_values
from cycleml.monitoring.reference import ReferenceSample, load_reference_sample
from cycleml.monitoring.windows import count_windows
from cycleml.serving.served_model import ServedModel

log = logging.getLogger(__name__)

# at most one warning per this many seconds about failing reports
WARN_EVERY_S = 60.0


class DriftGauges(Collector):
    """The latest gauge values per (model, version), as a Prometheus collector."""

    def __init__(self) -> None:
        self._values: dict[tuple[str, str], dict[str, float]] = {}
        self._lock = threading.Lock()

    def set(self, model: str, version: str, values: dict[str, float]) -> None:
        with self._lock:
            self._values[(model, version)] = dict(values)

    def keep_only(self, served: set[tuple[str, str]]) -> None:
        """Forget the gauges of versions no longer served."""
        with self._lock:
            for key in set(self._values) - served:
                del self._values[key]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            values = {key: dict(gauges) for key, gauges in self._values.items()}
        families: dict[str, GaugeMetricFamily] = {}
        for (model, version), gauges in sorted(values.items()):
            for name, value in sorted(gauges.items()):
                family = families.get(name)
                if family is None:
                    family = families[name] = GaugeMetricFamily(
                        name,
                        "Latest prediction-log window of a served model version "
                        "(see cycleml.monitoring.monitor.gauge_values).",
                        labels=("model", "version"),
                    )
                family.add_metric((model, version), value)
        yield from families.values()


class DriftReporter:
    """The thread that refreshes :class:`DriftGauges` every ``interval_s``."""

    def __init__(
        self,
        gauges: DriftGauges,
        prediction_log: Callable[[], PredictionLog],
        served_models: Callable[[], Sequence[ServedModel]],
        interval_s: float,
        window_rows: int,
        drift: DriftSettings | None = None,
    ) -> None:
        self.gauges = gauges
        self._prediction_log = prediction_log
        self._served_models = served_models
        self.interval_s = interval_s
        self.window_rows = window_rows
        self.drift = drift or DriftSettings()
        self._references: dict[tuple[str, str], ReferenceSample | None] = {}
        self._stop = threading.Event()
        self._last_warning = 0.0
        self.reports = 0
        self._thread = threading.Thread(target=self._loop, name="drift-gauges", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.refresh()
            except Exception as err:  # a failing database must not end the thread
                now = time.monotonic()
                if now - self._last_warning >= WARN_EVERY_S:
                    self._last_warning = now
                    log.warning("drift gauges not refreshed: %s", err)

    def refresh(self) -> None:
        """Test the latest window of every served version and keep its gauges."""
        prediction_log = self._prediction_log()
        served = {}
        for model in self._served_models():
            if model.ready:
                served[(model.name, model.version)] = model
        self.gauges.keep_only(set(served))
        for (name, version), model in served.items():
            rows = prediction_log.read(name, version, last=self.window_rows)
            if not len(rows):
                continue
            key = (name, version)
            if key not in self._references:
                reference = load_reference_sample(model.bundle)
                self._references[key] = reference or fallback_reference(model.bundle.meta)
            windows = count_windows(rows, self.window_rows)
            results = evaluate(windows, self._references[key], model.bundle.meta, self.drift)
            self.gauges.set(name, version, gauge_values({"windows": results}))
        self.reports += 1
