"""scripts/make_demo_text.py: deterministic, varied, readable in every format."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from cycleml.data.text import TextTableDataModule

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_demo_text.py"


def demo():
    spec = importlib.util.spec_from_file_location("make_demo_text", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reviews_are_deterministic_balanced_and_varied():
    make = demo().make_reviews
    reviews = make()
    assert len(reviews) == 6000
    assert reviews == make()
    assert reviews != make(seed=1)
    positive = sum(r["label"] == "positive" for r in reviews)
    assert 0.45 < positive / 6000 < 0.55
    texts = {r["text"] for r in reviews}
    assert len(texts) > 2000  # many distinct reviews, not a few templates repeated
    assert sum(" not " in t or "n't" in t for t in texts) > 500  # negations to learn
    words = {w.strip(".,").lower() for t in texts for w in t.split()}
    assert len(words) > 150


def test_label_noise_is_the_configured_share():
    make = demo().make_reviews
    clean, noisy = make(rows=4000, label_noise=0.0), make(rows=4000, label_noise=0.1)
    flipped = sum(a["label"] != b["label"] for a, b in zip(clean, noisy, strict=True))
    assert 0.07 < flipped / 4000 < 0.13


def test_command_line_writes_each_format(tmp_path):
    for suffix in (".csv", ".jsonl", ".parquet"):
        out = tmp_path / f"reviews{suffix}"
        subprocess.run(
            [sys.executable, str(SCRIPT), str(out), "--rows", "120"],
            check=True,
            capture_output=True,
        )
        dm = TextTableDataModule(str(out), tokenizer={"vocab_size": 300}, id_column="id")
        dm.setup()
        assert dm.class_names == ["negative", "positive"]
        assert sum(len(dm.split_ids(s)) for s in ("train", "val", "test")) == 120
