"""Where batch predictions go: one row per input, or one error row with the reason.

Both tables are unique on ``(model_name, model_version, precision, input_key)``: a
rerun after an interruption skips keys already predicted by that bundle version and
variant (``fp32``, ``int8``, ``fp16``), and no key is ever written twice; a run with
another variant predicts every input again, next to the first. After a completed run every input key of a shard is in exactly
one of the two tables (a failure that succeeds on a rerun leaves the errors table),
except a key that the input holds more than once: one copy is predicted, and the
error of each other copy (a duplicate, or why it failed) is kept as well.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Engine,
    Float,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    delete,
    select,
)
from sqlalchemy.engine import Connection

from cycleml.batch.keys import MAX_KEY_CHARS, storable_text
from cycleml.db import chunked, insert_new_rows, metadata, missing_columns, utc_now
from cycleml.errors import ConfigError

log = logging.getLogger(__name__)

_KEY_QUERY_SIZE = 500
DUPLICATE_REASON = (
    "duplicate input key: another input with this key is already predicted by this model version"
)
_REASON_CHARS = 2000

predictions = Table(
    "batch_predictions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model_name", String(200), nullable=False),
    Column("model_version", String(100), nullable=False),
    # the bundle variant that predicted: fp32, int8 or fp16
    Column("precision", String(16), nullable=False),
    Column("input_key", String(MAX_KEY_CHARS), nullable=False),
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
    UniqueConstraint(
        "model_name", "model_version", "precision", "input_key", name="uq_batch_predictions_key"
    ),
)

prediction_errors = Table(
    "batch_prediction_errors",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model_name", String(200), nullable=False),
    Column("model_version", String(100), nullable=False),
    Column("precision", String(16), nullable=False),
    Column("input_key", String(MAX_KEY_CHARS), nullable=False),
    # the exact key as bytes, when input_key is an escaped form of it (cycleml.batch.keys)
    Column("original_key", LargeBinary),
    Column("reason", Text, nullable=False),
    Column("job_id", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint(
        "model_name", "model_version", "precision", "input_key", name="uq_batch_errors_key"
    ),
)

TABLES = (predictions, prediction_errors)


def check_table_layout(engine: Engine) -> None:
    """Refuse tables made before the columns this version writes (the tables are
    left as they are: a prediction table is the user's data, not migrated behind
    their back)."""
    for table, missing in missing_columns(engine, TABLES).items():
        raise ConfigError(
            f"table {table} in this database was made by an older cycleml: it lacks "
            f"the column(s) {', '.join(missing)} (precision became part of a prediction's "
            f"key); rename the old table (ALTER TABLE {table} RENAME TO "
            f"{table}_old) or predict into another database"
        )


class Failure(NamedTuple):
    """An input that gets an error row: its (stored) key, why, and its exact key when
    the stored one is escaped."""

    key: str
    reason: str
    original_key: bytes | None = None


@dataclass(frozen=True)
class WriteResult:
    written: int
    failed: int


class PredictionStore:
    """The batch tables, scoped to one bundle variant (``model_name``,
    ``model_version``, ``precision``) and one ``cycleml predict`` invocation
    (``job_id``)."""

    def __init__(
        self,
        engine: Engine,
        model_name: str,
        model_version: str,
        run_id: str | None,
        job_id: str,
        class_names: Sequence[str],
        precision: str = "fp32",
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.model_version = model_version
        self.precision = precision
        self.run_id = run_id
        self.job_id = job_id
        self.class_names = list(class_names)

    def _scope(self, table: Table) -> list:
        return [
            table.c.model_name == self.model_name,
            table.c.model_version == self.model_version,
            table.c.precision == self.precision,
        ]

    def predicted_keys(self, keys: Sequence[str]) -> dict[str, str]:
        """Those of ``keys`` that already have a prediction from this bundle variant,
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
        failures: Sequence[Failure],
    ) -> WriteResult:
        """Write one batch in one transaction: a prediction per key (``top_ids`` and
        ``top_probs``: ``(N, k)`` classes and probabilities, best first), then the
        ``failures``.

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
                "precision": self.precision,
                "run_id": self.run_id,
                "job_id": self.job_id,
                "created_at": now,
            }
            for key, ids, probs in zip(keys, top_ids.tolist(), top_probs.tolist(), strict=True):
                if key in present:
                    failures.append(Failure(key, DUPLICATE_REASON))
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
            cleared = [row["input_key"] for row in rows] + [f.key for f in failures]
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
                [self._error(failure, now) for failure in failures],
            )
        return WriteResult(written=len(rows), failed=len(failures))

    def _error(self, failure: Failure, now: dt.datetime) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "model_version": self.model_version,
            "precision": self.precision,
            "input_key": failure.key,
            "original_key": failure.original_key,
            # a reason may quote a path that is not UTF-8
            "reason": storable_text(failure.reason[:_REASON_CHARS]),
            "job_id": self.job_id,
            "created_at": now,
        }
