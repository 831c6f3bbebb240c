"""Hostile clients on loopback: one client's bad input, keyless or slow bodies, huge
images and texts, and made-up model names must not hurt anybody else."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from cycleml.serving.loadgen import build_request, closed_loop, summarize
from cycleml.serving.served_model import ServedModel
from test_serving_support import (  # noqa: F401 - the *_fixture names register fixtures
    RunningServer,
    binary_body,
    copy_version,
    image_bundle_fixture,
    settings,
    text_bundle_fixture,
)

TEXT_MAX_LENGTH = 6  # export_text_bundle's default


def _ids_request(port: int, ids: np.ndarray) -> bytes:
    body, headers = binary_body(ids, name="input_ids", datatype="INT64")
    return build_request("127.0.0.1", port, "POST", "/v2/models/topics/infer", body, headers)


def _poison_under_load(port: int, bad_ids: tuple[int, ...] = (10**9, -3)) -> tuple[list, list]:
    """16 clients send valid token ids while two more send out-of-range ones."""
    rng = np.random.default_rng(0)
    valid = [
        _ids_request(port, rng.integers(0, 10, (rows, TEXT_MAX_LENGTH), dtype=np.int64))
        for rows in (1, 2, 3, 1)
    ]
    poison = [
        _ids_request(port, np.array([[2, 3, bad, 4, 5, 6]], dtype=np.int64)) for bad in bad_ids
    ]

    async def scenario() -> tuple[list, list]:
        return await asyncio.gather(
            closed_loop("127.0.0.1", port, valid, 16, 2.0),
            closed_loop("127.0.0.1", port, poison, 2, 2.0),
        )

    return asyncio.run(scenario())


@pytest.fixture
def text_server(tmp_path: Path, text_bundle: Path) -> RunningServer:
    copy_version(text_bundle, tmp_path / "models", "topics", "1")
    serve = settings(
        tmp_path / "models",
        runtime={"intra_op_threads": 1},
        batching={"max_batch_size": 32, "max_queue_delay_ms": 5.0},
    )
    with RunningServer(serve) as running:
        yield running


def test_out_of_range_token_ids_fail_only_their_own_request(text_server: RunningServer) -> None:
    others, poison = _poison_under_load(text_server.port)
    assert summarize(others)["errors"] == 0, summarize(others)
    assert {r.status for r in others} == {200} and len(others) > 50
    assert poison and {r.status for r in poison} == {400}, summarize(poison)


def test_a_batch_the_runtime_refuses_is_rerun_one_by_one(
    text_server: RunningServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # without the range check the ids reach ONNX Runtime, which fails the whole batch
    # (a negative id it would take as counting from the end, so only a large one here)
    monkeypatch.setattr(ServedModel, "_check_token_ids", lambda self, array: None)
    with caplog.at_level(logging.WARNING, logger="cycleml.serving.batcher"):
        others, poison = _poison_under_load(text_server.port, bad_ids=(10**9,))
    assert "one by one" in caplog.text  # the poison shared batches with other requests
    assert {r.status for r in others} == {200}, summarize(others)
    assert poison and {r.status for r in poison} == {400}, summarize(poison)


def test_token_id_errors_name_the_input_and_the_value(text_server: RunningServer) -> None:
    import httpx

    for bad in (10**9, -3):
        ids = np.array([[2, 3, bad, 4, 0, 0]], dtype=np.int64)
        body, headers = binary_body(ids, name="input_ids", datatype="INT64")
        response = httpx.post(
            f"{text_server.url}/v2/models/topics/infer", content=body, headers=headers
        )
        assert response.status_code == 400
        error = json.loads(response.content)["error"]
        assert f"input 'input_ids' has token id {bad}" in error and "[0, 10)" in error
