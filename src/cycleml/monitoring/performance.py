"""Performance of a window: realised accuracy and macro-F1 where labels arrived, and
the label-free estimate (CBPE, confidence-based performance estimation).

CBPE: with calibrated probabilities, the chance that a prediction is right is its
top probability, so the expected accuracy of a window is the mean calibrated top
probability. It holds under covariate shift (the inputs move, ``P(label | input)``
does not) as long as the calibration does; it cannot see concept drift.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import f1_score

from cycleml.monitoring.calibration import calibrate


def estimated_accuracy(probabilities: np.ndarray, temperature: float) -> float | None:
    """Mean calibrated top probability of the window (None for an empty window)."""
    if len(probabilities) == 0:
        return None
    return float(calibrate(probabilities, temperature).max(axis=1).mean())


def realised_performance(
    predicted: Sequence[str], labels: Sequence[str | None], class_names: Sequence[str]
) -> dict[str, Any]:
    """Accuracy and macro-F1 over the rows that have a label; labels that are not a
    class of the model are counted apart (and score as wrong)."""
    pairs = [(p, t) for p, t in zip(predicted, labels, strict=True) if t is not None]
    known = set(class_names)
    result: dict[str, Any] = {
        "labelled": len(pairs),
        "unknown_labels": sum(t not in known for _, t in pairs),
        "accuracy": None,
        "macro_f1": None,
    }
    if pairs:
        y_pred = [p for p, _ in pairs]
        y_true = [t for _, t in pairs]
        result["accuracy"] = float(np.mean([p == t for p, t in pairs]))
        present = sorted(set(y_true) & known)
        result["macro_f1"] = (
            float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0))
            if present
            else 0.0
        )
    return result
