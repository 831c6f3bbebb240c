"""The bundle's reference sample: validation rows that monitoring windows are compared with.

Stored next to ``bundle.json`` as an ``.npz`` (named by its ``monitoring_reference``
key): the per-example input and output features of
:mod:`cycleml.inference.reference`, the predicted class, the label and, when the
graph has one, the embedding. At most ``max_rows`` rows, drawn at random with a fixed
seed so a re-export of the same model writes the same sample.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cycleml.errors import BundleError
from cycleml.inference.bundle import ModelBundle
from cycleml.inference.reference import input_features, output_features

log = logging.getLogger(__name__)

REFERENCE_FILE = "monitoring_reference.npz"
MAX_REFERENCE_ROWS = 2000
_FEATURE_PREFIX = "feature/"


@dataclass(frozen=True)
class ReferenceSample:
    """Validation rows as the monitor compares them."""

    features: dict[str, np.ndarray]
    predicted_class: np.ndarray
    labels: np.ndarray
    embedding: np.ndarray | None

    def __len__(self) -> int:
        return len(self.predicted_class)


def build_reference_sample(
    kind: str,
    inputs: np.ndarray,
    probabilities: np.ndarray,
    labels: np.ndarray,
    embedding: np.ndarray | None,
    pad_id: int = 0,
    max_rows: int = MAX_REFERENCE_ROWS,
    seed: int = 0,
) -> ReferenceSample:
    """At most ``max_rows`` validation rows, drawn without replacement."""
    rows = np.arange(len(inputs))
    if len(rows) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_rows, replace=False))
    features = {
        **input_features(kind, inputs[rows], pad_id),
        **output_features(probabilities[rows]),
    }
    return ReferenceSample(
        features={k: v.astype(np.float32) for k, v in features.items()},
        predicted_class=probabilities[rows].argmax(axis=1).astype(np.int64),
        labels=np.asarray(labels)[rows].astype(np.int64),
        embedding=None if embedding is None else embedding[rows].astype(np.float32),
    )


def save_reference_sample(sample: ReferenceSample, path: Path) -> None:
    arrays = {f"{_FEATURE_PREFIX}{k}": v for k, v in sample.features.items()}
    arrays["predicted_class"] = sample.predicted_class
    arrays["labels"] = sample.labels
    if sample.embedding is not None:
        arrays["embedding"] = sample.embedding
    with path.open("wb") as out:
        np.savez_compressed(out, **arrays)


def load_reference_sample(bundle: ModelBundle) -> ReferenceSample | None:
    """The bundle's reference sample, or None for a bundle exported without one."""
    name = bundle.meta.monitoring_reference
    if not name:
        return None
    path = bundle.path / name
    try:
        with np.load(path, allow_pickle=False) as data:
            features = {
                key[len(_FEATURE_PREFIX) :]: data[key]
                for key in data.files
                if key.startswith(_FEATURE_PREFIX)
            }
            sample = ReferenceSample(
                features=features,
                predicted_class=data["predicted_class"],
                labels=data["labels"],
                embedding=data["embedding"] if "embedding" in data.files else None,
            )
    except (OSError, ValueError, KeyError) as err:
        raise BundleError(f"monitoring reference '{path}' cannot be read: {err}") from err
    lengths = {len(v) for v in [*sample.features.values(), sample.predicted_class]}
    if len(lengths) != 1:
        raise BundleError(f"monitoring reference '{path}': arrays of different lengths")
    return sample
