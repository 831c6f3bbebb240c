"""When is it worth waiting for a fuller batch?

The batcher runs whatever is waiting as soon as an instance is free. It waits longer
only when this policy says so, from two measurements:

* the arrival rate ``r`` (rows per second), and
* the batch latency, fitted online as ``L(b) = a + c * b``: ``a`` is the fixed cost of a
  run (dispatch, kernel launches, thread wake-ups), ``c`` the cost of one more row.

Take ``n`` rows now, or wait ``w`` for ``k = r * w`` more and run ``n + k`` together.
Running now, the ``k`` late rows form a second batch after the first, so the summed
completion time of all rows is ``(n+k)(a + c n) + k (a + c k)``; waiting, it is
``(n+k)(w + a + c (n+k))``. Waiting wins by ``w (r a - n - n c r) - r w^2``, which is
largest at ``w* = (a - n c - n / r) / 2``. At low load ``n / r`` is large and ``w*`` is
negative: run at once, no added latency. The wait pays only when the fixed cost ``a``
is large next to the time the batch takes to grow, and never exceeds the configured
``max_queue_delay_ms`` or the time needed to fill the batch.
"""

from __future__ import annotations

import threading
import time


class ArrivalRate:
    """Rows per second, as an exponentially weighted mean of the gaps between arrivals."""

    def __init__(self, smoothing: float = 0.05) -> None:
        self._smoothing = smoothing
        self._mean_gap_s: float | None = None
        self._last: float | None = None
        self._lock = threading.Lock()

    def record(self, rows: int, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        with self._lock:
            if self._last is not None:
                gap = max(now - self._last, 0.0) / max(rows, 1)
                if self._mean_gap_s is None:
                    self._mean_gap_s = gap
                else:
                    self._mean_gap_s += self._smoothing * (gap - self._mean_gap_s)
            self._last = now

    def rows_per_s(self, now: float | None = None) -> float:
        """The current rate; a silence longer than the mean gap lowers it at once."""
        now = time.perf_counter() if now is None else now
        with self._lock:
            if self._mean_gap_s is None or self._last is None:
                return 0.0
            gap = max(self._mean_gap_s, now - self._last, 1e-9)
        return 1.0 / gap


class BatchLatencyModel:
    """``L(b) = a + c * b`` by exponentially weighted least squares over recent batches."""

    def __init__(self, forgetting: float = 0.98) -> None:
        self._forgetting = forgetting
        self._sums = [0.0] * 5  # weight, sum b, sum b^2, sum L, sum b*L
        self._lock = threading.Lock()

    def record(self, rows: int, latency_s: float) -> None:
        f = self._forgetting
        with self._lock:
            w, sb, sbb, sl, sbl = self._sums
            self._sums = [
                f * w + 1.0,
                f * sb + rows,
                f * sbb + rows * rows,
                f * sl + latency_s,
                f * sbl + rows * latency_s,
            ]

    def coefficients(self) -> tuple[float, float] | None:
        """``(a, c)`` in seconds, or None until batches of at least two sizes were seen."""
        with self._lock:
            w, sb, sbb, sl, sbl = self._sums
        if w <= 0:
            return None
        spread = w * sbb - sb * sb
        if spread <= 1e-9 * max(w * sbb, 1.0):
            return None
        c = (w * sbl - sb * sl) / spread
        a = (sl - c * sb) / w
        return max(a, 0.0), max(c, 0.0)

    def predict(self, rows: int) -> float | None:
        coefficients = self.coefficients()
        if coefficients is None:
            return None
        a, c = coefficients
        return a + c * rows


def extra_wait_s(
    rows: int,
    max_rows: int,
    rate_rows_per_s: float,
    latency: tuple[float, float] | None,
    max_delay_s: float,
) -> float:
    """Seconds to wait for more rows before running ``rows`` (0: run now)."""
    if rows >= max_rows or max_delay_s <= 0 or rate_rows_per_s <= 0 or latency is None:
        return 0.0
    a, c = latency
    best = (a - rows * c - rows / rate_rows_per_s) / 2.0
    if best <= 0:
        return 0.0
    time_to_fill = (max_rows - rows) / rate_rows_per_s
    return min(best, time_to_fill, max_delay_s)
