"""One pipeline per model at a time: an exclusive ``fcntl`` lock on a file in the
model's pipeline folder. The kernel releases it when the holder exits, however it
exits, so a killed pipeline never leaves a stale lock behind."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from cycleml.errors import CycleMLError
from cycleml.pipeline.state import utc_now

LOCK_FILE = ".lock"


class PipelineBusy(CycleMLError):
    """Another pipeline on the same model holds the lock."""


class PipelineLock:
    """``with PipelineLock(model_dir, name, run=...)``: hold the model's pipeline lock.

    The lock file records the holder (pid, run, start time) so that a refused launch
    names it.
    """

    def __init__(self, model_dir: Path, name: str) -> None:
        self.path = Path(model_dir) / LOCK_FILE
        self.name = name
        self._handle: IO[str] | None = None

    def acquire(self, run: str = "") -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(handle)
            handle.close()
            who = ", ".join(f"{k} {v}" for k, v in holder.items() if v) or "holder unknown"
            raise PipelineBusy(
                f"a pipeline for model '{self.name}' is already running ({who}; lock "
                f"{self.path}): wait for it to finish, or stop that process"
            ) from None
        handle.seek(0)
        handle.truncate()
        json.dump({"pid": os.getpid(), "run": run, "since": utc_now()}, handle)
        handle.flush()
        self._handle = handle

    def set_run(self, run: str) -> None:
        """Name the run in the lock file once it is known."""
        if self._handle is not None:
            self._handle.seek(0)
            self._handle.truncate()
            json.dump({"pid": os.getpid(), "run": run, "since": utc_now()}, self._handle)
            self._handle.flush()

    @staticmethod
    def _holder(handle: IO[str]) -> dict[str, Any]:
        try:
            handle.seek(0)
            data = json.loads(handle.read() or "{}")
        except (OSError, ValueError):
            return {}
        return {k: data.get(k) for k in ("pid", "run", "since")}

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> PipelineLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
