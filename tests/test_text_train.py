"""Text classification end to end: train each text model, evaluate, and the demo target."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from cycleml.models.module import ClassifierModule
from cycleml.training.evaluate import evaluate
from cycleml.training.train import build_datamodule, train

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_demo_text.py"


def load_demo_script():
    spec = importlib.util.spec_from_file_location("make_demo_text", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reviews(tmp_path_factory) -> Path:
    demo = load_demo_script()
    return demo.write_table(demo.make_reviews(rows=600), tmp_path_factory.mktemp("text") / "r.csv")


def text_cfg(make_cfg, reviews: Path, *overrides: str, fast: bool = True):
    return make_cfg(
        "train", "experiment=text_sentiment", f"data.path={reviews}", *overrides, fast=fast
    )


@pytest.mark.parametrize("model", ["textcnn", "embedding_bag", "transformer"])
def test_each_text_model_trains_and_rebuilds_from_its_checkpoint(make_cfg, reviews, model):
    extra = ["model.net.d_model=32", "model.net.ff_dim=64"] if model == "transformer" else []
    cfg = text_cfg(make_cfg, reviews, f"model={model}", *extra)
    metrics = train(cfg)
    assert {"test/acc", "test/f1", "val/acc", "val/precision", "val/recall"} <= set(metrics)
    summary = json.loads((Path(cfg.paths.output_dir) / "summary.json").read_text())
    module = ClassifierModule.from_checkpoint(summary["best_checkpoint"])
    spec = module.hparams.data_spec
    assert spec["kind"] == "text" and spec["max_length"] == 48 and spec["pad_id"] == 0
    assert module.hparams.class_names == ["negative", "positive"]
    # the network rebuilt from the checkpoint alone scores what training's test scored
    correct = total = 0
    with torch.no_grad():
        for ids, labels in build_datamodule(cfg).test_dataloader():
            correct += int((module(ids).argmax(1) == labels).sum())
            total += len(labels)
    assert correct / total == pytest.approx(summary["metrics"]["test/acc"], abs=1e-6)


def test_eval_of_a_text_run_writes_report_matrix_and_worst_texts(make_cfg, reviews, tmp_path):
    cfg = text_cfg(make_cfg, reviews, "trainer.limit_train_batches=4")
    train(cfg)
    eval_cfg = make_cfg("eval", f"ckpt_path={cfg.paths.output_dir}", "num_errors=5")
    eval_cfg.paths.output_dir = str(tmp_path / "eval")
    metrics = evaluate(eval_cfg)
    out = tmp_path / "eval"
    summary = json.loads((Path(cfg.paths.output_dir) / "summary.json").read_text())
    assert metrics["test/acc"] == pytest.approx(summary["metrics"]["test/acc"], abs=1e-6)
    report = list(csv.DictReader((out / "per_class_report.csv").open()))
    assert [r["class"] for r in report] == ["negative", "positive"]
    with Image.open(out / "confusion_matrix.png") as image:
        assert image.size[0] > 100
    worst = list(csv.DictReader((out / "worst_errors.csv").open()))
    test_texts = build_datamodule(cfg).split_texts("test")
    wrong = round((1 - metrics["test/acc"]) * len(test_texts))
    assert len(worst) == min(5, wrong)
    table = list(csv.DictReader(reviews.open()))  # no id column: the id is the data row
    for row in worst:
        assert row["true_label"] != row["predicted_label"]
        assert row["text"] == table[int(row["id"]) - 1]["text"]
        assert row["true_label"] == table[int(row["id"]) - 1]["label"]
    confidences = [float(r["confidence"]) for r in worst]
    assert confidences == sorted(confidences, reverse=True)


@pytest.mark.slow
def test_text_sentiment_experiment_reaches_the_target(make_cfg, tmp_path):
    """The full demo: 6,000 reviews, default experiment settings, >= 0.90 test accuracy."""
    demo = load_demo_script()
    data = demo.write_table(demo.make_reviews(), tmp_path / "reviews.csv")
    metrics = train(text_cfg(make_cfg, data, "callbacks.progress_bar=null", fast=False))
    assert metrics["test/acc"] >= 0.90
