"""The ONNX Runtime predictor of a bundle: batches in, probabilities and labels out."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from cycleml.errors import BundleError
from cycleml.inference.bundle import ImagePreprocess, ModelBundle, TextPreprocess, load_bundle
from cycleml.inference.preprocess import ImageInput, ImagePreprocessor, TextPreprocessor

log = logging.getLogger(__name__)

_GPU_PROVIDERS = ("CUDAExecutionProvider",)


@dataclass(frozen=True)
class Prediction:
    """One example's result: the top class, its probability, the top-k classes."""

    label: str
    label_id: int
    confidence: float
    top_k: list[tuple[str, float]]
    probabilities: np.ndarray


def default_providers() -> list[str]:
    """CUDA when this ONNX Runtime build has it, then CPU."""
    available = ort.get_available_providers()
    return [p for p in _GPU_PROVIDERS if p in available] + ["CPUExecutionProvider"]


class Predictor:
    """An ONNX Runtime session on a bundle's model.

    ``run`` is safe to call from several threads at once (ONNX Runtime sessions are).
    ``intra_op_threads=0`` lets ONNX Runtime pick (one per physical core).
    ``precision`` picks the bundle's ``fp32`` model or its ``int8``/``fp16`` variant.
    ``session_config`` entries go to ONNX Runtime as they are, e.g.
    ``{"session.intra_op.allow_spinning": "0"}`` so idle worker threads sleep.
    """

    def __init__(
        self,
        bundle: ModelBundle | str | Path,
        providers: Sequence[str] | None = None,
        intra_op_threads: int = 0,
        inter_op_threads: int = 1,
        warmup: bool = True,
        precision: str = "fp32",
        session_config: Mapping[str, str] | None = None,
    ) -> None:
        self.bundle = bundle if isinstance(bundle, ModelBundle) else load_bundle(bundle)
        meta = self.bundle.meta
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(0, int(intra_op_threads))
        options.inter_op_num_threads = max(0, int(inter_op_threads))
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        for key, value in (session_config or {}).items():
            options.add_session_config_entry(str(key), str(value))
        chosen = list(providers) if providers else default_providers()
        model_path = self.bundle.variant_path(precision)
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=chosen)
        except Exception as err:  # onnxruntime raises its own non-exported exception types
            raise BundleError(f"ONNX Runtime cannot load '{model_path}': {err}") from err
        self.precision = precision
        self.providers = self.session.get_providers()
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or inputs[0].name != meta.input.name:
            raise BundleError(
                f"'{model_path}' inputs {[i.name for i in inputs]} do not match "
                f"bundle.json input {meta.input.name!r}"
            )
        if meta.output.name not in {o.name for o in outputs}:
            raise BundleError(f"'{model_path}' has no output {meta.output.name!r}")
        self.input_name = meta.input.name
        self.input_dtype = np.dtype(meta.input.dtype)
        self.input_shape = tuple(meta.input.shape)
        self.output_name = meta.output.name
        spec = meta.embedding_spec
        # None for bundles exported without an embedding output (monitoring skips it)
        self.embedding_name = spec.name if spec and spec.name in {o.name for o in outputs} else None
        self.class_names = list(meta.class_names)
        self.kind = meta.kind
        pre = meta.preprocess
        self._image: ImagePreprocessor | None = None
        self._text: TextPreprocessor | None = None
        if isinstance(pre, ImagePreprocess):
            self._image = ImagePreprocessor.from_bundle(pre)
        elif isinstance(pre, TextPreprocess):
            tokenizer = self.bundle.path / pre.tokenizer_file
            self._text = TextPreprocessor.from_file(tokenizer, pre.max_length, pre.pad_id)
        if warmup:
            self.warmup()
        log.info(
            "loaded %s %s (%s, %s) on %s",
            meta.name,
            meta.version,
            meta.kind,
            precision,
            ", ".join(self.providers),
        )

    def warmup(self, batch_size: int = 1) -> None:
        """Run one batch of zeros so the first real request pays no setup cost."""
        self.run(np.zeros((batch_size, *self.input_shape[1:]), dtype=self.input_dtype))

    # -- tensors ------------------------------------------------------------------------
    def run(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities ``float32 (N, num_classes)`` for a batch in the model's input format.

        Asks ONNX Runtime for the ``probabilities`` output by name: a bundle's
        ``embedding`` output is returned only by :meth:`run_with_embedding`.
        """
        self._check_batch(batch)
        if batch.shape[0] == 0:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        (probabilities,) = self._session_run([self.output_name], batch)
        return np.asarray(probabilities, dtype=np.float32)

    def run_with_embedding(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and the ``embedding`` output ``float32 (N, dim)`` in one run;
        the embedding is None when the bundle has no such output (older bundles)."""
        if self.embedding_name is None:
            return self.run(batch), None
        self._check_batch(batch)
        if batch.shape[0] == 0:
            dim = int(self.bundle.meta.embedding["dim"])
            return (
                np.zeros((0, len(self.class_names)), dtype=np.float32),
                np.zeros((0, dim), dtype=np.float32),
            )
        probabilities, embedding = self._session_run([self.output_name, self.embedding_name], batch)
        return np.asarray(probabilities, np.float32), np.asarray(embedding, np.float32)

    def _session_run(self, outputs: list[str], batch: np.ndarray) -> list[np.ndarray]:
        try:
            return self.session.run(outputs, {self.input_name: np.ascontiguousarray(batch)})
        except InvalidArgument as err:  # the values, not the model: e.g. ids out of range
            raise ValueError(f"the runtime refused the input: {err}") from None

    def _check_batch(self, batch: np.ndarray) -> None:
        if not isinstance(batch, np.ndarray):
            raise ValueError(f"input must be a numpy array, got {type(batch).__name__}")
        if batch.dtype != self.input_dtype:
            raise ValueError(
                f"input {self.input_name!r} must be {self.input_dtype}, got {batch.dtype}"
            )
        if batch.ndim != len(self.input_shape) or batch.shape[1:] != self.input_shape[1:]:
            expected = ("N", *self.input_shape[1:])
            raise ValueError(
                f"input {self.input_name!r} must have shape {expected}, got {batch.shape}"
            )

    # -- preprocessing ------------------------------------------------------------------
    def preprocess_image(self, data: ImageInput) -> np.ndarray:
        """One image decoded and resized to ``uint8 (H, W, C)``; ``DataError`` if unreadable."""
        if self._image is None:
            raise ValueError(f"bundle {self.bundle.meta.name!r} is a {self.kind} model, not image")
        return self._image(data)

    @property
    def vocab_size(self) -> int | None:
        """Token ids a text model accepts: ``0 <= id < vocab_size`` (None: an image model)."""
        return None if self._text is None else self._text.vocab_size

    def preprocess_texts(self, texts: Sequence[str], max_tokens: int | None = None) -> np.ndarray:
        """Token ids ``int64 (N, max_length)``; ``DataError`` for an empty text and, with
        ``max_tokens``, ``TooManyTokens`` for a text longer than that before truncation."""
        if self._text is None:
            raise ValueError(f"bundle {self.bundle.meta.name!r} is a {self.kind} model, not text")
        return self._text(texts, max_tokens)

    # -- predictions --------------------------------------------------------------------
    def predict(self, batch: np.ndarray, top_k: int = 5) -> list[Prediction]:
        return self.to_predictions(self.run(batch), top_k)

    def predict_images(self, items: Sequence[ImageInput], top_k: int = 5) -> list[Prediction]:
        if not items:
            return []
        return self.predict(np.stack([self.preprocess_image(i) for i in items]), top_k)

    def predict_texts(self, texts: Sequence[str], top_k: int = 5) -> list[Prediction]:
        return self.predict(self.preprocess_texts(texts), top_k)

    def to_predictions(self, probabilities: np.ndarray, top_k: int = 5) -> list[Prediction]:
        """Labels, confidences and the ``top_k`` classes of each row of probabilities."""
        top_ids, top_probs = self.top_k(probabilities, top_k)
        names = self.class_names
        return [
            Prediction(
                label=names[ids[0]],
                label_id=ids[0],
                confidence=probs[0],
                top_k=[(names[i], p) for i, p in zip(ids, probs, strict=True)],
                probabilities=row,
            )
            for ids, probs, row in zip(
                top_ids.tolist(), top_probs.tolist(), probabilities, strict=True
            )
        ]

    @staticmethod
    def top_k(probabilities: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Class ids ``(N, k)`` of each row's ``k`` highest probabilities, best first (ties:
        the lower id first), and those probabilities; ``k`` is capped to the classes."""
        k = max(1, min(int(k), probabilities.shape[1]))
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        return order, np.take_along_axis(probabilities, order, axis=1)
