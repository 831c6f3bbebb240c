"""The prediction log's table on the shared :data:`cycleml.db.metadata`."""

from __future__ import annotations

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
