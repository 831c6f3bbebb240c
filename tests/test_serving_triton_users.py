"""Triton and KServe users, as they are: tritonclient's statistics and text inputs,
precision variants, the error shape of every route, and a server that cannot serve
anything saying so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from cycleml.errors import ConfigError
from cycleml.inference import Predictor, load_bundle
from test_serving_support import (  # noqa: F401 - the *_fixture names register fixtures
    RunningServer,
    binary_body,
    copy_version,
    free_port,
    image_bundle_fixture,
    settings,
    text_bundle_fixture,
)


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, image_bundle: Path, text_bundle: Path
) -> RunningServer:
    repository = tmp_path_factory.mktemp("triton-users")
    for bundle, model in ((image_bundle, "shapes"), (text_bundle, "topics")):
        copy_version(bundle, repository, model, "1")
    with RunningServer(settings(repository)) as running:
        yield running


def test_tritonclient_reads_inference_statistics(server: RunningServer) -> None:
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    before = client.get_inference_statistics("shapes")["model_stats"][0]
    pixels = np.zeros((2, 8, 8, 3), np.uint8)
    tensor = triton.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=True)
    for _ in range(3):
        client.infer("shapes", [tensor])
    stats = client.get_inference_statistics("shapes")["model_stats"]
    assert [(s["name"], s["version"]) for s in stats] == [("shapes", "1")]
    after = stats[0]
    success = after["inference_stats"]["success"]
    assert success["count"] - before["inference_stats"]["success"]["count"] == 3
    assert success["ns"] > 0 and after["inference_stats"]["compute_infer"]["ns"] > 0
    assert after["inference_count"] - before["inference_count"] == 6  # rows
    assert after["execution_count"] - before["execution_count"] == 3  # batches
    assert after["last_inference"] > 0
    assert any(b["batch_size"] == 2 for b in after["batch_stats"])
    version = client.get_inference_statistics("shapes", "1")["model_stats"]
    assert version[0]["version"] == "1"
    every = client.get_inference_statistics()["model_stats"]
    assert [(s["name"], s["version"]) for s in every] == [("shapes", "1"), ("topics", "1")]
    with pytest.raises(InferenceServerException, match="not served"):
        client.get_inference_statistics("nosuch")


def test_unknown_routes_and_methods_answer_the_error_shape(server: RunningServer) -> None:
    for method, path, status in (
        ("GET", "/docs", 404),
        ("GET", "/no/such/route", 404),
        ("DELETE", "/v2/health/live", 405),
    ):
        response = httpx.request(method, f"{server.url}{path}")
        assert response.status_code == status, response.text
        assert set(response.json()) == {"error"}, response.text
    assert httpx.get(f"{server.url}/openapi.json").status_code == 200


@pytest.mark.parametrize("broken", [False, True])
def test_serve_without_a_loadable_model_exits_with_the_reason(
    tmp_path: Path, image_bundle: Path, broken: bool
) -> None:
    repository = tmp_path / "models"
    repository.mkdir()
    if broken:
        version = copy_version(image_bundle, repository, "shapes", "1")
        (version / "model.onnx").write_bytes(b"not a model")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cycleml.serving.cli",
            f"path={repository}",
            f"port={free_port()}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "no model could be loaded" in result.stderr and "Traceback" not in result.stderr
    assert ("shapes: version 1" if broken else "no model bundles found") in result.stderr


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_sends_texts_to_a_text_model(
    server: RunningServer, text_bundle: Path, binary: bool
) -> None:
    texts = ["the team scored a goal", "vote on the law"]
    expected = Predictor(load_bundle(text_bundle)).predict_texts(texts)
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    inputs = client.get_model_metadata("topics")["inputs"]
    assert {"name": "text", "datatype": "BYTES", "shape": [-1]} in inputs
    assert inputs[0]["name"] == "input_ids"
    tensor = triton.InferInput("text", [2, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[t] for t in texts], dtype=object), binary_data=binary)
    result = client.infer("topics", [tensor])
    probabilities = result.as_numpy("probabilities")
    np.testing.assert_allclose(
        probabilities, np.stack([p.probabilities for p in expected]), atol=1e-6
    )


def test_bytes_inputs_are_checked(server: RunningServer) -> None:
    def infer(model: str, tensor: dict) -> httpx.Response:
        return httpx.post(f"{server.url}/v2/models/{model}/infer", json={"inputs": [tensor]})

    text = {"name": "text", "datatype": "BYTES", "shape": [1]}
    for tensor, words in (
        ({**text, "data": [7]}, "its 'data' must hold strings"),
        ({**text, "data": ["   "]}, "text #0 is empty"),
        ({**text, "shape": [1, 2], "data": ["a", "b"]}, "one text per row"),
        ({**text, "name": "words", "data": ["goal"]}, "or 'text' (BYTES)"),
    ):
        response = infer("topics", tensor)
        assert response.status_code == 400 and words in response.json()["error"], response.text
    image = infer("shapes", {**text, "data": ["goal"]})
    assert image.status_code == 400 and "takes no BYTES input" in image.json()["error"]


@pytest.fixture(scope="module")
def variant_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 8x8 image bundle exported with its int8 and fp16 variants."""
    import torch  # the training side, only where a bundle is made
    from torch import nn

    from cycleml.export import export_bundle
    from cycleml.export.exporter import ExportSettings

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("variants") / "shapes"
    export_bundle(
        net,
        {
            "kind": "image",
            "image_size": [8, 8],
            "channels": 3,
            "mean": [0.5] * 3,
            "std": [0.25] * 3,
        },
        ["cat", "dog", "bird"],
        out,
        val_inputs=rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8),
        val_labels=rng.integers(0, 3, 16),
        name="shapes",
        version="1",
        settings=ExportSettings(quantize="int8", fp16=True, max_accuracy_drop=1.0, force=True),
    )
    return out


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_a_precision_variant_is_served_as_configured(variant_bundle: Path, precision: str) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    expected = Predictor(load_bundle(variant_bundle), precision=precision).run(pixels)
    fp32 = Predictor(load_bundle(variant_bundle)).run(pixels)
    body, headers = binary_body(pixels)
    with RunningServer(settings(variant_bundle, precision={"shapes": precision})) as running:
        meta = httpx.get(f"{running.url}/v2/models/shapes").json()
        response = httpx.post(
            f"{running.url}/v2/models/shapes/infer", content=body, headers=headers
        )
    assert meta["parameters"]["precision"] == precision
    assert meta["parameters"]["precisions"] == ["fp32", "fp16", "int8"]
    length = int(response.headers["inference-header-content-length"])
    served = np.frombuffer(response.content[length:], np.float32).reshape(2, -1)
    np.testing.assert_allclose(served, expected, atol=1e-6)
    if precision == "int8":
        assert not np.allclose(served, fp32, atol=1e-6)  # the variant, not the fp32 model


def test_an_unknown_precision_is_a_config_error(variant_bundle: Path) -> None:
    with pytest.raises(ConfigError, match=r"precision\['shapes'\] must be one of fp32, int8, fp16"):
        settings(variant_bundle, precision={"shapes": "int4"})
