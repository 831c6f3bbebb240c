"""Where batch predictions go: one row per input, or one error row with the reason.

Both tables are unique on ``(model_name, model_version, input_key)``: a rerun after
an interruption skips keys already predicted by that bundle version, and no key is
ever written twice. After a completed run every input key of a shard is in exactly
one of the two tables (a failure that succeeds on a rerun leaves the errors table).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass

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
    func,
    select,
)
from sqlalchemy.engine import Connection

from cycleml.db import chunked, insert_new_rows, metadata, utc_now

log = logging.getLogger(__name__)

_KEY_QUERY_SIZE = 500
DUPLICATE_REASON = "duplicate input key: already predicted by this model version"

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
class PredictionRow:
    key: str
    label: str
    label_id: int
    confidence: float
    top_k: list[tuple[str, float]]


@dataclass(frozen=True)
class WriteResult:
    written: int
    failed: int
    duplicates: list[str]


class PredictionStore:
    """The batch tables, scoped to one bundle (``model_name``, ``model_version``)."""

    def __init__(
        self, engine: Engine, model_name: str, model_version: str, run_id: str | None, job_id: str
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.model_version = model_version
        self.run_id = run_id
        self.job_id = job_id

    def _scope(self, table: Table) -> list:
        return [table.c.model_name == self.model_name, table.c.model_version == self.model_version]

    def predicted_keys(self, keys: Sequence[str]) -> set[str]:
        """Those of ``keys`` that already have a prediction from this bundle version."""
        with self.engine.connect() as conn:
            return self._predicted(conn, keys)

    def _predicted(self, conn: Connection, keys: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for part in chunked(list(keys), _KEY_QUERY_SIZE):
            query = select(predictions.c.input_key).where(
                and_(*self._scope(predictions), predictions.c.input_key.in_(part))
            )
            found.update(conn.execute(query).scalars())
        return found

    def write(
        self, rows: Sequence[PredictionRow], failures: Sequence[tuple[str, str]]
    ) -> WriteResult:
        """Write one batch in one transaction: predictions, then errors.

        A prediction whose key is already stored (the same key twice in the input)
        is not written again; it is recorded as an error instead, so nothing is
        dropped silently. Keys that succeed clear any error row of an earlier run.
        """
        now = utc_now()
        failures = list(failures)
        with self.engine.begin() as conn:
            present = self._predicted(conn, [row.key for row in rows])
            fresh: list[PredictionRow] = []
            duplicates: list[str] = []
            for row in rows:
                if row.key in present:
                    duplicates.append(row.key)
                else:
                    present.add(row.key)
                    fresh.append(row)
            failures += [(key, DUPLICATE_REASON) for key in duplicates]
            inserted = insert_new_rows(
                conn, predictions, [self._prediction(row, now) for row in fresh]
            )
            if 0 <= inserted < len(fresh):
                log.warning(
                    "%d of %d predictions were already stored by a concurrent run of %s %s",
                    len(fresh) - inserted, len(fresh), self.model_name, self.model_version,
                )  # fmt: skip
            cleared = [row.key for row in fresh] + [key for key, _ in failures]
            for part in chunked(cleared, _KEY_QUERY_SIZE):
                conn.execute(
                    delete(prediction_errors).where(
                        and_(
                            *self._scope(prediction_errors),
                            prediction_errors.c.input_key.in_(part),
                        )
                    )
                )
            insert_new_rows(
                conn,
                prediction_errors,
                [self._error(key, reason, now) for key, reason in failures],
            )
        return WriteResult(written=len(fresh), failed=len(failures), duplicates=duplicates)

    def count(self) -> tuple[int, int]:
        """(predictions, errors) stored for this bundle version."""
        with self.engine.connect() as conn:
            done = conn.execute(
                select(func.count()).select_from(predictions).where(and_(*self._scope(predictions)))
            ).scalar_one()
            failed = conn.execute(
                select(func.count())
                .select_from(prediction_errors)
                .where(and_(*self._scope(prediction_errors)))
            ).scalar_one()
        return int(done), int(failed)

    def _prediction(self, row: PredictionRow, now: dt.datetime) -> dict:
        return {
            "model_name": self.model_name,
            "model_version": self.model_version,
            "input_key": row.key,
            "label": row.label,
            "label_id": row.label_id,
            "confidence": row.confidence,
            "top_k": [[label, prob] for label, prob in row.top_k],
            "run_id": self.run_id,
            "job_id": self.job_id,
            "created_at": now,
        }

    def _error(self, key: str, reason: str, now: dt.datetime) -> dict:
        return {
            "model_name": self.model_name,
            "model_version": self.model_version,
            "input_key": key,
            "reason": reason[:2000],
            "job_id": self.job_id,
            "created_at": now,
        }
