"""Classical baselines: a scikit-learn classifier on fixed features.

Texts become TF-IDF vectors of words and word pairs; images become their pixels,
flattened and standardised, or (``image_features: efficientnet_lite0``) the pooled
features of the frozen ImageNet-pretrained EfficientNet-Lite0. ``configs/model/logreg.yaml`` and ``linear_svm.yaml``
build them; ``cycleml.training.baseline`` trains them on a data module's own split.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.base import ClassifierMixin
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from sklearn.svm import LinearSVC

from cycleml.errors import ConfigError

log = logging.getLogger(__name__)

KINDS = ("text", "image")
IMAGE_FEATURES = ("pixels", "efficientnet_lite0")


def flatten_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 ``(N, H, W, C)`` images -> float32 ``(N, H*W*C)`` in [0, 1]."""
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


class SklearnBaseline:
    """A scikit-learn ``estimator`` behind the features that suit the data kind."""

    def __init__(
        self,
        name: str,
        estimator: ClassifierMixin,
        tfidf: Mapping[str, Any] | None = None,
        image_features: str = "pixels",
        weights_path: str | None = None,
    ) -> None:
        if image_features not in IMAGE_FEATURES:
            raise ConfigError(
                f"model.image_features must be one of {IMAGE_FEATURES}, got {image_features!r}"
            )
        self.name = name
        self.estimator = estimator
        self.tfidf = _tfidf_kwargs(tfidf)
        self.image_features = image_features
        self.weights_path = weights_path
        self.kind: str | None = None
        self.pipeline: Pipeline | None = None

    def _features(self, kind: str) -> list[Any]:
        if kind == "text":
            return [TfidfVectorizer(**self.tfidf)]
        if kind == "image" and self.image_features == "efficientnet_lite0":
            from cycleml.models.pretrained_features import PretrainedImageFeatures

            return [PretrainedImageFeatures(self.weights_path), StandardScaler()]
        if kind == "image":
            return [FunctionTransformer(flatten_pixels), StandardScaler()]
        raise ConfigError(f"baseline {self.name}: unknown data kind {kind!r}; expected {KINDS}")

    def fit(self, kind: str, inputs: Sequence[str] | np.ndarray, labels: np.ndarray) -> None:
        """Fit features and classifier on the training split (texts, or uint8 NHWC images)."""
        self.kind = kind
        self.pipeline = make_pipeline(*self._features(kind), self.estimator)
        self.pipeline.fit(inputs, labels)

    def predict(self, inputs: Sequence[str] | np.ndarray) -> np.ndarray:
        """Class ids (int64) of the inputs."""
        if self.pipeline is None:
            raise RuntimeError("fit the baseline before predicting")
        return np.asarray(self.pipeline.predict(inputs), dtype=np.int64)

    def scores(self, inputs: Sequence[str] | np.ndarray) -> np.ndarray:
        """Per-class scores ``(N, K)``: probabilities where the estimator has them, else a
        softmax of its decision values (a confidence ranking, not a calibrated probability)."""
        if self.pipeline is None:
            raise RuntimeError("fit the baseline before predicting")
        if hasattr(self.pipeline, "predict_proba"):
            return np.asarray(self.pipeline.predict_proba(inputs))
        decision = np.asarray(self.pipeline.decision_function(inputs), dtype=np.float64)
        if decision.ndim == 1:  # binary: one margin for class 1
            decision = np.stack([-decision, decision], axis=1) / 2
        decision -= decision.max(axis=1, keepdims=True)
        exp = np.exp(decision)
        return exp / exp.sum(axis=1, keepdims=True)


def _tfidf_kwargs(tfidf: Mapping[str, Any] | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"ngram_range": (1, 2), "sublinear_tf": True, "min_df": 1}
    kwargs.update(dict(tfidf or {}))
    kwargs["ngram_range"] = tuple(kwargs["ngram_range"])
    try:
        TfidfVectorizer(**kwargs)
    except TypeError as err:
        raise ConfigError(f"model.tfidf: {err}") from err
    return kwargs


def logistic_regression(
    C: float = 1.0,
    max_iter: int = 2000,
    class_weight: str | None = None,
    tfidf: Mapping[str, Any] | None = None,
    image_features: str = "pixels",
    weights_path: str | None = None,
    name: str = "logreg",
) -> SklearnBaseline:
    """Multinomial logistic regression (``model=logreg``, ``model=logreg_pretrained``)."""
    return SklearnBaseline(
        name,
        LogisticRegression(C=C, max_iter=max_iter, class_weight=class_weight),
        tfidf,
        image_features,
        weights_path,
    )


def linear_svm(
    C: float = 1.0,
    max_iter: int = 5000,
    class_weight: str | None = None,
    tfidf: Mapping[str, Any] | None = None,
) -> SklearnBaseline:
    """A linear support-vector machine, one-vs-rest (``model=linear_svm``)."""
    return SklearnBaseline(
        "linear_svm", LinearSVC(C=C, max_iter=max_iter, class_weight=class_weight), tfidf
    )
