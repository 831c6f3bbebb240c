"""The prediction log: a writer of batches of records and a reader of windows.

:class:`PredictionLog` holds one SQLAlchemy engine; :meth:`PredictionLog.write`
inserts a batch in one transaction and may be called from any thread (a background
writer of a server included). Rows are keyed by request id: writing the same
record twice adds nothing, and labels are attached by request id
(:meth:`PredictionLog.attach_labels`), reporting the ids that match no prediction.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat

import numpy as np
from sqlalchemy import Engine, bindparam, func, select, update
from sqlalchemy.engine import Connection

from cycleml.db import as_utc, chunked, insert_new_rows, open_database, utc_now
from cycleml.errors import ConfigError
from cycleml.inference.reference import input_features, output_features
from cycleml.monitoring.tables import predictions

log = logging.getLogger(__name__)

_IN_CHUNK = 500
_EXAMPLES = 5


@dataclass(frozen=True)
class PredictionRecord:
    """One prediction as the log stores it."""

    request_id: str
    model: str
    version: str
    predicted_label: str
    probabilities: np.ndarray
    features: Mapping[str, float]
    embedding: np.ndarray | None = None
    logged_at: dt.datetime | None = None  # None: the time of the write

    def to_row(self, now: dt.datetime) -> dict:
        probabilities = np.asarray(self.probabilities, dtype="<f4")
        return {
            "request_id": str(self.request_id),
            "logged_at": self.logged_at or now,
            "model": self.model,
            "version": str(self.version),
            "predicted_class": int(probabilities.argmax()),
            "predicted_label": self.predicted_label,
            "probabilities": probabilities.tobytes(),
            "embedding": None
            if self.embedding is None
            else np.asarray(self.embedding, dtype="<f4").tobytes(),
            # a non-finite value is left out (read back as NaN): PostgreSQL's JSON has no NaN
            "features": {str(k): float(v) for k, v in self.features.items() if np.isfinite(v)},
            "label": None,
        }


def records_from_batch(
    *,
    model: str,
    version: str,
    kind: str,
    class_names: Sequence[str],
    request_ids: Sequence[str],
    inputs: np.ndarray,
    probabilities: np.ndarray,
    embeddings: np.ndarray | None = None,
    pad_id: int = 0,
    logged_at: dt.datetime | None = None,
) -> list[PredictionRecord]:
    """Records for one batch in the model's input format, with the features of
    :mod:`cycleml.inference.reference` computed as the bundle's reference has them."""
    if not (len(request_ids) == len(inputs) == len(probabilities)):
        raise ValueError("request_ids, inputs and probabilities differ in length")
    features = {**input_features(kind, inputs, pad_id), **output_features(probabilities)}
    names = list(features)
    columns = np.stack([features[n] for n in names], axis=1) if names else None
    top = probabilities.argmax(axis=1)
    return [
        PredictionRecord(
            request_id=str(request_id),
            model=model,
            version=str(version),
            predicted_label=str(class_names[int(top[i])]),
            probabilities=probabilities[i],
            features=dict(zip(names, columns[i].tolist(), strict=True)) if names else {},
            embedding=None if embeddings is None else embeddings[i],
            logged_at=logged_at,
        )
        for i, request_id in enumerate(request_ids)
    ]


@dataclass(frozen=True)
class PredictionColumns:
    """A batch of predictions of one model version as columns, ready to insert: what
    a server's writer hands :meth:`PredictionLog.write_columns` (no object per row)."""

    model: str
    version: str
    request_ids: list[str]
    logged_at: list[dt.datetime]
    predicted_class: list[int]
    predicted_label: list[str]
    probabilities: bytes  # float32 little-endian, row after row
    embeddings: bytes | None  # likewise, or None when the model has no embedding
    features: list[str]  # one JSON object per row

    def __len__(self) -> int:
        return len(self.request_ids)


def columns_from_batch(
    *,
    model: str,
    version: str,
    kind: str,
    class_names: Sequence[str],
    request_ids: Sequence[str],
    inputs: np.ndarray,
    probabilities: np.ndarray,
    logged_at: Sequence[dt.datetime],
    embeddings: np.ndarray | None = None,
    pad_id: int = 0,
) -> PredictionColumns:
    """What :func:`records_from_batch` makes, as columns: the features computed on the
    whole batch at once, the arrays converted to bytes once per batch and each row's
    features written as JSON text from a template (the same text ``json.dumps`` gives)."""
    rows = len(request_ids)
    if not (rows == len(inputs) == len(probabilities) == len(logged_at)):
        raise ValueError("request_ids, inputs, probabilities and logged_at differ in length")
    features = {**input_features(kind, inputs, pad_id), **output_features(probabilities)}
    top = probabilities.argmax(axis=1).tolist() if rows else []
    labels = [str(name) for name in class_names]
    return PredictionColumns(
        model=model,
        version=str(version),
        request_ids=[str(request_id) for request_id in request_ids],
        logged_at=list(logged_at),
        predicted_class=top,
        predicted_label=[labels[i] for i in top],
        probabilities=np.ascontiguousarray(probabilities, dtype="<f4").tobytes(),
        embeddings=None
        if embeddings is None
        else np.ascontiguousarray(embeddings, dtype="<f4").tobytes(),
        features=_features_json(features, rows),
    )


def _features_json(features: Mapping[str, np.ndarray], rows: int) -> list[str]:
    """Each row's features as the JSON text ``json.dumps({name: float(value), ...})``
    gives, formatted from one template (a finite float's ``repr`` is its JSON). A
    non-finite value is left out, as :meth:`PredictionRecord.to_row` does: PostgreSQL's
    JSON has no NaN, and the reader takes a missing feature for NaN."""
    names = list(features)
    if not names:
        return ["{}"] * rows
    values = np.stack([np.asarray(features[name], np.float32) for name in names], axis=1)
    template = "{" + ", ".join(f"{json.dumps(str(name))}: %r" for name in names) + "}"
    finite = np.isfinite(values).all(axis=1).tolist()
    return [
        template % tuple(row)
        if ok
        else json.dumps({n: v for n, v in zip(names, row, strict=True) if np.isfinite(v)})
        for row, ok in zip(values.tolist(), finite, strict=True)
    ]


@dataclass(frozen=True)
class LoggedPredictions:
    """Rows of the log as arrays, oldest first."""

    request_ids: list[str]
    logged_at: list[dt.datetime]
    predicted_class: np.ndarray
    predicted_label: list[str]
    probabilities: np.ndarray
    features: dict[str, np.ndarray]
    embedding: np.ndarray | None  # None unless every row has one
    labels: list[str | None]

    def __len__(self) -> int:
        return len(self.request_ids)

    def take(self, rows: np.ndarray | slice) -> LoggedPredictions:
        index = np.arange(len(self))[rows]
        return LoggedPredictions(
            request_ids=[self.request_ids[i] for i in index],
            logged_at=[self.logged_at[i] for i in index],
            predicted_class=self.predicted_class[index],
            predicted_label=[self.predicted_label[i] for i in index],
            probabilities=self.probabilities[index],
            features={k: v[index] for k, v in self.features.items()},
            embedding=None if self.embedding is None else self.embedding[index],
            labels=[self.labels[i] for i in index],
        )


def logged_from_records(records: Sequence[PredictionRecord]) -> LoggedPredictions:
    """Records as the reader returns them, without a database (e.g. to monitor a
    batch in memory)."""
    now = utc_now()
    return _to_arrays([record.to_row(now) for record in records])


@dataclass(frozen=True)
class LabelReport:
    """What :meth:`PredictionLog.attach_labels` did."""

    received: int
    attached: int
    unknown: int
    unknown_examples: list[str] = field(default_factory=list)
    # every unknown id (an HTTP client is told all of its own)
    unknown_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "received": self.received,
            "attached": self.attached,
            "unknown": self.unknown,
            "unknown_examples": self.unknown_examples,
        }


class PredictionLog:
    """The ``monitoring_predictions`` table of one database."""

    def __init__(self, db_url: str | Engine, must_exist: bool = False) -> None:
        """``must_exist``: a missing SQLite file is a ConfigError, not created (a report,
        or labels attached to predictions already logged)."""
        if isinstance(db_url, Engine):
            self.engine = db_url
            predictions.create(self.engine, checkfirst=True)
        else:
            self.engine = open_database(
                db_url,
                [predictions],
                must_exist=must_exist,
                what="prediction log",
                created_by="`cycleml serve` or `cycleml predict` with monitoring.enabled=true",
            )

    def close(self) -> None:
        self.engine.dispose()

    # -- writing ------------------------------------------------------------------------
    def write(self, records: Sequence[PredictionRecord]) -> int:
        """Insert a batch in one transaction; returns the rows added (a request id
        already logged is skipped). Safe to call from several threads."""
        if not records:
            return 0
        now = utc_now()
        rows = [record.to_row(now) for record in records]
        with self.engine.begin() as conn:
            # drivers differ in the row count they report for a skipping insert, so the
            # ids already logged are looked up first
            present = self._logged_ids(conn, [row["request_id"] for row in rows])
            insert_new_rows(conn, predictions, rows)
        return sum(row["request_id"] not in present for row in rows)

    def write_columns(self, batches: Sequence[PredictionColumns]) -> None:
        """Insert batches of columns in one transaction, skipping request ids already
        logged, without counting the rows added (no lookup first): the server's writer
        path, a few microseconds of CPU per row. Safe to call from several threads."""
        if not any(len(batch) for batch in batches):
            return
        dialect = self.engine.dialect
        when = predictions.c.logged_at.type.dialect_impl(dialect).bind_processor(dialect)
        rows: list[tuple] = []
        for batch in batches:
            times = batch.logged_at
            if when is not None:  # SQLite's text form, made once per distinct time
                text_of = {t: when(t) for t in set(times)}
                times = [text_of[t] for t in times]
            probabilities = _split(batch.probabilities, len(batch))
            embeddings = (
                [None] * len(batch)
                if batch.embeddings is None
                else _split(batch.embeddings, len(batch))
            )
            # tuples made by zip, in C: no Python code runs per row
            rows += zip(
                batch.request_ids,
                times,
                repeat(batch.model),
                repeat(batch.version),
                batch.predicted_class,
                batch.predicted_label,
                probabilities,
                embeddings,
                batch.features,
            )
        with self.engine.begin() as conn:
            conn.exec_driver_sql(self._insert_sql(dialect.name), rows)

    @staticmethod
    def _insert_sql(dialect: str) -> str:
        """The driver-level INSERT of :meth:`write_columns`, its values in the order of
        the rows it builds; a request id already logged is skipped."""
        names = [
            "request_id",
            "logged_at",
            "model",
            "version",
            "predicted_class",
            "predicted_label",
            "probabilities",
            "embedding",
            "features",
        ]
        if dialect == "sqlite":
            marks = ["?"] * len(names)
        elif dialect == "postgresql":
            # the features arrive as JSON text
            marks = ["%s"] * (len(names) - 1) + ["CAST(%s AS JSON)"]
        else:
            raise ConfigError(f"unsupported database dialect '{dialect}'")
        return (
            f"INSERT INTO {predictions.name} ({', '.join(names)}) "
            f"VALUES ({', '.join(marks)}) ON CONFLICT (request_id) DO NOTHING"
        )

    @staticmethod
    def _logged_ids(conn: Connection, request_ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for part in chunked(list(request_ids), _IN_CHUNK):
            query = select(predictions.c.request_id).where(predictions.c.request_id.in_(part))
            found.update(conn.execute(query).scalars())
        return found

    def attach_labels(
        self, labels: Sequence[tuple[str, str]], labeled_at: dt.datetime | None = None
    ) -> LabelReport:
        """Set the true label of logged predictions by request id, in one transaction.

        A request id that matches no logged prediction is counted and named (the
        first few) in the report, never dropped silently; a later label replaces an
        earlier one.
        """
        latest = {str(rid): str(label) for rid, label in labels}
        when = labeled_at or utc_now()
        ids = list(latest)
        with self.engine.begin() as conn:
            known = self._logged_ids(conn, ids)
            if known:
                statement = (
                    update(predictions)
                    .where(predictions.c.request_id == bindparam("rid"))
                    .values(label=bindparam("lbl"), labeled_at=bindparam("at"))
                )
                conn.execute(
                    statement,
                    [{"rid": rid, "lbl": latest[rid], "at": when} for rid in ids if rid in known],
                )
        unknown = [rid for rid in ids if rid not in known]
        return LabelReport(
            received=len(labels),
            attached=len(known),
            unknown=len(unknown),
            unknown_examples=unknown[:_EXAMPLES],
            unknown_ids=unknown,
        )

    # -- reading ------------------------------------------------------------------------
    def versions(self, model: str) -> dict[str, int]:
        """Logged versions of ``model`` and their number of predictions."""
        query = (
            select(predictions.c.version, func.count())
            .where(predictions.c.model == model)
            .group_by(predictions.c.version)
        )
        with self.engine.connect() as conn:
            return {str(v): int(n) for v, n in conn.execute(query)}

    def read(
        self,
        model: str,
        version: str,
        start: dt.datetime | None = None,
        end: dt.datetime | None = None,
        last: int | None = None,
    ) -> LoggedPredictions:
        """Predictions of one model version logged in ``[start, end)``, oldest first;
        with ``last``, only the newest ``last`` of them."""
        c = predictions.c
        query = select(predictions).where(c.model == model, c.version == str(version))
        if start is not None:
            query = query.where(c.logged_at >= as_utc(start))
        if end is not None:
            query = query.where(c.logged_at < as_utc(end))
        if last is not None:
            if last < 1:
                raise ConfigError(f"last={last}: expected a positive number of predictions")
            query = query.order_by(c.logged_at.desc(), c.id.desc()).limit(last)
        else:
            query = query.order_by(c.logged_at, c.id)
        with self.engine.connect() as conn:
            rows = list(conn.execute(query).mappings())
        if last is not None:
            rows.reverse()
        return _to_arrays(rows)


def _to_arrays(rows: list) -> LoggedPredictions:
    names = sorted({name for row in rows for name in row["features"]})
    features = {
        name: np.array([row["features"].get(name, np.nan) for row in rows], dtype=np.float32)
        for name in names
    }
    embeddings = [row["embedding"] for row in rows]
    embedding = None
    if rows and all(e is not None for e in embeddings):
        embedding = np.stack([np.frombuffer(e, dtype="<f4") for e in embeddings])
    probabilities = (
        np.stack([np.frombuffer(row["probabilities"], dtype="<f4") for row in rows])
        if rows
        else np.zeros((0, 0), np.float32)
    )
    return LoggedPredictions(
        request_ids=[row["request_id"] for row in rows],
        logged_at=[as_utc(row["logged_at"]) for row in rows],
        predicted_class=np.array([row["predicted_class"] for row in rows], dtype=np.int64),
        predicted_label=[row["predicted_label"] for row in rows],
        probabilities=probabilities,
        features=features,
        embedding=embedding,
        labels=[row["label"] for row in rows],
    )


def _split(data: bytes, rows: int) -> list[bytes]:
    """``rows`` equal slices of ``data``."""
    width = len(data) // rows if rows else 0
    return [data[i : i + width] for i in range(0, width * rows, width)] if width else [b""] * rows
