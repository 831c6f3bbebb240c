"""One model version being served: its bundle, its instances, its queue and batchers."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from cycleml.db import utc_now
from cycleml.inference import ModelBundle, Predictor
from cycleml.inference.predictor import default_providers
from cycleml.serving.batch_policy import ArrivalRate, BatchLatencyModel
from cycleml.serving.batcher import DynamicBatcher, RequestQueue, WorkItem
from cycleml.serving.decode_limits import tokenize_within_limits
from cycleml.serving.metrics import ServingMetrics
from cycleml.serving.prediction_logger import LoggedBatch, PredictionLogger
from cycleml.serving.protocol import BYTES, DATATYPES, InferRequest, ProtocolError, datatype_of
from cycleml.serving.settings import LimitSettings, ServeSettings
from cycleml.serving.statistics import ModelStatistics

log = logging.getLogger(__name__)

# how often warm-up runs each batch size; the timings seed the batch latency model
WARMUP_RUNS = 3


# ONNX Runtime session options for serving, measured on two cores shared with the HTTP
# front end and the client:
# * worker threads spin while a run is in progress (no sleep and wake-up between the
#   operators of one run) but stop the moment it ends: spinning on between runs costs
#   the cores the front end needs (1.1 ms instead of 0.3 ms of CPU per batch-1 run of a
#   small CNN), and with force_spinning_stop the CPU per request is that of no spinning;
# * parallel loops hand out shrinking blocks (dynamic_block_base), so a worker that the
#   front end preempts holds up the rest of the run less: about 10% more rows/s at
#   saturation for ResNet-18 32x32.
# runtime.spin_wait keeps the threads spinning between runs too.
SERVING_SESSION_CONFIG = {
    "session.intra_op.allow_spinning": "1",
    "session.force_spinning_stop": "1",
    "session.dynamic_block_base": "4",
}
SPIN_BETWEEN_RUNS = {
    k: v for k, v in SERVING_SESSION_CONFIG.items() if k != "session.force_spinning_stop"
}


# the input a text model also takes: texts, tokenized on the server with the bundle's
# tokenizer (a BYTES tensor of shape [N] or [N, 1])
TEXT_INPUT = "text"


class QueueFull(Exception):
    """The model's queue holds ``max_queue_size`` requests already."""


class ServedModel:
    """A loaded model version: ``instances`` ONNX Runtime sessions, each with a batching
    thread, sharing one bounded queue. Ready once every instance ran its warm-up."""

    def __init__(
        self,
        name: str,
        bundle: ModelBundle,
        settings: ServeSettings,
        metrics: ServingMetrics,
        version: str | None = None,
        prediction_logger: PredictionLogger | None = None,
    ) -> None:
        self.name = name
        self.version = str(version if version is not None else bundle.meta.version)
        self.bundle = bundle
        self.loaded_at = time.time()
        runtime, batching = settings.runtime, settings.batching
        self.max_batch_size = batching.max_batch_size
        self.precision = settings.precision.get(name, "fp32")
        providers = list(runtime.providers) if runtime.providers else default_providers()
        accelerated = providers[0] != "CPUExecutionProvider"
        self.intra_op_threads = settings.intra_op_threads(accelerated)
        self.predictors = [
            Predictor(
                bundle,
                precision=self.precision,
                providers=providers,
                intra_op_threads=self.intra_op_threads,
                inter_op_threads=runtime.inter_op_threads,
                warmup=False,
                session_config={
                    **(SPIN_BETWEEN_RUNS if runtime.spin_wait else SERVING_SESSION_CONFIG),
                    **{str(k): str(v) for k, v in runtime.session_config.items()},
                },
            )
            for _ in range(settings.instances(accelerated))
        ]
        first = self.predictors[0]
        self.input_name = first.input_name
        self.input_dtype = first.input_dtype
        self.input_datatype = datatype_of(first.input_dtype)
        self.input_shape = tuple(first.input_shape)
        self.output_name = first.output_name
        self.class_names = list(first.class_names)
        self.kind = bundle.meta.kind
        self.vocab_size = first.vocab_size
        self.prediction_logger = prediction_logger
        pre = bundle.meta.preprocess
        self._pad_id = int(getattr(pre, "pad_id", 0))

        self._labels = (name, self.version)
        self._metrics = metrics
        self.latency_model = BatchLatencyModel()
        self.stats = ModelStatistics()
        self.queue = RequestQueue(
            batching.max_queue_size,
            ArrivalRate(),
            on_depth=metrics.queue_depth_writer(self._labels),
        )
        metrics.watch_queue(self._labels, self.queue.__len__)
        self._inference_time = metrics.inference_time.labels(*self._labels)
        self._batch_size = metrics.batch_size.labels(*self._labels)
        self.batchers = [
            DynamicBatcher(
                f"{name}-{self.version}-instance{i}",
                self.queue,
                predictor.run,
                max_rows=batching.max_batch_size,
                max_delay_s=batching.max_queue_delay_ms / 1000.0,
                latency=self.latency_model,
                on_batch=self._record_batch,
                run_logged=None if prediction_logger is None else predictor.run_with_embedding,
            )
            for i, predictor in enumerate(self.predictors)
        ]
        self.ready = False
        self._leases = 0
        self._lease_lock = threading.Lock()
        # counted among the served models (metric labels) from warm-up to stop
        self._counted = False

    # -- life cycle -----------------------------------------------------------------------
    def warm_up(self) -> None:
        """Run each instance at batch size 1 and at the maximum, then start the batchers.

        The first runs allocate buffers and pick kernels; their timings would mislead the
        latency model, so only the later runs are recorded.
        """
        sizes = sorted({1, self.max_batch_size})
        for predictor in self.predictors:
            for size in sizes:
                batch = np.zeros((size, *self.input_shape[1:]), dtype=self.input_dtype)
                for run in range(WARMUP_RUNS):
                    start = time.perf_counter()
                    predictor.run(batch)
                    if run > 0:
                        self.latency_model.record(size, time.perf_counter() - start)
        for batcher in self.batchers:
            batcher.start()
        self.ready = True
        self._metrics.models_ready.labels(*self._labels).set(1)
        self._metrics.model_loaded(self.name)
        self._counted = True
        log.info(
            "model %s version %s ready: %d instance(s), max batch %d",
            self.name,
            self.version,
            len(self.batchers),
            self.max_batch_size,
        )

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new work, let the batchers finish what is queued, and join them."""
        self.ready = False
        self.queue.close()
        for batcher in self.batchers:
            if not batcher.join(timeout):
                log.warning("instance %s did not stop within %s s", batcher.name, timeout)
        self._metrics.models_ready.labels(*self._labels).set(0)
        self._metrics.unwatch_queue(self._labels, self.queue.__len__)
        if self._counted:
            self._counted = False
            self._metrics.model_stopped(self.name)

    def acquire(self) -> None:
        with self._lease_lock:
            self._leases += 1

    def release(self) -> None:
        with self._lease_lock:
            self._leases -= 1

    @property
    def leases(self) -> int:
        return self._leases

    # -- requests ------------------------------------------------------------------------
    def check_request(self, request: InferRequest) -> np.ndarray:
        """The request's input tensor as a batch for this model; 400-worthy errors name
        the input and what was expected."""
        if len(request.inputs) != 1:
            names = ", ".join(t.name for t in request.inputs)
            raise ProtocolError(
                f"model '{self.name}' takes one input '{self.input_name}', got "
                f"{len(request.inputs)} ({names})"
            )
        tensor = request.inputs[0]
        if tensor.name != self.input_name:
            raise ProtocolError(
                f"model '{self.name}' has no input '{tensor.name}'; its input is "
                f"'{self.input_name}'"
            )
        if DATATYPES[tensor.datatype] != self.input_dtype:
            raise ProtocolError(
                f"input '{self.input_name}' must be {self.input_datatype}, got {tensor.datatype}"
            )
        self.check_rows(tensor.array)
        self._check_outputs(request)
        return tensor.array

    def rows_from_texts(self, request: InferRequest, limits: LimitSettings) -> np.ndarray:
        """A text model's batch from a BYTES input of texts, tokenized with the bundle's
        tokenizer (CPU work: runs on a decode thread)."""
        tensor = request.inputs[0]
        if self.vocab_size is None:
            raise ProtocolError(
                f"model '{self.name}' takes no BYTES input; its input is '{self.input_name}' "
                f"({self.input_datatype})"
            )
        if len(request.inputs) != 1 or tensor.name != TEXT_INPUT:
            names = ", ".join(t.name for t in request.inputs)
            raise ProtocolError(
                f"model '{self.name}' takes one input '{self.input_name}' "
                f"({self.input_datatype}) or '{TEXT_INPUT}' (BYTES), got {names}"
            )
        shape = tensor.array.shape
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise ProtocolError(
                f"input '{TEXT_INPUT}' has shape {list(shape)}; send one text per row: "
                "[N] or [N, 1]"
            )
        texts = []
        for index, value in enumerate(tensor.array.reshape(-1)):
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    raise ProtocolError(
                        f"input '{TEXT_INPUT}': text #{index} is not valid UTF-8"
                    ) from None
            texts.append(value)
        if not 1 <= len(texts) <= self.max_batch_size:
            raise ProtocolError(
                f"input '{TEXT_INPUT}' has {len(texts)} texts; send between 1 and "
                f"{self.max_batch_size} (batching.max_batch_size) per request"
            )
        self._check_outputs(request)
        return tokenize_within_limits(texts, self.preprocess_texts, limits)

    def _check_outputs(self, request: InferRequest) -> None:
        if request.outputs is not None:
            unknown = [n for n in request.outputs if n != self.output_name]
            if unknown:
                raise ProtocolError(
                    f"model '{self.name}' has no output {unknown[0]!r}; its output is "
                    f"'{self.output_name}'"
                )

    def check_rows(self, array: np.ndarray) -> None:
        """A batch must have the model's row shape and between 1 and max_batch_size rows."""
        expected = list(self.input_shape)
        if array.ndim != len(expected) or list(array.shape[1:]) != expected[1:]:
            raise ProtocolError(
                f"input '{self.input_name}' has shape {list(array.shape)}; the model expects "
                f"{expected} (-1: any batch size)"
            )
        rows = array.shape[0]
        if not 1 <= rows <= self.max_batch_size:
            raise ProtocolError(
                f"input '{self.input_name}' has {rows} rows; send between 1 and "
                f"{self.max_batch_size} (batching.max_batch_size) per request"
            )
        if self.vocab_size is not None:
            self._check_token_ids(array)

    def _check_token_ids(self, array: np.ndarray) -> None:
        """Token ids must index the vocabulary: out of range, the runtime would fail the
        whole batch the request joins (and a negative id would silently count from the
        end)."""
        vocab = self.vocab_size
        if array.size and (array.min() < 0 or array.max() >= vocab):
            bad = array[(array < 0) | (array >= vocab)].flat[0]
            raise ProtocolError(
                f"input '{self.input_name}' has token id {bad}; ids must be in [0, {vocab}) "
                "(the model's vocabulary)"
            )

    def submit(
        self, inputs: np.ndarray, deadline: float, request_id: str | None = None
    ) -> WorkItem:
        """Queue a batch for inference; the item's future resolves when it is done.
        With the prediction log on, a sampled request is logged under ``request_id``."""
        loop = asyncio.get_running_loop()
        item = WorkItem(inputs=inputs, deadline=deadline, loop=loop, future=loop.create_future())
        logger = self.prediction_logger
        if logger is not None and request_id is not None and logger.sampled():
            item.log_id = request_id
        if not self.queue.put(item):
            raise QueueFull(
                f"model '{self.name}' version {self.version} has "
                f"{self.queue.max_requests} requests queued"
            )
        return item

    def withdraw(self, item: WorkItem) -> bool:
        """Take a queued item out (deadline or client gone); False once it is running."""
        return self.queue.remove(item)

    def _record_batch(
        self,
        items: list[WorkItem],
        inputs: np.ndarray,
        outputs: np.ndarray,
        embeddings: np.ndarray | None,
        seconds: float,
    ) -> None:
        rows = len(inputs)
        self._inference_time.observe(seconds)
        self._batch_size.observe(rows)
        self.stats.batch_ran(rows, seconds)
        if self.prediction_logger is not None:
            self._log_predictions(items, inputs, outputs, embeddings)

    def _log_predictions(
        self,
        items: list[WorkItem],
        inputs: np.ndarray,
        outputs: np.ndarray,
        embeddings: np.ndarray | None,
    ) -> None:
        """Hand the batch's logged requests to the prediction log's writer as one
        :class:`LoggedBatch` of the batch's own arrays (on the batcher thread: nothing
        per row but its id; the features are computed by the writer)."""
        logged = [item for item in items if item.log_id is not None]
        if not logged:
            return
        if len(logged) == len(outputs):  # every request logged, each of one row
            ids = [item.log_id for item in logged]
        else:
            ids, index, offset = [], [], 0
            for item in items:
                rows = len(item.inputs)
                if item.log_id is not None:
                    # one record per row: a request of several rows logs <id>/<row>
                    ids += (
                        [item.log_id] if rows == 1 else [f"{item.log_id}/{i}" for i in range(rows)]
                    )
                    index += range(offset, offset + rows)
                offset += rows
            if len(index) < len(outputs):  # only some logged: their rows, copied
                inputs, outputs = inputs[index], outputs[index]
                embeddings = None if embeddings is None else embeddings[index]
        self.prediction_logger.offer(
            LoggedBatch(
                model=self.name,
                version=self.version,
                kind=self.kind,
                class_names=self.class_names,
                pad_id=self._pad_id,
                request_ids=ids,
                inputs=inputs,
                probabilities=outputs,
                embeddings=embeddings,
                logged_at=utc_now(),
            )
        )

    # -- preprocessing for the convenience endpoint --------------------------------------------
    def preprocess_image(self, image: bytes | np.ndarray) -> np.ndarray:
        return self.predictors[0].preprocess_image(image)

    def preprocess_texts(self, texts: Sequence[str], max_tokens: int | None = None) -> np.ndarray:
        return self.predictors[0].preprocess_texts(texts, max_tokens)

    # -- description ---------------------------------------------------------------------
    def metadata(self, versions: Sequence[str]) -> dict[str, Any]:
        """KServe v2 model metadata."""
        return {
            "name": self.name,
            "versions": list(versions),
            "platform": "onnxruntime_onnx",
            "inputs": [
                {
                    "name": self.input_name,
                    "datatype": self.input_datatype,
                    "shape": list(self.input_shape),
                },
                # a text model takes either its token ids or the texts themselves
                *(
                    [{"name": TEXT_INPUT, "datatype": BYTES, "shape": [-1]}]
                    if self.vocab_size
                    else []
                ),
            ],
            "outputs": [
                {"name": self.output_name, "datatype": "FP32", "shape": [-1, len(self.class_names)]}
            ],
            "parameters": {
                "kind": self.kind,
                "class_names": self.class_names,
                "max_batch_size": self.max_batch_size,
                "instances": len(self.batchers),
                "intra_op_threads": self.intra_op_threads,
                "run_id": self.bundle.meta.run_id,
                "precision": self.precision,
                "precisions": ["fp32", *sorted(self.bundle.meta.variants)],
            },
        }
