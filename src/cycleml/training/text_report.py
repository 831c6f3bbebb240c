"""Error analysis for text classifiers: the misclassified texts the model was surest of."""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cycleml.errors import DataError

log = logging.getLogger(__name__)

COLUMNS = ("rank", "id", "true_label", "predicted_label", "confidence", "text")


def write_worst_texts(
    ids: Sequence[str],
    texts: Sequence[str],
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    confidence: Sequence[float] | np.ndarray,
    class_names: Sequence[str],
    out_path: str | Path,
    limit: int = 32,
) -> Path:
    """Write a CSV of up to ``limit`` misclassified texts, most confident error first.

    ``confidence`` is the probability the model gave its (wrong) prediction; ``id`` is the
    item's id in its table (the id column, else the row number), so the text can be found
    there. Ties keep the order of ``texts``. With no errors the CSV holds only its header.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    confidence = np.asarray(confidence, dtype=np.float64)
    sizes = {len(ids), len(texts), len(y_true), len(y_pred), len(confidence)}
    if len(sizes) != 1:
        raise DataError(
            f"write_worst_texts: ids ({len(ids)}), texts ({len(texts)}), y_true ({len(y_true)}), y_pred "
            f"({len(y_pred)}) and confidence ({len(confidence)}) must have the same length"
        )
    wrong = np.flatnonzero(y_true != y_pred)
    order = wrong[np.argsort(-confidence[wrong], kind="stable")][: max(0, limit)]
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(COLUMNS)
        for rank, i in enumerate(order, start=1):
            writer.writerow(
                [rank, ids[i], class_names[int(y_true[i])], class_names[int(y_pred[i])],
                 f"{confidence[i]:.4f}", texts[i]]
            )  # fmt: skip
    log.info("%d of %d texts misclassified; worst %d written to %s",
             len(wrong), len(texts), len(order), out)  # fmt: skip
    return out
