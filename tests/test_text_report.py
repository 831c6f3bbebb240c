"""The worst-misclassified-texts CSV written by `cycleml eval` for text runs."""

from __future__ import annotations

import csv

import pytest

from cycleml.errors import DataError
from cycleml.training.text_report import COLUMNS, write_worst_texts

NAMES = ["negative", "positive"]


def read(path):
    with path.open(newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def test_most_confident_errors_first_with_labels_and_limit(tmp_path):
    texts = ["fine", 'said "great", then, left', "awful", "ok\nreally", "meh"]
    y_true = [1, 1, 0, 0, 1]
    y_pred = [1, 0, 1, 1, 0]
    confidence = [0.99, 0.70, 0.95, 0.60, 0.70]
    ids = ["r7", "r3", "r9", "r1", "r4"]
    path = write_worst_texts(ids, texts, y_true, y_pred, confidence, NAMES, tmp_path / "w.csv", 3)
    rows = read(path)
    assert list(rows[0]) == list(COLUMNS)
    assert [r["id"] for r in rows] == ["r9", "r3", "r4"]  # ties keep input order
    assert rows[0] == {
        "rank": "1", "id": "r9", "true_label": "negative", "predicted_label": "positive",
        "confidence": "0.9500", "text": "awful",
    }  # fmt: skip
    assert rows[1]["text"] == 'said "great", then, left'  # quoting survives the round trip
    everything = read(write_worst_texts(ids, texts, y_true, y_pred, confidence, NAMES, path, 50))
    assert [r["text"] for r in everything][-1] == "ok\nreally"


def test_no_errors_gives_only_the_header(tmp_path):
    path = write_worst_texts(
        ["1", "2"], ["a", "b"], [0, 1], [0, 1], [0.9, 0.8], NAMES, tmp_path / "w.csv"
    )
    assert path.read_text().strip() == ",".join(COLUMNS)


def test_lengths_must_agree(tmp_path):
    with pytest.raises(DataError, match=r"texts \(2\), y_true \(1\)"):
        write_worst_texts(
            ["1", "2"], ["a", "b"], [0], [0, 1], [0.5, 0.5], NAMES, tmp_path / "w.csv"
        )
