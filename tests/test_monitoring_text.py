"""Drift of a text model's traffic: the demo reviews against a corpus from another
domain (support tickets), on a real BagOfEmbeddings model and its ONNX bundle."""

from __future__ import annotations

import functools
import importlib.util
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cycleml.data.tokenizer import TextTokenizer, TokenizerSettings
from cycleml.export import export_bundle
from cycleml.inference import Predictor, load_bundle
from cycleml.models.text import BagOfEmbeddings
from cycleml.monitoring.drift import DriftSettings
from cycleml.monitoring.log import logged_from_records, records_from_batch
from cycleml.monitoring.monitor import evaluate_window
from cycleml.monitoring.reference import load_reference_sample
from cycleml.monitoring.windows import Window

# trains and exports a text model of its own (about a minute on a busy machine)
pytestmark = pytest.mark.slow

CLASSES = ["negative", "positive"]
MAX_LENGTH = 40
WINDOW = 500

TICKET_SUBJECTS = [
    "the server",
    "my account",
    "the invoice",
    "the vpn client",
    "the printer",
    "the database backup",
    "the login page",
    "the api token",
    "the firewall",
]
TICKET_PROBLEMS = [
    "returns error 503",
    "times out after the update",
    "rejects my password",
    "was charged twice",
    "stopped syncing overnight",
    "shows a blank screen",
    "needs a restart every hour",
    "cannot reach the network drive",
]
TICKET_ASKS = ["please advise", "ticket priority high", "see the attached log",
               "reproduced on two machines", "urgent for the release on friday", ""]  # fmt: skip


def support_tickets(rows: int, seed: int) -> list[str]:
    """A corpus from another domain than product reviews: IT support tickets."""
    rng = random.Random(seed)
    return [
        f"{rng.choice(TICKET_SUBJECTS)} {rng.choice(TICKET_PROBLEMS)}. {rng.choice(TICKET_ASKS)}".strip()
        for _ in range(rows)
    ]


def reviews(rows: int) -> tuple[list[str], np.ndarray]:
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_demo_text.py"
    spec = importlib.util.spec_from_file_location("make_demo_text", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    records = module.make_reviews(rows=rows, seed=0)
    labels = np.array([CLASSES.index(r["label"]) for r in records], dtype=np.int64)
    return [r["text"] for r in records], labels


@functools.cache
def text_setup() -> tuple[Predictor, TextTokenizer, list[str]]:
    """A review classifier trained on 2,000 reviews, exported with 1,000 more as its
    validation split; returns its predictor, tokenizer and 1,500 held-out reviews."""
    torch.set_num_threads(1)
    texts, labels = reviews(4500)
    tokenizer = TextTokenizer.train(
        texts[:2000], TokenizerSettings(kind="bpe", vocab_size=1500), MAX_LENGTH, "max_length"
    )
    ids = tokenizer.encode(texts[:3000])
    torch.manual_seed(0)
    net = BagOfEmbeddings(tokenizer.tokenizer.get_vocab_size(), 2, tokenizer.pad_id, MAX_LENGTH,
                          embed_dim=32, hidden_dim=32)  # fmt: skip
    optimizer = torch.optim.Adam(net.parameters(), lr=5e-3)
    x, y = torch.from_numpy(ids[:2000]), torch.from_numpy(labels[:2000])
    net.train()
    for _ in range(4):
        for batch in torch.randperm(2000).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
            optimizer.step()
    spec = {"kind": "text", "tokenizer_json": tokenizer.to_json(), "max_length": MAX_LENGTH,
            "pad_id": tokenizer.pad_id}  # fmt: skip
    out = Path(tempfile.mkdtemp(prefix="cycleml-monitoring-text-")) / "reviews"
    export_bundle(net.eval(), spec, CLASSES, out, val_inputs=ids[2000:3000],
                  val_labels=labels[2000:3000], name="reviews", version="1")  # fmt: skip
    predictor = Predictor(out, providers=["CPUExecutionProvider"], intra_op_threads=1)
    return predictor, tokenizer, texts[3000:]


def drift_rate(texts: list[str], windows: int, seed: int) -> float:
    predictor, _, _ = text_setup()
    bundle = load_bundle(predictor.bundle.path)
    ids = predictor.preprocess_texts(texts)
    probabilities, embeddings = predictor.run_with_embedding(ids)
    rows = logged_from_records(records_from_batch(
        model="reviews", version="1", kind="text", class_names=CLASSES,
        request_ids=[str(i) for i in range(len(texts))], inputs=ids,
        probabilities=probabilities, embeddings=embeddings, pad_id=bundle.meta.preprocess.pad_id,
    ))  # fmt: skip
    reference = load_reference_sample(bundle)
    rng = np.random.default_rng(seed)
    drifted = []
    for index in range(windows):
        window = Window(index, None, None, rows.take(rng.choice(len(texts), WINDOW)))
        result = evaluate_window(window, reference, bundle.meta, DriftSettings(), rng)
        drifted.append(result["drift"])
    return float(np.mean(drifted))


def test_text_bundle_has_an_embedding_of_the_penultimate_features():
    predictor, _, _ = text_setup()
    meta = predictor.bundle.meta
    assert meta.embedding["dim"] <= 32 and meta.embedding["source_dim"] == 32
    assert meta.verification["embedding_parity"]["passed"]
    assert set(load_reference_sample(predictor.bundle).features) == {"length", "confidence"}


def test_a_corpus_from_another_domain_is_detected():
    rate = drift_rate(support_tickets(1500, seed=1), windows=20, seed=2)
    print(f"power, support tickets vs reviews: {rate:.3f}")
    assert rate >= 0.9


def test_held_out_reviews_raise_few_alarms():
    _, _, held_out = text_setup()
    rate = drift_rate(held_out, windows=20, seed=3)
    print(f"false alarms, held-out reviews: {rate:.3f}")
    assert rate <= 0.15  # binomial(20, 0.05): 3 or more alarms has probability 0.08
