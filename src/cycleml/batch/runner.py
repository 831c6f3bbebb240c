"""Offline prediction: stream inputs → decode in parallel → ONNX Runtime → database.

Three stages run at once, joined by bounded queues so memory stays flat however
large the input: a reader thread (read, shard, skip keys already predicted, decode
in worker processes), the main thread (ONNX Runtime on whole batches, nothing else)
and a writer thread (top-k, then one transaction per batch). A bad input becomes an
error row; only a failure of the database or the model itself stops the run.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cycleml.batch.decode import ImageDecoder
from cycleml.batch.sources import InputItem, InputSource, Shard
from cycleml.batch.store import (
    DUPLICATE_REASON,
    TABLES,
    Failure,
    PredictionStore,
    check_table_layout,
)
from cycleml.db import open_database, safe_url
from cycleml.errors import ConfigError
from cycleml.inference import ImagePreprocess, ModelBundle, Predictor, load_bundle
from cycleml.inference.preprocess import ImagePreprocessor
from cycleml.monitoring.log import PredictionLog, records_from_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictSettings:
    """The knobs of ``cycleml predict`` (see ``configs/predict.yaml``)."""

    batch_size: int = 256
    # processes decoding images (0 = in the reader thread)
    decode_workers: int = 2
    # batches decoded ahead of the model
    prefetch: int = 4
    top_k: int = 5
    shard: str | None = None
    text_field: str = "text"
    image_field: str = "image"
    key_field: str | None = None
    input_format: str | None = None
    precision: str = "fp32"
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    providers: list[str] | None = None
    # let idle ONNX Runtime threads spin (they would take CPU the decoders need)
    spin_wait: bool = False
    progress: bool = True
    # the prediction log's database (cycleml.monitoring); None: predictions are not logged
    monitoring_db_url: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.prefetch < 1 or self.decode_workers < 0:
            raise ConfigError(
                "batch_size and prefetch must be at least 1, decode_workers 0 or more"
            )
        if self.top_k < 1:
            raise ConfigError(f"top_k={self.top_k}: must be at least 1")


@dataclass
class PredictSummary:
    """What a run did. ``rows_per_s`` counts written and failed rows over the run."""

    model_name: str
    model_version: str
    input: str
    db_url: str
    shard: str
    job_id: str
    written: int = 0
    skipped: int = 0
    failed: int = 0
    ignored_files: int = 0
    seconds: float = 0.0
    rows_per_s: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Prepared:
    keys: list[str]
    inputs: np.ndarray
    failures: list[Failure]
    skipped: int


@dataclass(frozen=True)
class _Scored:
    keys: list[str]
    probabilities: np.ndarray
    failures: list[Failure]
    skipped: int
    # for the prediction log (None when it is off)
    inputs: np.ndarray | None = None
    embeddings: np.ndarray | None = None


_DONE = object()
SPINNING = "session.intra_op.allow_spinning"


def predict_to_database(
    bundle: ModelBundle | str | Path,
    input_path: str | Path,
    db_url: str,
    settings: PredictSettings | None = None,
) -> PredictSummary:
    """Predict every input under ``input_path`` with ``bundle`` into ``db_url``."""
    settings = settings or PredictSettings()
    shard = Shard.parse(settings.shard)
    bundle = bundle if isinstance(bundle, ModelBundle) else load_bundle(bundle)
    meta = bundle.meta
    source = InputSource(
        input_path,
        meta.kind,
        text_field=settings.text_field,
        image_field=settings.image_field,
        key_field=settings.key_field,
        input_format=settings.input_format,
    )
    pre = meta.preprocess
    # decoding workers first, while this process has no runtime threads to fork
    decoder = (
        ImageDecoder(ImagePreprocessor.from_bundle(pre), settings.decode_workers)
        if isinstance(pre, ImagePreprocess)
        else None
    )
    try:
        summary = _predict(bundle, source, shard, db_url, settings, decoder)
    finally:
        if decoder is not None:
            decoder.close()
    return summary


def _predict(
    bundle: ModelBundle,
    source: InputSource,
    shard: Shard,
    db_url: str,
    settings: PredictSettings,
    decoder: ImageDecoder | None,
) -> PredictSummary:
    meta = bundle.meta
    # tables of an older layout are left alone by the create, then refused
    engine = open_database(db_url, create=TABLES, check_layout=False)
    try:
        check_table_layout(engine)
    except ConfigError:
        engine.dispose()
        raise
    predictor = Predictor(
        bundle,
        providers=settings.providers,
        intra_op_threads=settings.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
        precision=settings.precision,
        session_config={} if settings.spin_wait else {SPINNING: "0"},
    )
    job_id = uuid.uuid4().hex
    store = PredictionStore(
        engine, meta.name, meta.version, meta.run_id, job_id, meta.class_names, settings.precision
    )
    summary = PredictSummary(
        model_name=meta.name,
        model_version=meta.version,
        input=str(source.path),
        db_url=safe_url(db_url),
        shard=str(shard),
        job_id=job_id,
    )
    log.info(
        "predicting %s with %s %s (%s) into %s, shard %s, batch %d",
        source.path, meta.name, meta.version, settings.precision, summary.db_url, shard,
        settings.batch_size,
    )  # fmt: skip
    # opened before the run: a log that cannot be written fails the run at once
    prediction_log = (
        None if settings.monitoring_db_url is None else PredictionLog(settings.monitoring_db_url)
    )
    try:
        _run_pipeline(source, shard, predictor, store, settings, summary, decoder, prediction_log)
    finally:
        engine.dispose()
        if prediction_log is not None:
            prediction_log.close()
    summary.ignored_files = source.ignored
    log.info(
        "done: %d rows written, %d skipped (already predicted by %s %s %s), %d failed "
        "(table batch_prediction_errors)%s in %.1f s, %.1f rows/s",
        summary.written, summary.skipped, meta.name, meta.version, settings.precision,
        summary.failed,
        f", {summary.ignored_files} non-image files ignored" if summary.ignored_files else "",
        summary.seconds, summary.rows_per_s,
    )  # fmt: skip
    return summary


def _run_pipeline(
    source: InputSource,
    shard: Shard,
    predictor: Predictor,
    store: PredictionStore,
    settings: PredictSettings,
    summary: PredictSummary,
    decoder: ImageDecoder | None,
    prediction_log: PredictionLog | None = None,
) -> None:
    prepared: queue.Queue = queue.Queue(maxsize=settings.prefetch)
    scored: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    errors: list[BaseException] = []
    timings = {"read_decode_s": 0.0, "model_s": 0.0, "write_s": 0.0}
    total = source.total()
    progress = tqdm(
        total=total if shard.count == 1 else None,
        unit="rows",
        desc=f"predict {summary.model_name}",
        disable=not settings.progress,
        mininterval=0.5,
    )

    def reader() -> None:
        try:
            items = (item for item in source if shard.owns(item.key))
            for chunk in _chunks(items, settings.batch_size):
                if stop.is_set():
                    return
                start = time.perf_counter()
                batch = _prepare(chunk, predictor, store, decoder)
                timings["read_decode_s"] += time.perf_counter() - start
                _put(prepared, batch, stop)
        except BaseException as err:  # handed to the main thread, which re-raises it
            errors.append(err)
            stop.set()
        finally:
            _put(prepared, _DONE, stop, force=True)

    def writer() -> None:
        try:
            while True:
                item = scored.get()
                if item is _DONE:
                    return
                start = time.perf_counter()
                top_ids, top_probs = Predictor.top_k(item.probabilities, settings.top_k)
                result = store.write(item.keys, top_ids, top_probs, item.failures)
                timings["write_s"] += time.perf_counter() - start
                if prediction_log is not None and item.keys:
                    _log_predictions(prediction_log, predictor, item)
                summary.written += result.written
                summary.failed += result.failed
                summary.skipped += item.skipped
                progress.update(result.written + result.failed + item.skipped)
                progress.set_postfix(
                    written=summary.written, skipped=summary.skipped, failed=summary.failed,
                    refresh=False,
                )  # fmt: skip
        except BaseException as err:
            errors.append(err)
            stop.set()
            while scored.get() is not _DONE:  # drain so the main thread never blocks
                pass

    threads = [
        threading.Thread(target=reader, name="predict-reader", daemon=True),
        threading.Thread(target=writer, name="predict-writer", daemon=True),
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    reader_done = False
    try:
        while True:
            batch = prepared.get()
            if batch is _DONE:
                reader_done = True
                break
            if stop.is_set():
                continue
            # this thread only runs the model; ranking and rows are the writer's work
            start = time.perf_counter()
            if prediction_log is None:
                probabilities, embeddings = predictor.run(batch.inputs), None
            else:
                probabilities, embeddings = predictor.run_with_embedding(batch.inputs)
            timings["model_s"] += time.perf_counter() - start
            _put(
                scored,
                _Scored(
                    batch.keys,
                    probabilities,
                    batch.failures,
                    batch.skipped,
                    None if prediction_log is None else batch.inputs,
                    embeddings,
                ),
                stop,
            )
    except BaseException:
        stop.set()
        raise
    finally:
        while not reader_done:  # let the reader finish its current put and exit
            reader_done = prepared.get() is _DONE
        scored.put(_DONE)
        for thread in threads:
            thread.join()
        progress.close()
        summary.seconds = time.perf_counter() - started
        processed = summary.written + summary.failed
        summary.rows_per_s = processed / summary.seconds if summary.seconds > 0 else 0.0
        summary.stages = {k: round(v, 3) for k, v in timings.items()}
    if errors:
        raise errors[0]


def log_request_id(model: str, version: str, key: str) -> str:
    """The prediction log's request id of an input predicted by ``cycleml predict``:
    labels for it are attached by this id (``cycleml monitor labels``)."""
    return f"{model}:{version}:{key}"


def _log_predictions(prediction_log: PredictionLog, predictor: Predictor, item: _Scored) -> None:
    meta = predictor.bundle.meta
    prediction_log.write(
        records_from_batch(
            model=meta.name,
            version=str(meta.version),
            kind=meta.kind,
            class_names=predictor.class_names,
            request_ids=[log_request_id(meta.name, str(meta.version), k) for k in item.keys],
            inputs=item.inputs,
            probabilities=item.probabilities,
            embeddings=item.embeddings,
            pad_id=int(getattr(meta.preprocess, "pad_id", 0)),
        )
    )


def _prepare(
    chunk: list[InputItem],
    predictor: Predictor,
    store: PredictionStore,
    decoder: ImageDecoder | None,
) -> _Prepared:
    """Skip keys an earlier run predicted, record unreadable inputs and keys this run
    has already predicted (duplicates in the input), decode the rest."""
    done = store.predicted_keys([item.key for item in chunk])
    failures: list[Failure] = []
    valid: list[InputItem] = []
    skipped = 0
    for item in chunk:
        job = done.get(item.key)
        if job == store.job_id:
            failures.append(Failure(item.key, DUPLICATE_REASON))
        elif job is not None:
            skipped += 1
        elif item.error is not None:
            failures.append(Failure(item.key, item.error, item.original_key))
        else:
            valid.append(item)
    values = [item.value for item in valid]
    if decoder is not None:
        inputs, positions, bad = decoder(values)  # type: ignore[arg-type]
        keys = [valid[i].key for i in positions]
        failures += [Failure(valid[i].key, reason) for i, reason in bad]
    else:
        keys = [item.key for item in valid]
        inputs = predictor.preprocess_texts(values)  # type: ignore[arg-type]
    return _Prepared(keys, inputs, failures, skipped)


def _chunks(items: Iterator[InputItem], size: int) -> Iterator[list[InputItem]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def _put(target: queue.Queue, item: Any, stop: threading.Event, force: bool = False) -> None:
    """Put without blocking forever when the consumer has stopped."""
    while True:
        try:
            target.put(item, timeout=0.2)
            return
        except queue.Full:
            if stop.is_set() and not force:
                return
