"""A version that fails to load never retires the version that works: the model keeps
serving it, reports the failure, and the watch tries the broken version again only once
its files change."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from cycleml.serving.metrics import ServingMetrics
from cycleml.serving.repository import ModelRepository
from test_serving_support import (  # noqa: F401 - the *_fixture names register fixtures
    IMAGE_SIZE,
    RunningServer,
    binary_body,
    copy_version,
    image_bundle_fixture,
    image_bundle_v2_fixture,
    settings,
)


def _truncate_model(folder: Path) -> None:
    model = folder / "model.onnx"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])


def _invalid_json(folder: Path) -> None:
    (folder / "bundle.json").write_text('{"format_version": 1, "kind": ')


def _unknown_format(folder: Path) -> None:
    meta = json.loads((folder / "bundle.json").read_text())
    meta["format_version"] = 99
    (folder / "bundle.json").write_text(json.dumps(meta))


BREAKAGES = {
    "truncated model.onnx": (_truncate_model, "model.onnx"),
    "invalid bundle.json": (_invalid_json, "bundle.json"),
    "unknown format_version": (_unknown_format, "format_version"),
}


def copy_broken_version(bundle: Path, repository: Path, model: str, version: str, how: str) -> Path:
    """Place a copy of ``bundle`` broken in the way ``how`` names, atomically."""
    staging = repository / model / f".{version}.broken"
    shutil.copytree(bundle, staging)
    BREAKAGES[how][0](staging)
    target = repository / model / version
    staging.rename(target)
    return target


def _watch_settles(repository: ModelRepository) -> None:
    """Two watch steps: a new folder is seen, then (unchanged) loaded."""
    repository.poll()
    repository.poll()


def _failures(metrics: ServingMetrics, version: str) -> float:
    value = metrics.registry.get_sample_value(
        "cycleml_model_load_failures_total", {"model": "shapes", "version": version}
    )
    return value or 0.0


@pytest.mark.parametrize("how", list(BREAKAGES))
def test_broken_new_version_keeps_the_old_one_serving(
    tmp_path: Path,
    image_bundle: Path,
    image_bundle_v2: Path,
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    root = tmp_path / "models"
    copy_version(image_bundle, root, "shapes", "1")
    metrics = ServingMetrics()
    repository = ModelRepository(settings(root), metrics)
    caplog.set_level(logging.ERROR, logger="cycleml.serving.repository")
    try:
        repository.load_all()
        broken = copy_broken_version(image_bundle_v2, root, "shapes", "2", how)
        _watch_settles(repository)  # tried, fails
        assert repository.versions("shapes") == ["1"]
        assert repository.get("shapes").version == "1"
        assert repository.ready
        assert "cannot load model shapes version 2" in caplog.text
        assert _failures(metrics, "2") == 1
        reason = repository.failure_reason("shapes")
        assert reason is not None and reason.startswith("version 2 failed to load")
        assert BREAKAGES[how][1] in reason
        index = {(e["name"], e["version"]): e for e in repository.index()}
        assert index[("shapes", "1")]["state"] == "READY"
        assert index[("shapes", "2")]["state"] == "UNAVAILABLE"
        assert BREAKAGES[how][1] in index[("shapes", "2")]["reason"]

        for _ in range(3):  # the same broken files are not tried again
            repository.poll()
        assert _failures(metrics, "2") == 1
        assert repository.versions("shapes") == ["1"]

        # fixed in place: the watch sees new files and the repaired version takes over
        shutil.rmtree(broken)
        copy_version(image_bundle_v2, root, "shapes", "2")
        _watch_settles(repository)
        assert repository.versions("shapes") == ["2"]
        assert repository.failure_reason("shapes") is None
        assert all(e["state"] == "READY" for e in repository.index())
    finally:
        repository.close()


def test_broken_version_loaded_through_the_api_keeps_the_old_one(
    tmp_path: Path, image_bundle: Path, image_bundle_v2: Path
) -> None:
    root = tmp_path / "models"
    copy_version(image_bundle, root, "shapes", "1")
    pixels = np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    body, headers = binary_body(pixels)
    with (
        RunningServer(settings(root)) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
    ):
        copy_broken_version(image_bundle_v2, root, "shapes", "2", "truncated model.onnx")
        loaded = http.post("/v2/repository/models/shapes/load")
        assert loaded.status_code == 400
        message = loaded.json()["error"]
        assert "version 2" in message and "still serving version(s) 1" in message

        answer = http.post("/v2/models/shapes/infer", content=body, headers=headers)
        assert answer.status_code == 200
        length = int(answer.headers["inference-header-content-length"])
        assert json.loads(answer.content[:length])["model_version"] == "1"
        ready = http.get("/v2/models/shapes/ready")
        assert ready.status_code == 200
        assert ready.json()["version"] == "1"
        assert ready.json()["reason"].startswith("version 2 failed to load")
        assert http.get("/v2/health/ready").status_code == 200
        index = http.post("/v2/repository/index").json()
        assert {(e["version"], e["state"]) for e in index} == {
            ("1", "READY"),
            ("2", "UNAVAILABLE"),
        }
        metrics = http.get("/metrics").text
        assert 'cycleml_model_load_failures_total{model="shapes",version="2"} 1.0' in metrics


def test_start_up_with_a_broken_newest_version_serves_the_newest_that_loads(
    tmp_path: Path, image_bundle: Path, image_bundle_v2: Path
) -> None:
    root = tmp_path / "models"
    copy_version(image_bundle, root, "shapes", "1")
    copy_version(image_bundle_v2, root, "shapes", "2")
    broken = copy_broken_version(image_bundle_v2, root, "shapes", "3", "unknown format_version")
    repository = ModelRepository(settings(root), ServingMetrics())
    try:
        repository.load_all()
        assert repository.versions("shapes") == ["2"]
        assert repository.ready
        assert repository.failure_reason("shapes").startswith("version 3 failed to load")
        _watch_settles(repository)
        assert repository.versions("shapes") == ["2"]
        shutil.rmtree(broken)
        copy_version(image_bundle, root, "shapes", "3")
        _watch_settles(repository)
        assert repository.versions("shapes") == ["3"]
    finally:
        repository.close()
