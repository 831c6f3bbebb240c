"""A pipeline run's folder and its ``state.json``: what each stage read, did and wrote.

Every stage records a *key*: the hash of its resolved config and of its inputs'
fingerprints (content hashes of files and folders, dataset fingerprints, the versions
of the models it compares). A stage whose key equals the key of a finished stage, in
this run or an earlier one, with its outputs still on disk, is not run again: its
outputs are taken over (as ``dvc repro`` does).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"
RUNS_DIR = "runs"
# in a stage's own folder: the stage and the key of what it was started for
STAGE_MARK = ".stage.json"

# stage statuses
PENDING = "pending"
RUNNING = "running"
DONE = "done"
REUSED = "reused"
FAILED = "failed"
# run statuses beyond the stage ones
PROMOTED = "promoted"
REJECTED = "rejected"
AWAITING_PROMOTION = "awaiting_promotion"
INTERRUPTED = "interrupted"
STOPPED = "stopped"  # stop_after=<stage>: continued by the next launch
# a run that ended in one of these is not continued by the next launch
FINAL = (PROMOTED, REJECTED, AWAITING_PROMOTION)


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def config_hash(config: Any) -> str:
    """SHA-256 (16 hex digits) of a resolved config: plain containers, keys sorted."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def path_fingerprint(path: str | Path) -> str:
    """Content hash of a file, or of a folder's files (relative names and bytes).

    Hidden files and folders (``.lock``, ``.hydra``) are left out. A missing path has
    the fingerprint ``missing``, so that its appearance changes the key.
    """
    path = Path(path)
    if not path.exists():
        return "missing"
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(_visible_files(path))
    for file in files:
        relative = file.name if path.is_file() else file.relative_to(path).as_posix()
        digest.update(relative.encode("utf-8") + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _visible_files(folder: Path) -> Iterable[Path]:
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if not name.startswith("."):
                yield Path(root) / name


@dataclass
class StageRecord:
    """One stage of a run as ``state.json`` keeps it."""

    status: str = PENDING
    key: str | None = None
    config_hash: str | None = None
    inputs: dict[str, str] = field(default_factory=dict)  # name -> fingerprint
    outputs: dict[str, Any] = field(default_factory=dict)  # name -> path or value
    started_at: str | None = None
    finished_at: str | None = None
    seconds: float | None = None
    message: str = ""
    error: str | None = None  # the exception type and message of a failed stage
    reused_from: str | None = None  # the run whose outputs a reused stage took over


@dataclass
class RunState:
    """``state.json``: the run, its status and its stages in order."""

    run_dir: Path
    name: str
    status: str = RUNNING
    created_at: str = field(default_factory=utc_now)
    updated_at: str = field(default_factory=utc_now)
    launches: list[dict[str, Any]] = field(default_factory=list)
    stages: dict[str, StageRecord] = field(default_factory=dict)
    failed_stage: str | None = None
    reason: str = ""
    config_hash: str | None = None

    @property
    def run_id(self) -> str:
        return self.run_dir.name

    def stage(self, name: str) -> StageRecord:
        return self.stages.setdefault(name, StageRecord())

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run_id,
            "run_dir": str(self.run_dir),
            "name": self.name,
            "status": self.status,
            "failed_stage": self.failed_stage,
            "reason": self.reason,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "config_hash": self.config_hash,
            "launches": self.launches,
            "stages": {name: asdict(record) for name, record in self.stages.items()},
        }

    def save(self) -> Path:
        """Write ``state.json`` atomically (a crash leaves the previous one)."""
        self.updated_at = utc_now()
        path = self.run_dir / STATE_FILE
        self.run_dir.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=".state-", dir=self.run_dir)
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(self.to_dict(), out, indent=2, default=str)
            out.write("\n")
        os.replace(temp, path)
        return path

    @classmethod
    def load(cls, run_dir: Path) -> RunState:
        data = json.loads((run_dir / STATE_FILE).read_text(encoding="utf-8"))
        stages = {
            name: StageRecord(**{k: v for k, v in record.items() if k in _STAGE_FIELDS})
            for name, record in (data.get("stages") or {}).items()
        }
        return cls(
            run_dir=run_dir,
            name=data["name"],
            status=data.get("status", RUNNING),
            created_at=data.get("created_at", utc_now()),
            updated_at=data.get("updated_at", utc_now()),
            launches=list(data.get("launches") or []),
            stages=stages,
            failed_stage=data.get("failed_stage"),
            reason=data.get("reason", ""),
            config_hash=data.get("config_hash"),
        )


_STAGE_FIELDS = set(StageRecord.__dataclass_fields__)
# output keys (besides ``*_dir``) naming files that a reused stage must still have
OUTPUT_PATHS = ("path", "checkpoint")


def stage_key(config: Any, inputs: Mapping[str, str]) -> tuple[str, str]:
    """``(key, config hash)`` of a stage from its resolved config and input fingerprints."""
    chash = config_hash(config)
    return config_hash({"config": chash, "inputs": dict(inputs)}), chash


def mark_stage_dir(folder: Path, stage: str, key: str) -> Path:
    """Write ``<folder>/.stage.json``: which stage, of which key, writes into ``folder``.

    Written before the stage writes anything there, so that a later launch can tell
    whether the folder's content is of its own key even when ``state.json`` did not
    record the stage's end (the process was killed in between)."""
    from cycleml.files import write_atomic

    folder.mkdir(parents=True, exist_ok=True)
    return write_atomic(folder / STAGE_MARK, json.dumps({"stage": stage, "key": key}) + "\n")


def stage_dir_key(folder: Path, stage: str) -> str | None:
    """The key ``folder`` was marked with for ``stage``; None when it has no readable mark
    (a folder written before marks existed, or a mark of another stage)."""
    try:
        mark = json.loads((folder / STAGE_MARK).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: nested too deep
        return None
    if not isinstance(mark, dict) or mark.get("stage") != stage:
        return None
    key = mark.get("key")
    return key if isinstance(key, str) else None


def list_runs(model_dir: Path) -> list[Path]:
    """The run folders of a model's pipeline, oldest first (names sort by time)."""
    runs = model_dir / RUNS_DIR
    if not runs.is_dir():
        return []
    return sorted(p for p in runs.iterdir() if (p / STATE_FILE).is_file())


def unfinished_run(model_dir: Path) -> RunState | None:
    """The newest run that failed or was interrupted (or still says running: its
    process died, since the lock is free), to be continued; None when the newest
    run ended (promoted, rejected, awaiting a decision) or there is none."""
    runs = list_runs(model_dir)
    if not runs:
        return None
    state = RunState.load(runs[-1])
    return None if state.status in FINAL else state


def new_run_dir(model_dir: Path) -> Path:
    """``<model_dir>/runs/<UTC time>``, made unique."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d_%H-%M-%S")
    base = model_dir / RUNS_DIR / stamp
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{stamp}_{n}")
    candidate.mkdir(parents=True)
    return candidate


def find_reusable(
    model_dir: Path, current: RunState, stage: str, key: str
) -> tuple[RunState, StageRecord] | None:
    """A finished record of ``stage`` with ``key`` whose output paths all exist: this
    run's own first, then earlier runs, newest first."""
    candidates = [current.run_dir] + [p for p in reversed(list_runs(model_dir))
                                      if p != current.run_dir]  # fmt: skip
    for run_dir in candidates:
        state = current if run_dir == current.run_dir else RunState.load(run_dir)
        record = state.stages.get(stage)
        if record is None or record.key != key or record.status not in (DONE, REUSED):
            continue
        paths = [
            Path(v) for k, v in record.outputs.items() if k in OUTPUT_PATHS or k.endswith("_dir")
        ]
        if all(p.exists() for p in paths):
            return state, record
    return None
