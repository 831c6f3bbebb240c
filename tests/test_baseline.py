"""Classical baselines: same split and metrics as the deep models, one compare table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import joblib
import numpy as np
import pytest

from cycleml.errors import ConfigError
from cycleml.models.baselines import SklearnBaseline, linear_svm, logistic_regression
from cycleml.training.baseline import build_baseline, score
from cycleml.training.compare import collect_runs
from cycleml.training.train import build_datamodule, train

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_demo_text.py"
METRICS = {f"{s}/{m}" for s in ("val", "test") for m in ("acc", "precision", "recall", "f1")}


@pytest.fixture(scope="module")
def reviews(tmp_path_factory) -> Path:
    spec = importlib.util.spec_from_file_location("make_demo_text", SCRIPT)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo.write_table(demo.make_reviews(rows=600), tmp_path_factory.mktemp("text") / "r.csv")


def run_in(cfg, folder: Path):
    cfg.paths.output_dir = str(folder)
    return cfg


def test_baseline_and_deep_model_share_split_and_appear_in_one_table(
    make_cfg, reviews, tmp_path, monkeypatch
):
    overrides = ("experiment=text_sentiment", f"data.path={reviews}")
    deep_cfg = run_in(make_cfg("train", *overrides), tmp_path / "logs" / "deep")
    base_cfg = run_in(make_cfg("train", *overrides, "model=logreg"), tmp_path / "logs" / "logreg")

    deep_data, base_data = build_datamodule(deep_cfg), build_datamodule(base_cfg)
    for split in ("train", "val", "test"):
        assert deep_data.split_ids(split) == base_data.split_ids(split)

    seen: dict[str, list] = {}
    fit = SklearnBaseline.fit

    def recording_fit(self, kind, inputs, labels):
        seen.update(kind=kind, inputs=list(inputs), labels=labels.tolist())
        return fit(self, kind, inputs, labels)

    monkeypatch.setattr(SklearnBaseline, "fit", recording_fit)
    base_metrics = train(base_cfg)
    deep_metrics = train(deep_cfg)
    # the baseline fitted on exactly the deep model's training texts and labels
    assert seen["kind"] == "text"
    assert seen["inputs"] == deep_data.split_texts("train")
    assert seen["labels"] == deep_data.split_labels("train").tolist()

    assert set(base_metrics) >= METRICS and set(deep_metrics) >= METRICS
    assert base_metrics["test/acc"] > 0.6  # 420 training texts; 0.97 on the full demo
    summary = json.loads((tmp_path / "logs" / "logreg" / "summary.json").read_text())
    assert summary["baseline"] == "logreg"
    assert summary["split_sizes"] == {
        s: len(deep_data.split_ids(s)) for s in summary["split_sizes"]
    }
    saved = joblib.load(summary["best_checkpoint"])
    assert saved["class_names"] == ["negative", "positive"]
    assert saved["baseline"].predict(["I loved this phone."]).tolist() == [1]

    rows = {row["model"]: row for row in collect_runs(tmp_path / "logs")}
    assert set(rows) == {"logistic_regression", "TextCNN"}
    assert rows["logistic_regression"]["fingerprint"] == rows["TextCNN"]["fingerprint"]
    assert rows["logistic_regression"]["test/acc"] == pytest.approx(base_metrics["test/acc"])


def test_image_baseline_on_digits_pixels(make_cfg, tmp_path):
    metrics = train(make_cfg("train", "model=logreg"))
    assert metrics["test/acc"] > 0.9
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["model"] == "logistic_regression" and summary["data"] == "DigitsDataModule"


def test_linear_svm_on_text(make_cfg, reviews, tmp_path):
    cfg = make_cfg("train", "experiment=text_sentiment", f"data.path={reviews}", "model=linear_svm")
    metrics = train(cfg)
    assert metrics["val/acc"] > 0.6
    assert metrics["val/acc_best"] == metrics["val/acc"]


def test_metrics_match_the_lightning_definitions():
    """Accuracy is micro, precision/recall/F1 macro; a class never seen is left out."""
    predictions = np.array([0, 0, 1, 1, 1, 2])
    labels = np.array([0, 1, 1, 1, 2, 2])
    values = score(predictions, labels, num_classes=4, prefix="val")
    assert values["val/acc"] == pytest.approx(4 / 6)
    # per class precision 1/2, 2/3, 1 and recall 1, 2/3, 1/2: class 3 has no items at all
    assert values["val/precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert values["val/recall"] == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)


def test_scores_are_row_distributions():
    texts = ["good film", "great food", "bad film", "awful food"] * 5
    labels = np.array([1, 1, 0, 0] * 5)
    for factory in (logistic_regression, linear_svm):
        baseline = factory()
        baseline.fit("text", texts, labels)
        scores = baseline.scores(["good food", "bad food"])
        assert scores.shape == (2, 2)
        np.testing.assert_allclose(scores.sum(axis=1), 1.0)
        assert scores.argmax(axis=1).tolist() == [1, 0]


def test_baseline_config_errors(make_cfg):
    cfg = make_cfg("train", "model=logreg", "+model.tfidf.bogus=1")
    with pytest.raises(ConfigError, match="model.tfidf"):
        build_baseline(cfg.model, seed=0)
    cfg = make_cfg("train", "model=cnn", "+model.baseline=true")
    with pytest.raises(ConfigError, match="baselines factory"):
        build_baseline(cfg.model, seed=0)
    with pytest.raises(ConfigError, match="unknown data kind"):
        logistic_regression().fit("audio", np.zeros((2, 3)), np.array([0, 1]))


def four_topics(path: Path, rows: int = 240) -> Path:
    """A multi-class table: the demo reviews relabelled by the topic word they mention."""
    spec = importlib.util.spec_from_file_location("make_demo_text", SCRIPT)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    topics = ["sports", "science", "business", "travel"]
    records = [
        {**r, "text": f"{topics[i % 4]} news: {r['text']}", "label": topics[i % 4]}
        for i, r in enumerate(demo.make_reviews(rows=rows))
    ]
    return demo.write_table(records, path)


@pytest.mark.parametrize("model", ["logreg", "embedding_bag"])
def test_text_sentiment_experiment_runs_on_multi_class_data(make_cfg, tmp_path, caplog, model):
    """The binary recipe's label flip is skipped (deep model) or never built (baseline)."""
    table = four_topics(tmp_path / "topics.csv")
    cfg = make_cfg("train", "experiment=text_sentiment", f"data.path={table}", f"model={model}")
    with caplog.at_level("INFO"):
        metrics = train(cfg)
    assert metrics["val/acc"] > 0.3, metrics  # four classes: chance is 0.25
    flip_skipped = "NegationFlip flips a binary label and the data has 4 classes" in caplog.text
    assert flip_skipped == (model != "logreg")


def test_the_text_experiment_runs_on_any_text_table_beside_its_baseline(make_cfg, tmp_path):
    table = four_topics(tmp_path / "topics.csv")
    deep_cfg = make_cfg("train", "experiment=text", f"data.path={table}")
    # n-grams of word pieces as features, no augmentation: a fair match for TF-IDF n-grams
    assert deep_cfg.model.net.kernel_sizes and not deep_cfg.augment.transforms
    deep = train(run_in(deep_cfg, tmp_path / "deep"))
    baseline = train(
        run_in(
            make_cfg("train", "experiment=text", f"data.path={table}", "model=logreg"),
            tmp_path / "lr",
        )
    )
    assert deep["val/acc"] > 0.3 and baseline["val/acc"] > 0.3, (deep, baseline)
