"""Temperature scaling: calibrated probabilities for the label-free accuracy estimate.

Fitted at export on the validation split (stored in ``bundle.json`` as
``calibration``) and applied by ``cycleml monitor`` to logged probabilities.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Temperature scaling: the ``T`` minimising the validation NLL of
    ``softmax(log p / T)`` (``log p`` are the logits up to a per-row constant)."""
    logits = np.log(np.clip(probabilities.astype(np.float64), 1e-12, 1.0))

    def nll(log_t: float) -> float:
        return _nll(logits / np.exp(log_t), labels)

    best = minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded")
    temperature = float(np.exp(best.x))
    return {
        "method": "temperature",
        "temperature": temperature,
        "nll_before": _nll(logits, labels),
        "nll_after": float(best.fun),
        "samples": int(len(labels)),
    }


def calibrate(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)``: probabilities after temperature scaling."""
    logits = np.log(np.clip(probabilities.astype(np.float64), 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return (scaled / scaled.sum(axis=1, keepdims=True)).astype(np.float32)


def _nll(logits: np.ndarray, labels: np.ndarray) -> float:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1))
    return float((log_norm - shifted[np.arange(len(labels)), labels]).mean())
