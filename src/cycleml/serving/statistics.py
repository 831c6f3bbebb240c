"""Per model version inference statistics in the shape of Triton's statistics extension
(``GET /v2/models[/{m}[/versions/{v}]]/stats``), so that tritonclient's
``get_inference_statistics`` and tools built on it work as they are.

Request counts and durations are recorded on the event loop; batch counts on the
batching threads, under a lock (one update per batch, not per request).
"""

from __future__ import annotations

import threading
import time
from typing import Any


def _duration(count: int, seconds: float) -> dict[str, int]:
    return {"count": count, "ns": int(seconds * 1e9)}


class ModelStatistics:
    """What one model version has done since it was loaded."""

    def __init__(self) -> None:
        self.success_count = 0
        self.success_s = 0.0
        self.fail_count = 0
        self.fail_s = 0.0
        self.queue_s = 0.0
        self.compute_s = 0.0
        self._lock = threading.Lock()
        self.inference_count = 0  # rows run
        self.execution_count = 0  # batches run
        self.last_inference_ms = 0
        # batch size -> [batches, seconds in the runtime]
        self._batches: dict[int, list[float]] = {}

    def request_succeeded(self, duration_s: float, queue_s: float, compute_s: float) -> None:
        self.success_count += 1
        self.success_s += duration_s
        self.queue_s += queue_s
        self.compute_s += compute_s

    def request_failed(self, duration_s: float) -> None:
        self.fail_count += 1
        self.fail_s += duration_s

    def batch_ran(self, rows: int, seconds: float) -> None:
        with self._lock:
            self.inference_count += rows
            self.execution_count += 1
            self.last_inference_ms = int(time.time() * 1000)
            entry = self._batches.get(rows)
            if entry is None:
                self._batches[rows] = [1, seconds]
            else:
                entry[0] += 1
                entry[1] += seconds

    def to_triton(self, name: str, version: str) -> dict[str, Any]:
        """One entry of ``model_stats``, as Triton's statistics extension writes it. The
        server decodes inputs before queueing and encodes outputs after the batch, so
        ``compute_input`` and ``compute_output`` are empty; there is no response cache."""
        none = _duration(0, 0.0)
        with self._lock:
            batches = sorted((size, entry[0], entry[1]) for size, entry in self._batches.items())
            inference_count, execution_count = self.inference_count, self.execution_count
            last = self.last_inference_ms
        ok = self.success_count
        return {
            "name": name,
            "version": version,
            "last_inference": last,
            "inference_count": inference_count,
            "execution_count": execution_count,
            "inference_stats": {
                "success": _duration(ok, self.success_s),
                "fail": _duration(self.fail_count, self.fail_s),
                "queue": _duration(ok, self.queue_s),
                "compute_input": _duration(ok, 0.0),
                "compute_infer": _duration(ok, self.compute_s),
                "compute_output": _duration(ok, 0.0),
                "cache_hit": none,
                "cache_miss": none,
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": _duration(count, 0.0),
                    "compute_infer": _duration(count, seconds),
                    "compute_output": _duration(count, 0.0),
                }
                for size, count, seconds in batches
            ],
        }
