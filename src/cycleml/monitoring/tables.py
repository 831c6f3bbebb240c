"""The prediction log's table on the shared :data:`cycleml.db.metadata`, and the check
that a label or request id sent from outside can be stored in it."""

from __future__ import annotations

import re

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
)

from cycleml.db import metadata

# one row per logged prediction; the label and its time arrive later (or never)
predictions = Table(
    "monitoring_predictions",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    # unique: labels are attached by request id, and a retried write adds nothing
    Column("request_id", String(255), nullable=False, unique=True),
    Column("logged_at", DateTime(timezone=True), nullable=False),
    Column("model", String(128), nullable=False),
    Column("version", String(64), nullable=False),
    Column("predicted_class", Integer, nullable=False),
    Column("predicted_label", String(255), nullable=False),
    # float32 little-endian bytes: (num_classes,) and (embedding dim,)
    Column("probabilities", LargeBinary, nullable=False),
    Column("embedding", LargeBinary, nullable=True),
    # {"brightness": 0.41, "contrast": 0.2, "confidence": 0.98} (reference feature names)
    Column("features", JSON, nullable=False),
    Column("label", String(255), nullable=True),
    Column("labeled_at", DateTime(timezone=True), nullable=True),
    Index("monitoring_predictions_window", "model", "version", "logged_at"),
)

# control characters: never part of an id or a class name, and PostgreSQL refuses NUL
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def text_problem(field: str, value: str, limit: int | None = None) -> str | None:
    """Why ``value`` cannot be stored as ``field`` as given, or None: longer than
    ``limit`` (default: the column of that name in :data:`predictions`), or holding a
    control character. Labels and ids that arrive from outside are checked with it, so
    that a database never refuses them (and they are never cut or changed silently)."""
    if limit is None:
        limit = predictions.c[field].type.length
    if limit is not None and len(value) > limit:
        return f"{field} is {len(value)} characters long; at most {limit}"
    control = _CONTROL.search(value)
    if control:
        return (
            f"{field} holds the control character U+{ord(control.group()):04X} at position "
            f"{control.start()}; send printable text"
        )
    return None
