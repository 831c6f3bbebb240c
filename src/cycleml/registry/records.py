"""What the registry stores about a model version and about each alias move."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

READY = "ready"
ARCHIVED = "archived"


@dataclass(frozen=True)
class ModelVersion:
    """One registered version: its folder ``<root>/<name>/<version>``, the hashes of
    its files, who registered it and when, and where it came from (``lineage``)."""

    name: str
    version: int
    path: Path
    status: str
    content_hash: str
    files: dict[str, str]
    created_at: dt.datetime
    created_by: str
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    size_bytes: int = 0
    archived_at: dt.datetime | None = None
    archive_reason: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "path": str(self.path),
            "status": self.status,
            "content_hash": self.content_hash,
            "files": dict(self.files),
            "size_bytes": self.size_bytes,
            "created_at": self.created_at.isoformat(),
            "created_by": self.created_by,
            "description": self.description,
            "tags": dict(self.tags),
            "lineage": self.lineage,
            "archived_at": self.archived_at.isoformat() if self.archived_at else None,
            "archive_reason": self.archive_reason,
        }


@dataclass(frozen=True)
class AliasMove:
    """One row of the audit trail: ``alias`` of ``model`` went from ``from_version``
    (None: it did not exist) to ``to_version`` (None: deleted)."""

    model: str
    alias: str
    from_version: int | None
    to_version: int | None
    who: str
    at: dt.datetime
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "alias": self.alias,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "who": self.who,
            "at": self.at.isoformat(),
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Evaluation:
    """One gate decision stored on a version: whether it passed, every failed rule
    (``reasons``), the champion it was measured against and the whole decision
    (rules, table of figures) as the gate wrote it."""

    model: str
    version: int
    passed: bool
    reasons: list[str]
    champion: str | None
    decision: dict[str, Any]
    who: str
    at: dt.datetime
    id: int = 0

    @property
    def ref(self) -> str:
        return f"{self.model}/{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "passed": self.passed,
            "reasons": list(self.reasons),
            "champion": self.champion,
            "decision": self.decision,
            "who": self.who,
            "at": self.at.isoformat(),
        }
