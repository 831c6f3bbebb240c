"""Where batch predictions go: one row per input, or one error row with the reason.

Both tables are unique on ``(model_name, model_version, input_key)``: a rerun after
an interruption skips keys already predicted by that bundle version, and no key is
ever written twice. After a completed run every input key of a shard is in exactly
one of the two tables (a failure that succeeds on a rerun leaves the errors table),
except a key that the input holds more than once: one copy is predicted, and the
error of each other copy (a duplicate, or why it failed) is kept as well.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Engine,
    Float,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    delete,
    select,
)
from sqlalchemy.engine import Connection

from cycleml.db import chunked, insert_new_rows, metadata, utc_now

log = logging.getLogger(__name__)

_KEY_QUERY_SIZE = 500
DUPLICATE_REASON = (
    "duplicate input key: another input with this key is already predicted by this model version"
)

predictions = Table(
    "batch_predictions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model_name", String(200), nullable=False),
    Column("model_version", String(100), nullable=False),
    Column("input_key", String(1024), nullable=False),
    Column("label", String(200), nullable=False),
    Column("label_id", Integer, nullable=False),
    Column("confidence", Float, nullable=False),
    # [[label, probability], ...] best first
    Column("top_k", JSON, nullable=False),
    # the training run the model came from
    Column("run_id", String(100)),
    # the `cycleml predict` invocation that wrote the row
    Column("job_id", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("model_name", "model_version", "input_key", name="uq_batch_predictions_key"),
)

prediction_errors = Table(
    "batch_prediction_errors",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model_name", String(200), nullable=False),
    Column("model_version", String(100), nullable=False),
    Column("input_key", String(1024), nullable=False),
    Column("reason", Text, nullable=False),
    Column("job_id", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("model_name", "model_version", "input_key", name="uq_batch_errors_key"),
)

TABLES = (predictions, prediction_errors)


@dataclass(frozen=True)
class WriteResult:
    written: int
    failed: int


class PredictionStore:
    """The batch tables, scoped to one bundle (``model_name``, ``model_version``) and
    one ``cycleml predict`` invocation (``job_id``)."""

    def __init__(
        self,
        engine: Engine,
        model_name: str,
        model_version: str,
        run_id: str | None,
        job_id: str,
        class_names: Sequence[str],
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.model_version = model_version
        self.run_id = run_id
        self.job_id = job_id
        self.class_names = list(class_names)

    def _scope(self, table: Table) -> list:
        return [table.c.model_name == self.model_name, table.c.model_version == self.model_version]

    def predicted_keys(self, keys: Sequence[str]) -> dict[str, str]:
        """Those of ``keys`` that already have a prediction from this bundle version,
        with the job that wrote it."""
        with self.engine.connect() as conn:
            return self._predicted(conn, keys)

    def _predicted(self, conn: Connection, keys: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for part in chunked(list(keys), _KEY_QUERY_SIZE):
            query = select(predictions.c.input_key, predictions.c.job_id).where(
                and_(*self._scope(predictions), predictions.c.input_key.in_(part))
            )
            found.update(conn.execute(query).all())
        return found

    def write(
        self,
        keys: Sequence[str],
        top_ids: np.ndarray,
        top_probs: np.ndarray,
        failures: Sequence[tuple[str, str]],
    ) -> WriteResult:
        """Write one batch in one transaction: a prediction per key (``top_ids`` and
        ``top_probs``: ``(N, k)`` classes and probabilities, best first), then the
        ``failures`` as ``(key, reason)``.

        A prediction whose key is already stored (the same key twice in the input)
        is not written again; it is recorded as an error instead, so nothing is
        dropped silently. Keys that succeed or fail replace any error row of an
        earlier run.
        """
        now = utc_now()
        failures = list(failures)
        with self.engine.begin() as conn:
            present = set(self._predicted(conn, keys))
            rows: list[dict[str, Any]] = []
            names = self.class_names
            shared = {
                "model_name": self.model_name,
                "model_version": self.model_version,
                "run_id": self.run_id,
                "job_id": self.job_id,
                "created_at": now,
            }
            for key, ids, probs in zip(keys, top_ids.tolist(), top_probs.tolist(), strict=True):
                if key in present:
                    failures.append((key, DUPLICATE_REASON))
                    continue
                present.add(key)
                rows.append({
                    **shared,
                    "input_key": key,
                    "label": names[ids[0]],
                    "label_id": ids[0],
                    "confidence": probs[0],
                    "top_k": [[names[i], p] for i, p in zip(ids, probs, strict=True)],
                })  # fmt: skip
            inserted = insert_new_rows(conn, predictions, rows)
            if 0 <= inserted < len(rows):
                log.warning(
                    "%d of %d predictions were already stored by a concurrent run of %s %s",
                    len(rows) - inserted, len(rows), self.model_name, self.model_version,
                )  # fmt: skip
            # what earlier runs recorded about these keys gives way to this run's outcome;
            # an error of this run stays (another copy of a duplicated key failed)
            cleared = [row["input_key"] for row in rows] + [key for key, _ in failures]
            for part in chunked(cleared, _KEY_QUERY_SIZE):
                conn.execute(
                    delete(prediction_errors).where(
                        and_(
                            *self._scope(prediction_errors),
                            prediction_errors.c.job_id != self.job_id,
                            prediction_errors.c.input_key.in_(part),
                        )
                    )
                )
            insert_new_rows(
                conn,
                prediction_errors,
                [self._error(key, reason, now) for key, reason in failures],
            )
        return WriteResult(written=len(rows), failed=len(failures))

    def _error(self, key: str, reason: str, now: dt.datetime) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "model_version": self.model_version,
            "input_key": key,
            "reason": reason[:2000],
            "job_id": self.job_id,
            "created_at": now,
        }
