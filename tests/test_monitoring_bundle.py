"""The bundle side of monitoring: the embedding output, its parity, the reference
sample, the calibration, and bundles exported before them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from cycleml.errors import BundleError
from cycleml.inference import Predictor, load_bundle
from cycleml.monitoring.calibration import calibrate, fit_temperature
from cycleml.monitoring.reference import load_reference_sample
from test_monitoring_support import bundle_before_monitoring, digits, digits_bundle


def test_embedding_is_a_second_output_and_probabilities_stay_the_default():
    bundle = load_bundle(digits_bundle())
    graph = onnx.load(str(bundle.model_path)).graph
    assert [o.name for o in graph.output] == ["probabilities", "embedding"]
    assert bundle.meta.embedding["output"] == "embedding"
    assert bundle.meta.embedding["dim"] <= 32
    assert bundle.meta.verification["embedding_parity"]["passed"]
    predictor = Predictor(bundle, providers=["CPUExecutionProvider"], intra_op_threads=1)
    images, _ = digits().val
    probabilities = predictor.run(images[:50])
    both, embedding = predictor.run_with_embedding(images[:50])
    assert probabilities.shape == (50, 10)
    np.testing.assert_array_equal(probabilities, both)
    # the reference sample holds the same embeddings for the validation rows
    reference = load_reference_sample(bundle)
    np.testing.assert_allclose(embedding, reference.embedding[:50], atol=1e-4)
    assert predictor.run_with_embedding(images[:0])[1].shape == (0, embedding.shape[1])


def test_a_bundle_from_before_monitoring_loads_and_has_no_embedding(tmp_path):
    old = bundle_before_monitoring(tmp_path / "old")
    bundle = load_bundle(old)
    assert load_reference_sample(bundle) is None
    predictor = Predictor(bundle, providers=["CPUExecutionProvider"], intra_op_threads=1)
    probabilities, embedding = predictor.run_with_embedding(digits().val[0][:3])
    assert probabilities.shape == (3, 10) and embedding is None


def test_a_missing_reference_file_or_bad_temperature_is_named(tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(digits_bundle(), broken)
    (broken / "monitoring_reference.npz").unlink()
    with pytest.raises(BundleError, match="missing its monitoring reference"):
        load_bundle(broken)
    shutil.copy(digits_bundle() / "monitoring_reference.npz", broken)
    meta = json.loads((broken / "bundle.json").read_text())
    meta["calibration"]["temperature"] = -1
    (broken / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="temperature must be a positive number"):
        load_bundle(broken)


def test_temperature_scaling_fixes_an_overconfident_model():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=4000)
    logits = rng.normal(size=(4000, 4))
    logits[np.arange(4000), labels] += 1.0
    true_probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    overconfident = calibrate(true_probabilities, 0.4)  # logits sharpened 2.5x
    # labels drawn from the true probabilities: the fitted temperature undoes the 0.4
    drawn = np.array([rng.choice(4, p=p) for p in true_probabilities])
    fitted = fit_temperature(overconfident, drawn)
    assert fitted["temperature"] == pytest.approx(2.5, rel=0.15)
    assert fitted["nll_after"] < fitted["nll_before"]
