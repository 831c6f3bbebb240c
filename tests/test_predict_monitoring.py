"""`cycleml predict` with the prediction log on: one log record per prediction."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from PIL import Image

from cycleml.batch.runner import PredictSettings, log_request_id, predict_to_database
from cycleml.errors import CycleMLError
from cycleml.inference import load_bundle
from cycleml.monitoring.log import PredictionLog
from test_export_support import cached_bundle, synthetic_images
from test_predict_support import stored
from test_serving_support import free_port

SETTINGS = PredictSettings(batch_size=4, decode_workers=0, progress=False, intra_op_threads=1)


def _image_folder(tmp_path: Path, count: int, seed: int) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    for i, image in enumerate(synthetic_images(count, seed=seed)[0]):
        Image.fromarray(image).save(root / f"{i:02d}.png")
    return root


def test_predict_logs_each_prediction(tmp_path: Path) -> None:
    root = _image_folder(tmp_path, 10, seed=7)
    url = f"sqlite:///{tmp_path / 'p.db'}"
    log_url = f"sqlite:///{tmp_path / 'monitoring.db'}"
    settings = dataclasses.replace(SETTINGS, monitoring_db_url=log_url)
    bundle = load_bundle(cached_bundle("image"))
    summary = predict_to_database(bundle, root, url, settings)
    assert summary.written == 10
    rows, _ = stored(url, "tiny-image")
    logged = PredictionLog(log_url).read("tiny-image", "1")
    by_id = dict(zip(logged.request_ids, logged.predicted_label, strict=True))
    assert by_id == {log_request_id("tiny-image", "1", k): r["label"] for k, r in rows.items()}
    assert "brightness" in logged.features and "confidence" in logged.features
    # the bundle's embedding output, asked for in the same run
    assert logged.embedding is not None
    assert logged.embedding.shape == (10, bundle.meta.embedding["dim"])
    # a rerun skips what is predicted and logs nothing twice
    again = predict_to_database(bundle, root, url, settings)
    assert again.skipped == 10
    assert len(PredictionLog(log_url).read("tiny-image", "1")) == 10


def test_predict_without_the_log_writes_none(tmp_path: Path) -> None:
    root = _image_folder(tmp_path, 1, seed=8)
    predict_to_database(cached_bundle("image"), root, f"sqlite:///{tmp_path / 'p.db'}", SETTINGS)
    assert not (tmp_path / "monitoring.db").exists()


def test_an_unwritable_log_stops_the_run_before_it_starts(tmp_path: Path) -> None:
    root = _image_folder(tmp_path, 1, seed=9)
    # nothing listens on this port
    log_url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test"
    settings = dataclasses.replace(SETTINGS, monitoring_db_url=log_url)
    with pytest.raises(CycleMLError):
        predict_to_database(
            cached_bundle("image"), root, f"sqlite:///{tmp_path / 'p.db'}", settings
        )
    rows, _ = stored(f"sqlite:///{tmp_path / 'p.db'}", "tiny-image")
    assert rows == {}
