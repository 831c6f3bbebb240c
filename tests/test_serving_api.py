"""The HTTP API on a real server over loopback, with real exported bundles."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
import socket
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image

from cycleml.inference import Predictor, load_bundle
from test_serving_support import (  # noqa: F401 - the *_fixture names register fixtures
    IMAGE_CLASSES,
    IMAGE_SIZE,
    TEXT_CLASSES,
    RunningServer,
    binary_body,
    copy_version,
    image_bundle_fixture,
    image_bundle_v2_fixture,
    settings,
    slow_bundle_fixture,
    text_bundle_fixture,
    v2_body,
)


@pytest.fixture(scope="module")
def repository(
    tmp_path_factory: pytest.TempPathFactory,
    image_bundle: Path,
    image_bundle_v2: Path,
    text_bundle: Path,
) -> Path:
    root = tmp_path_factory.mktemp("repository")
    copy_version(image_bundle, root, "shapes", "1")
    copy_version(image_bundle_v2, root, "shapes", "2")
    copy_version(text_bundle, root, "topics", "1")
    return root


@pytest.fixture(scope="module")
def server(repository: Path) -> RunningServer:
    with RunningServer(settings(repository, version_policy="all", access_log=True)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


def _pixels(seed: int = 0, rows: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (rows, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- protocol basics -------------------------------------------------------------------------


def test_health_metadata_and_readiness(client: httpx.Client) -> None:
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").json() == {"ready": True}
    server = client.get("/v2").json()
    assert server["name"] == "cycleml" and "binary_tensor_data" in server["extensions"]
    meta = client.get("/v2/models/shapes").json()
    assert meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [
        {"name": "pixels", "datatype": "UINT8", "shape": [-1, IMAGE_SIZE, IMAGE_SIZE, 3]}
    ]
    assert meta["outputs"][0]["shape"] == [-1, len(IMAGE_CLASSES)]
    assert client.get("/v2/models/shapes/versions/1").json()["name"] == "shapes"
    assert client.get("/v2/models/shapes/ready").status_code == 200
    assert client.get("/v2/models/topics/versions/1/ready").json()["ready"] is True
    index = client.post("/v2/repository/index").json()
    assert {(e["name"], e["version"], e["state"]) for e in index} == {
        ("shapes", "1", "READY"),
        ("shapes", "2", "READY"),
        ("topics", "1", "READY"),
    }
    docs = client.get("/openapi.json").json()
    assert "/v2/models/{model_name}/infer" in docs["paths"]
    # no interactive page: it would need Swagger UI from a CDN
    assert client.get("/docs").status_code == 404


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_infer_matches_the_in_process_predictor(
    server: RunningServer, image_bundle_v2: Path, binary: bool
) -> None:
    pixels = _pixels(rows=3)
    expected = Predictor(load_bundle(image_bundle_v2)).run(pixels)
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_ready() and client.is_model_ready("shapes")
    tensor = triton.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    wanted = triton.InferRequestedOutput("probabilities", binary_data=binary)
    result = client.infer("shapes", [tensor], outputs=[wanted], request_id="req-7")
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-6)
    response = result.get_response()
    assert response["model_version"] == "2" and response["id"] == "req-7"
    # a pinned version answers from that version's weights
    pinned = client.infer("shapes", [tensor], model_version="1", outputs=[wanted])
    assert pinned.get_response()["model_version"] == "1"
    assert not np.allclose(pinned.as_numpy("probabilities"), expected)


def test_raw_json_and_binary_bodies(client: httpx.Client) -> None:
    pixels = _pixels(seed=3, rows=2)
    plain = client.post("/v2/models/shapes/infer", json=v2_body(pixels))
    nested = client.post(
        "/v2/models/shapes/infer",
        json={
            "inputs": [
                {
                    "name": "pixels",
                    "datatype": "UINT8",
                    "shape": [2, IMAGE_SIZE, IMAGE_SIZE, 3],
                    "data": pixels.tolist(),
                }
            ]
        },
    )
    body, headers = binary_body(pixels)
    binary = client.post("/v2/models/shapes/infer", content=body, headers=headers)
    assert plain.status_code == nested.status_code == binary.status_code == 200
    from_json = np.asarray(plain.json()["outputs"][0]["data"], np.float32).reshape(2, -1)
    assert nested.json()["outputs"][0]["data"] == plain.json()["outputs"][0]["data"]
    length = int(binary.headers["inference-header-content-length"])
    from_binary = np.frombuffer(binary.content[length:], np.float32).reshape(2, -1)
    np.testing.assert_allclose(from_json, from_binary, atol=1e-7)
    assert binary.headers["content-type"] == "application/octet-stream"


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_request_bodies(
    server: RunningServer, client: httpx.Client, algorithm: str
) -> None:
    pixels = _pixels(seed=9, rows=2)
    triton_client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    tensor = triton.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    plain = triton_client.infer("shapes", [tensor]).as_numpy("probabilities")
    packed = triton_client.infer("shapes", [tensor], request_compression_algorithm=algorithm)
    np.testing.assert_array_equal(packed.as_numpy("probabilities"), plain)


def test_bad_or_oversized_compressed_bodies(slow_server: RunningServer) -> None:
    url = f"{slow_server.url}/v2/models/slow/infer"
    bomb = zlib.compress(b"\0" * (1024 * 1024))  # 1 KiB that inflates past the 64 KiB limit
    too_big = httpx.post(url, content=bomb, headers={"Content-Encoding": "deflate"})
    assert too_big.status_code == 413 and "decompressed" in too_big.json()["error"]
    broken = httpx.post(url, content=b"not gzip", headers={"Content-Encoding": "gzip"})
    assert broken.status_code == 400 and "not valid gzip" in broken.json()["error"]
    other = httpx.post(url, content=b"{}", headers={"Content-Encoding": "br"})
    assert other.status_code == 415 and "'br' is not supported" in other.json()["error"]


# -- convenience endpoint --------------------------------------------------------------------


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_predict_with_an_image_file_in_every_form(
    client: httpx.Client, image_bundle_v2: Path
) -> None:
    pixels = _pixels(seed=5)[0]
    png = _png(pixels)
    predictor = Predictor(load_bundle(image_bundle_v2))
    expected = predictor.predict(predictor.preprocess_image(png)[None])[0]

    raw = client.post(
        "/v1/models/shapes:predict",
        content=png,
        headers={"Content-Type": "image/png", "X-Request-Id": "abc-1"},
    )
    form = client.post("/v1/models/shapes:predict", files={"file": ("x.png", png, "image/png")})
    b64 = client.post(
        "/v1/models/shapes:predict", json={"instances": [{"b64": base64.b64encode(png).decode()}]}
    )
    arrays = client.post(
        "/v1/models/shapes:predict", json={"instances": [pixels.tolist(), pixels.tolist()]}
    )
    for response in (raw, form, b64, arrays):
        assert response.status_code == 200, response.text
        document = response.json()
        assert document["model_name"] == "shapes" and document["model_version"] == "2"
        for prediction in document["predictions"]:
            assert prediction["label"] == expected.label
            assert prediction["confidence"] == pytest.approx(expected.confidence, abs=1e-6)
            assert set(prediction["probabilities"]) == set(IMAGE_CLASSES)
    assert raw.json()["id"] == "abc-1" and raw.headers["x-request-id"] == "abc-1"
    assert len(arrays.json()["predictions"]) == 2
    pinned = client.post(
        "/v1/models/shapes/versions/1:predict", content=png, headers={"Content-Type": "image/png"}
    )
    assert pinned.json()["model_version"] == "1"


def test_predict_with_text(client: httpx.Client, text_bundle: Path, server: RunningServer) -> None:
    predictor = Predictor(load_bundle(text_bundle))
    expected = predictor.predict_texts(["the team scored a goal", "vote on the law"])
    one = client.post("/v1/models/topics:predict", json={"text": "the team scored a goal"})
    many = client.post(
        "/v1/models/topics:predict",
        json={"instances": ["the team scored a goal", "vote on the law"]},
    )
    assert one.status_code == many.status_code == 200
    assert one.json()["predictions"][0]["label"] == expected[0].label
    assert [p["label"] for p in many.json()["predictions"]] == [p.label for p in expected]
    assert set(one.json()["predictions"][0]["probabilities"]) == set(TEXT_CLASSES)
    # the same model over KServe v2 with token ids
    ids = predictor.preprocess_texts(["vote on the law"])
    client_v2 = triton.InferenceServerClient(server.url.removeprefix("http://"))
    tensor = triton.InferInput("input_ids", list(ids.shape), "INT64")
    tensor.set_data_from_numpy(ids)
    result = client_v2.infer("topics", [tensor])
    np.testing.assert_allclose(
        result.as_numpy("probabilities")[0], expected[1].probabilities, atol=1e-6
    )


# -- bad input -------------------------------------------------------------------------------

_GOOD = _pixels()


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "message"),
    [
        (
            "/v2/models/shapes/infer",
            {
                "json": {
                    "inputs": [
                        {
                            "name": "pixels",
                            "datatype": "UINT8",
                            "shape": [1, 4, 4, 3],
                            "data": [0] * 48,
                        }
                    ]
                }
            },
            400,
            "the model expects [-1, 8, 8, 3]",
        ),
        (
            "/v2/models/shapes/infer",
            {
                "json": {
                    "inputs": [
                        {
                            "name": "pixels",
                            "datatype": "FP32",
                            "shape": list(_GOOD.shape),
                            "data": [0.5] * _GOOD.size,
                        }
                    ]
                }
            },
            400,
            "must be UINT8, got FP32",
        ),
        (
            "/v2/models/shapes/infer",
            {
                "json": {
                    "inputs": [
                        {
                            "name": "pixels",
                            "datatype": "UINT8",
                            "shape": list(_GOOD.shape),
                            "data": [1, 2, 3],
                        }
                    ]
                }
            },
            400,
            "has 3 elements but shape",
        ),
        (
            "/v2/models/shapes/infer",
            {
                "json": {
                    "inputs": [
                        {
                            "name": "image",
                            "datatype": "UINT8",
                            "shape": list(_GOOD.shape),
                            "data": _GOOD.reshape(-1).tolist(),
                        }
                    ]
                }
            },
            400,
            "has no input 'image'",
        ),
        (
            "/v2/models/shapes/infer",
            {"json": v2_body(_GOOD, outputs=[{"name": "logits"}])},
            400,
            "has no output 'logits'",
        ),
        (
            "/v2/models/shapes/infer",
            {"json": v2_body(_pixels(rows=40))},
            400,
            "send between 1 and 32",
        ),
        (
            "/v2/models/shapes/infer",
            {"content": b'{"inputs": [', "headers": {"Content-Type": "application/json"}},
            400,
            "not valid JSON",
        ),
        (
            "/v2/models/shapes/infer",
            {"json": v2_body(_GOOD), "headers": {"X-Timeout-Ms": "soon"}},
            400,
            "X-Timeout-Ms must be a number",
        ),
        ("/v2/models/nosuch/infer", {"json": v2_body(_GOOD)}, 404, "model 'nosuch' is not served"),
        (
            "/v2/models/shapes/versions/9/infer",
            {"json": v2_body(_GOOD)},
            404,
            "has no version '9' loaded (loaded: 1, 2)",
        ),
        ("/v2/models/nosuch", {}, 404, "model 'nosuch' is not served"),
        (
            "/v1/models/shapes:predict",
            {"content": b"GIF89a-broken", "headers": {"Content-Type": "image/gif"}},
            400,
            "cannot decode image",
        ),
        ("/v1/models/shapes:predict", {"json": {"text": "hello"}}, 400, "is an image model"),
        (
            "/v1/models/topics:predict",
            {"content": _png(_GOOD[0]), "headers": {"Content-Type": "image/png"}},
            400,
            "is a text model",
        ),
        ("/v1/models/topics:predict", {"json": {"text": "   "}}, 400, "text #0 is empty"),
        (
            "/v1/models/shapes:predict",
            {"json": {"instances": [{"b64": "%%%"}]}},
            400,
            "not valid base64",
        ),
        (
            "/v1/models/shapes:predict",
            {"json": {"pixels": []}},
            400,
            '{"text": "..."} or {"instances": [...]}',
        ),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_problem(
    client: httpx.Client, path: str, kwargs: dict, status: int, message: str
) -> None:
    method = client.get if path == "/v2/models/nosuch" else client.post
    response = method(path, **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_access_log_and_metrics(client: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    def access_lines() -> list[dict]:
        return [
            json.loads(r.getMessage()) for r in caplog.records if r.name == "cycleml.serving.access"
        ]

    with caplog.at_level(logging.INFO, logger="cycleml.serving.access"):
        ok = client.post(
            "/v2/models/shapes/infer",
            json=v2_body(_GOOD),
            headers={"X-Request-Id": "trace-42", "X-Forwarded-For": "203.0.113.7"},
        )
        client.post("/v2/models/shapes/infer", json={"inputs": "nope"})
        # the line is written once the response is sent, so it may trail the response
        for _ in range(200):
            lines = access_lines()
            if len([e for e in lines if e.get("model") == "shapes"]) >= 2:
                break
            time.sleep(0.01)
    assert ok.headers["x-request-id"] == "trace-42"
    line = next(entry for entry in lines if entry["request_id"] == "trace-42")
    assert line["status"] == 200 and line["model"] == "shapes" and line["version"] == "2"
    assert line["batch_rows"] >= 1 and line["latency_ms"] > 0 and "queue_ms" in line
    # the connection's own address, and the one a proxy passed on next to it
    assert line["client"].startswith("127.0.0.1:") and line["forwarded_for"] == "203.0.113.7"
    assert any(entry["status"] == 400 and "error" in entry for entry in lines)

    text = client.get("/metrics").text
    assert _metric(text, "cycleml_requests_total", model="shapes", version="2", status="200") >= 1
    assert _metric(text, "cycleml_requests_total", model="shapes", status="400") >= 1
    for name in (
        "cycleml_request_latency_seconds_count",
        "cycleml_queue_time_seconds_count",
        "cycleml_inference_time_seconds_count",
        "cycleml_batch_size_count",
    ):
        assert _metric(text, name, model="shapes", version="2") >= 1, name
    assert "cycleml_queue_depth{" in text
    assert _metric(text, "cycleml_model_ready", model="topics", version="1") == 1


# -- limits, deadlines, auth -------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_server(slow_bundle: Path) -> RunningServer:
    serve = settings(
        slow_bundle,
        runtime={"instances": 1, "intra_op_threads": 1},  # one instance: HeldInstance holds it
        batching={"max_batch_size": 4, "max_queue_size": 8, "max_queue_delay_ms": 0},
        limits={"max_body_bytes": 64 * 1024},
    )
    with RunningServer(serve) as running:
        yield running


def _slow_request(rows: int = 4) -> tuple[bytes, dict[str, str]]:
    rng = np.random.default_rng(0)
    return binary_body(rng.integers(0, 256, (rows, 32, 32, 3), dtype=np.uint8))


async def _until_queued(url: str) -> None:
    """Wait until the slow model has requests waiting (its instance is busy)."""
    async with httpx.AsyncClient(base_url=url) as http:
        for _ in range(500):
            text = (await http.get("/metrics")).text
            if _metric(text, "cycleml_queue_depth", model="slow") > 0:
                return
            await asyncio.sleep(0.002)
    raise TimeoutError("the slow model never had a queue")


async def _burst(
    url: str, count: int, headers: dict[str, str] | None = None
) -> list[httpx.Response]:
    body, base = _slow_request()
    async with httpx.AsyncClient(
        base_url=url, timeout=60, limits=httpx.Limits(max_connections=count)
    ) as http:
        return list(
            await asyncio.gather(
                *(
                    http.post(
                        "/v2/models/slow/infer", content=body, headers={**base, **(headers or {})}
                    )
                    for _ in range(count)
                )
            )
        )


def test_full_queue_answers_at_once_with_retry_after(slow_server: RunningServer) -> None:
    responses = asyncio.run(_burst(slow_server.url, 40))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) >= 1 and statuses.count(200) >= 5
    for response in responses:
        if response.status_code == 429:
            assert response.headers["retry-after"] == "1"
            assert "requests queued" in response.json()["error"]
    text = httpx.get(f"{slow_server.url}/metrics").text
    assert _metric(text, "cycleml_rejected_total", model="slow", reason="queue_full") >= 1


class HeldInstance:
    """The slow model's instance held at its next batch until :meth:`release`: the test,
    not the machine's speed, decides how long requests wait in the queue. The batch that
    is held is run by the real model once released."""

    def __init__(self, running: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
        self.running = running
        self.entered = threading.Event()
        self.gate = threading.Event()
        [batcher] = running.state.repository.get("slow").batchers
        run = batcher._run

        def held_run(inputs: np.ndarray) -> np.ndarray:
            self.entered.set()
            assert self.gate.wait(60), "the test never released the instance"
            return run(inputs)

        monkeypatch.setattr(batcher, "_run", held_run)

    def wait_busy(self) -> None:
        """Wait until a batch is held (the instance takes nothing more)."""
        assert self.entered.wait(30), "no batch reached the instance"

    def release(self) -> None:
        self.gate.set()


def _queue_depth(url: str) -> float:
    return _metric(httpx.get(f"{url}/metrics").text, "cycleml_queue_depth", model="slow")


def test_request_that_cannot_start_in_time_gets_504(
    slow_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    body, headers = _slow_request()
    held = HeldInstance(slow_server, monkeypatch)

    async def scenario() -> tuple[httpx.Response, list[httpx.Response]]:
        async with httpx.AsyncClient(
            base_url=slow_server.url, timeout=60, limits=httpx.Limits(max_connections=16)
        ) as http:
            busy = [
                asyncio.ensure_future(
                    http.post("/v2/models/slow/infer", content=body, headers=headers)
                )
                for _ in range(3)
            ]
            try:
                await asyncio.to_thread(held.wait_busy)
                late = await http.post(
                    "/v2/models/slow/infer", content=body, headers={**headers, "X-Timeout-Ms": "1"}
                )
            finally:
                held.release()
            return late, list(await asyncio.gather(*busy))

    late, busy = asyncio.run(scenario())
    assert late.status_code == 504, late.text
    assert "timed out in the queue" in late.json()["error"]
    assert all(r.status_code == 200 for r in busy)
    text = httpx.get(f"{slow_server.url}/metrics").text
    assert _metric(text, "cycleml_rejected_total", model="slow", reason="deadline") >= 1


def test_disconnected_client_has_its_queued_work_cancelled(
    slow_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    body, headers = _slow_request()
    request = (
        f"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}"
        f"\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    ).encode() + body

    def metric(name: str, **labels: str) -> float:
        return _metric(httpx.get(f"{slow_server.url}/metrics").text, name, model="slow", **labels)

    def until(condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.01)

    rows_before = metric("cycleml_batch_size_sum")
    cancelled_before = metric("cycleml_rejected_total", reason="cancelled")
    held = HeldInstance(slow_server, monkeypatch)
    busy = threading.Thread(
        target=httpx.post,
        args=(f"{slow_server.url}/v2/models/slow/infer",),
        kwargs={"content": body, "headers": headers, "timeout": 60},
    )
    busy.start()
    try:
        held.wait_busy()
        with socket.create_connection(("127.0.0.1", slow_server.port)) as sock:
            sock.sendall(request)
            until(lambda: _queue_depth(slow_server.url) == 1, "the request was never queued")
        # the client has gone while its request waits: the server notices and withdraws it
        until(
            lambda: metric("cycleml_rejected_total", reason="cancelled") > cancelled_before,
            "the abandoned request was never cancelled",
        )
        assert _queue_depth(slow_server.url) == 0
    finally:
        held.release()
        busy.join(timeout=60)
    until(lambda: metric("cycleml_batch_size_sum") > rows_before, "the held batch never ran")
    assert metric("cycleml_batch_size_sum") - rows_before == 4  # the abandoned one never ran
    assert metric("cycleml_rejected_total", reason="cancelled") - cancelled_before == 1


def test_body_size_limit(slow_server: RunningServer) -> None:
    big = b"\0" * (65 * 1024)
    response = httpx.post(
        f"{slow_server.url}/v2/models/slow/infer",
        content=big,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 413 and "exceeds the limit" in response.json()["error"]

    def chunks():  # no Content-Length: the limit holds while streaming
        for _ in range(70):
            yield b"\0" * 1024

    response = httpx.post(f"{slow_server.url}/v2/models/slow/infer", content=chunks())
    assert response.status_code == 413


def test_overload_status_503_when_configured(slow_bundle: Path) -> None:
    serve = settings(
        slow_bundle,
        runtime={"intra_op_threads": 1},
        batching={"max_batch_size": 4, "max_queue_size": 1},
        limits={"overload_status": 503, "retry_after_s": 3},
    )
    with RunningServer(serve) as running:
        statuses = [r.status_code for r in asyncio.run(_burst(running.url, 12))]
        refused = [r for r in asyncio.run(_burst(running.url, 12)) if r.status_code != 200]
    assert set(statuses) <= {200, 503} and 503 in statuses
    assert refused and all(r.headers["retry-after"] == "3" for r in refused)


def test_in_flight_limit_refuses_at_once_but_health_answers(slow_bundle: Path) -> None:
    serve = settings(
        slow_bundle,
        runtime={"intra_op_threads": 1},
        batching={"max_batch_size": 4, "max_queue_size": 64},
        limits={"max_inflight": 2},
    )

    async def scenario(url: str) -> tuple[list[httpx.Response], httpx.Response]:
        async with httpx.AsyncClient(base_url=url) as http:
            burst = asyncio.ensure_future(_burst(url, 12))
            await asyncio.sleep(0.05)
            health = await http.get("/v2/health/ready")
        return await burst, health

    with RunningServer(serve) as running:
        responses, health = asyncio.run(scenario(running.url))
        text = httpx.get(f"{running.url}/metrics").text
    busy = [r for r in responses if r.status_code == 429]
    assert busy and all(r.status_code in (200, 429) for r in responses)
    assert all(r.headers["retry-after"] == "1" and "server busy" in r.json()["error"] for r in busy)
    assert health.status_code == 200
    assert _metric(text, "cycleml_rejected_total", reason="server_busy") == len(busy)


def test_api_keys(
    image_bundle: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("TEST_SERVE_KEYS", "key-one, key-two")
    key_file = tmp_path / "keys.txt"
    key_file.write_text("key-three\n")
    serve = settings(
        image_bundle,
        access_log=True,
        auth={"enabled": True, "keys_env": "TEST_SERVE_KEYS", "keys_file": str(key_file)},
    )
    body = v2_body(_GOOD)
    with caplog.at_level(logging.DEBUG), RunningServer(serve) as running:
        url = f"{running.url}/v2/models/shapes/infer"
        missing = httpx.post(url, json=body)
        wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer key-on"})
        basic = httpx.post(url, json=body, headers={"Authorization": "Basic key-one"})
        good = [
            httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"})
            for key in ("key-one", "key-two", "key-three")
        ]
        health = httpx.get(f"{running.url}/v2/health/ready")
        metadata = httpx.get(f"{running.url}/v2/models/shapes")
    for refused in (missing, wrong, basic, metadata):
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == "Bearer"
        assert "API key" in refused.json()["error"]
    assert [r.status_code for r in good] == [200, 200, 200]
    assert health.status_code == 200
    assert "key-one" not in caplog.text and "key-three" not in caplog.text
