"""Hostile clients on loopback: one client's bad input, keyless or slow bodies, huge
images and texts, and made-up model names must not hurt anybody else."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import socket
import struct
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

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
    for bad in (10**9, -3):
        ids = np.array([[2, 3, bad, 4, 0, 0]], dtype=np.int64)
        body, headers = binary_body(ids, name="input_ids", datatype="INT64")
        response = httpx.post(
            f"{text_server.url}/v2/models/topics/infer", content=body, headers=headers
        )
        assert response.status_code == 400
        error = json.loads(response.content)["error"]
        assert f"input 'input_ids' has token id {bad}" in error and "[0, 10)" in error


# -- bodies: the key first, a deadline, a shared budget ----------------------------------------


def _raw_exchange(port: int, data: bytes, wait_s: float = 10.0) -> bytes:
    """Send ``data`` on a new connection and read until the server closes it (or
    ``wait_s`` passes): the bytes of whatever it answered."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(data)
        sock.settimeout(wait_s)
        received = b""
        deadline = time.monotonic() + wait_s
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        return received


def _head(path: str, length: int, *extra: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: x", f"Content-Length: {length}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.fixture
def guarded_server(image_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> RunningServer:
    monkeypatch.setenv("TEST_HOSTILE_KEYS", "the-key")
    serve = settings(
        image_bundle,
        auth={"enabled": True, "keys_env": "TEST_HOSTILE_KEYS"},
        limits={
            "max_body_bytes": 32 * 1024,
            "max_buffered_bytes": 48 * 1024,
            "body_timeout_s": 1.0,
        },
    )
    with RunningServer(serve) as running:
        yield running


def test_a_keyless_body_is_refused_before_it_is_read(guarded_server: RunningServer) -> None:
    # the body is declared but (almost) never sent: the answer cannot wait for it
    started = time.monotonic()
    answer = _raw_exchange(
        guarded_server.port, _head("/v2/models/shapes/infer", 30_000) + b"{" * 100, wait_s=5.0
    )
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"connection: close" in answer.lower()
    assert time.monotonic() - started < 0.9  # before the body deadline could have ended it


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_that_does_not_arrive_in_time_gets_408(
    guarded_server: RunningServer, chunked: bool
) -> None:
    auth = "Authorization: Bearer the-key"
    if chunked:  # uvicorn's general path
        head = (
            "POST /v2/models/shapes/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            f"{auth}\r\n\r\n10\r\n" + "{" * 16 + "\r\n"
        ).encode()
    else:  # a declared length
        head = _head("/v2/models/shapes/infer", 20_000, auth) + b"{" * 100
    started = time.monotonic()
    answer = _raw_exchange(guarded_server.port, head, wait_s=10.0)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"limits.body_timeout_s" in answer and b"connection: close" in answer.lower()
    assert 0.9 < time.monotonic() - started < 8.0


def test_bodies_held_across_connections_are_capped(guarded_server: RunningServer) -> None:
    auth = "Authorization: Bearer the-key"
    pixels = np.zeros((1, 8, 8, 3), np.uint8)
    body, headers = binary_body(pixels)
    full = _head(
        "/v2/models/shapes/infer", len(body), auth, *(f"{k}: {v}" for k, v in headers.items())
    )
    with socket.create_connection(("127.0.0.1", guarded_server.port)) as holder:
        # 30 KB of the 48 KB budget reserved by a body that is still arriving
        holder.sendall(_head("/v2/models/shapes/infer", 30_000, auth) + b"{")
        time.sleep(0.2)
        big = _head("/v2/models/shapes/infer", 20_000, auth) + b"{" * 20_000
        refused = _raw_exchange(guarded_server.port, big, wait_s=5.0)
        small = _raw_exchange(guarded_server.port, full + body + b"", wait_s=0.5)
    assert refused.startswith(b"HTTP/1.1 503"), refused[:300]
    assert b"limits.max_buffered_bytes" in refused and b"retry-after: 1" in refused.lower()
    assert small.startswith(b"HTTP/1.1 200"), small[:300]  # what fits is still served
    time.sleep(0.2)  # the holder left: its reservation is given back
    again = _raw_exchange(guarded_server.port, big, wait_s=0.5)
    assert again.startswith(b"HTTP/1.1 400"), again[:300]  # read and parsed (not JSON)


# -- metric labels -------------------------------------------------------------------------------


def test_made_up_model_names_do_not_grow_the_metrics(image_bundle: Path) -> None:
    body, headers = binary_body(np.zeros((1, 8, 8, 3), np.uint8))
    with RunningServer(settings(image_bundle)) as running:

        def series() -> int:
            text = httpx.get(f"{running.url}/metrics").text
            return sum(1 for line in text.splitlines() if line and not line.startswith("#"))

        async def unknown_names(first: int, count: int) -> list[int]:
            async with httpx.AsyncClient(
                base_url=running.url, limits=httpx.Limits(max_connections=8)
            ) as http:
                sem = asyncio.Semaphore(8)

                async def one(index: int) -> int:
                    async with sem:
                        path = f"/v2/models/nosuch-{index}/infer"
                        response = await http.post(path, content=body, headers=headers)
                        return response.status_code

                return list(await asyncio.gather(*(one(i) for i in range(first, first + count))))

        served = httpx.post(f"{running.url}/v2/models/shapes/infer", content=body, headers=headers)
        assert served.status_code == 200
        assert set(asyncio.run(unknown_names(0, 10))) == {404}
        before = series()
        assert set(asyncio.run(unknown_names(10, 2000))) == {404}
        after = series()
        text = httpx.get(f"{running.url}/metrics").text
    assert after == before, (before, after)
    assert 'model="_unknown"' in text and "nosuch" not in text
    assert 'cycleml_requests_total{endpoint="v2_infer",model="shapes"' in text


# -- decoding: bounded before it starts, and taking turns ------------------------------------------


def _png(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def _huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` but holds almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture
def limited_server(tmp_path: Path, image_bundle: Path, text_bundle: Path) -> RunningServer:
    copy_version(image_bundle, tmp_path / "models", "shapes", "1")
    copy_version(text_bundle, tmp_path / "models", "topics", "1")
    serve = settings(
        tmp_path / "models",
        limits={
            "max_image_pixels": 64 * 64,
            "max_request_pixels": 2 * 64 * 64,
            "max_text_chars": 500,
            "max_text_tokens": 50,
        },
    )
    with RunningServer(serve) as running:
        yield running


def test_decoding_is_bounded_before_it_starts(limited_server: RunningServer) -> None:
    url = f"{limited_server.url}/v1/models"
    png = {"Content-Type": "image/png"}
    ok = httpx.post(f"{url}/shapes:predict", content=_png(64, 64), headers=png)
    big = httpx.post(f"{url}/shapes:predict", content=_png(65, 64), headers=png)
    bomb = httpx.post(f"{url}/shapes:predict", content=_huge_png_header(10**5, 10**5), headers=png)
    files = [("file", (f"{i}.png", _png(60, 60), "image/png")) for i in range(3)]
    many = httpx.post(f"{url}/shapes:predict", files=files)
    text_ok = httpx.post(f"{url}/topics:predict", json={"text": "goal " * 50})
    many_tokens = httpx.post(f"{url}/topics:predict", json={"text": "goal " * 60})
    many_tokens_v2 = httpx.post(
        f"{limited_server.url}/v2/models/topics/infer",
        json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a " * 51]}]},
    )
    long_text = httpx.post(f"{url}/topics:predict", json={"instances": ["team", "goal " * 101]})
    assert ok.status_code == 200 and text_ok.status_code == 200, (ok.text, text_ok.text)
    for response, words in (
        (big, "image #0 has 4160 pixels; the limit is 4096 per image (limits.max_image_pixels)"),
        (bomb, "refused before decoding"),
        (many, "3 images have 10800 pixels; the limit is 8192 per request"),
        (long_text, "text #1 has 505 characters; the limit is 500 (limits.max_text_chars)"),
        (many_tokens, "text #0 has 60 tokens; the limit is 50 (limits.max_text_tokens)"),
        (many_tokens_v2, "text #0 has 51 tokens; the limit is 50 (limits.max_text_tokens)"),
    ):
        assert response.status_code == 413, response.text
        assert words in response.json()["error"]


def test_one_request_of_many_large_images_does_not_hold_up_the_others(
    image_bundle: Path,
) -> None:
    with RunningServer(settings(image_bundle, runtime={"decode_threads": 1})) as running:
        url = f"{running.url}/v1/models/shapes:predict"
        files = [("file", (f"{i}.png", _png(2048, 2048), "image/png")) for i in range(6)]
        small = _png(8, 8)

        async def scenario() -> tuple[float, float]:
            async with httpx.AsyncClient(timeout=60) as http:

                async def timed(**kwargs: object) -> float:
                    response = await http.post(url, **kwargs)
                    assert response.status_code == 200, response.text
                    return time.perf_counter()

                heavy = asyncio.ensure_future(timed(files=files))
                await asyncio.sleep(0.1)  # the heavy request is decoding
                light_done = await timed(content=small, headers={"Content-Type": "image/png"})
                return await heavy, light_done

        heavy_done, light_done = asyncio.run(scenario())
    assert light_done < heavy_done


# -- the smaller ones ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_server(image_bundle: Path) -> RunningServer:
    with RunningServer(settings(image_bundle, access_log=True)) as running:
        yield running


@pytest.mark.parametrize(
    ("content_type", "body", "words"),
    [
        ("multipart/form-data", b"--x\r\n\r\n", "malformed multipart body"),
        (
            "multipart/form-data; boundary=abc",
            b"--xyz\r\nContent-Disposition: form-data; name=file\r\n\r\n1\r\n--xyz--\r\n",
            "multipart",
        ),
        (
            "multipart/form-data; boundary=b",
            b"".join(
                b'--b\r\nContent-Disposition: form-data; name="f"; filename="%d.png"\r\n'
                b"Content-Type: image/png\r\n\r\nx\r\n" % i
                for i in range(40)
            )
            + b"--b--\r\n",
            "malformed multipart body: Too many files",
        ),
    ],
)
def test_malformed_multipart_bodies_get_400(
    plain_server: RunningServer, content_type: str, body: bytes, words: str
) -> None:
    response = httpx.post(
        f"{plain_server.url}/v1/models/shapes:predict",
        content=body,
        headers={"Content-Type": content_type},
    )
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]


@pytest.mark.parametrize(
    ("path", "document", "words"),
    [
        ("/v1/models/shapes:predict", {"instances": [[[]]]}, "has no pixels"),
        ("/v1/models/shapes:predict", {"instances": [[]]}, "has no pixels"),
        (
            "/v2/models/shapes/infer",
            {
                "inputs": [
                    {
                        "name": "pixels",
                        "datatype": "UINT8",
                        "shape": [1, 8, 8, 3],
                        "data": [True] + [1] * 191,
                    }
                ]
            },
            "input 'pixels' is UINT8 but its 'data' holds true/false",
        ),
    ],
)
def test_empty_pixel_arrays_and_booleans_as_numbers_get_400(
    plain_server: RunningServer, path: str, document: dict, words: str
) -> None:
    response = httpx.post(f"{plain_server.url}{path}", json=document)
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]


def test_the_fast_path_honours_connection_close(plain_server: RunningServer) -> None:
    body, headers = binary_body(np.zeros((1, 8, 8, 3), np.uint8))
    head = _head(
        "/v2/models/shapes/infer",
        len(body),
        "Connection: close",
        *(f"{k}: {v}" for k, v in headers.items()),
    )
    started = time.monotonic()
    answer = _raw_exchange(plain_server.port, head + body, wait_s=5.0)
    assert answer.startswith(b"HTTP/1.1 200") and b"connection: close" in answer.lower()
    assert time.monotonic() - started < 2.0  # closed by the server, not by the wait


def test_a_504_is_logged_with_its_reason(
    plain_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    body, headers = binary_body(np.zeros((1, 8, 8, 3), np.uint8))
    with caplog.at_level(logging.INFO, logger="cycleml.serving.access"):
        late = httpx.post(
            f"{plain_server.url}/v2/models/shapes/infer",
            content=body,
            headers={**headers, "X-Timeout-Ms": "0.001", "X-Request-Id": "late-1"},
        )
        for _ in range(200):
            if "late-1" in caplog.text:
                break
            time.sleep(0.01)
    assert late.status_code == 504
    line = next(
        json.loads(r.getMessage())
        for r in caplog.records
        if r.name == "cycleml.serving.access" and "late-1" in r.getMessage()
    )
    assert line["status"] == 504 and "timed out" in line["error"]


def test_an_unload_holds_until_a_load(tmp_path: Path, image_bundle: Path) -> None:
    copy_version(image_bundle, tmp_path / "models", "shapes", "1")
    serve = settings(tmp_path / "models", reload={"watch": True, "interval_s": 0.1})
    with RunningServer(serve) as running:
        unloaded = httpx.post(f"{running.url}/v2/repository/models/shapes/unload")
        time.sleep(1.5)  # many polls of the folder watch
        gone = httpx.get(f"{running.url}/v2/models/shapes")
        loaded = httpx.post(f"{running.url}/v2/repository/models/shapes/load")
        back = httpx.get(f"{running.url}/v2/models/shapes")
    assert unloaded.status_code == 200
    assert gone.status_code == 404, gone.text
    assert loaded.status_code == 200 and back.status_code == 200


# -- model references in URLs: malformed is 400, unknown is 404 ----------------------------------

# every route that takes a model reference, as (method, path with {ref})
_REF_ROUTES = [
    ("POST", "/v2/models/{ref}/infer"),  # the fast path
    ("POST", "/v2/models/{ref}/versions/1/infer"),
    ("GET", "/v2/models/{ref}"),
    ("GET", "/v2/models/{ref}/versions/1"),
    ("GET", "/v2/models/{ref}/ready"),
    ("GET", "/v2/models/{ref}/versions/1/ready"),
    ("GET", "/v2/models/{ref}/config"),
    ("GET", "/v2/models/{ref}/stats"),
    ("GET", "/v2/models/{ref}/versions/1/stats"),
    ("POST", "/v1/models/{ref}:predict"),
    ("POST", "/v1/models/{ref}/versions/1:predict"),
]


def _ask_every_route(url: str, ref: str) -> list[tuple[str, httpx.Response]]:
    body, headers = binary_body(np.zeros((1, 8, 8, 3), np.uint8))
    answers = []
    with httpx.Client(base_url=url, timeout=30) as http:
        for method, template in _REF_ROUTES:
            path = template.format(ref=ref)
            if method == "POST":
                answer = http.post(path, content=body, headers=headers)
            else:
                answer = http.get(path)
            answers.append((path, answer))
    return answers


@pytest.mark.parametrize(
    ("ref", "rule"),
    [
        ("shapes@", "alias is empty"),
        ("shapes@@x", "alias '@x' is not allowed"),
        ("@champion", "model name is empty"),
        ("sha pes", "model name 'sha pes' is not allowed"),
        (".hidden", "not starting with '.'"),
        ("a" * 200, "model name 'aaaa"),
        ("a" * 200, "is 200 characters long; at most 128"),
        ("shapes@" + "b" * 129, "alias 'bbbb"),
        ("shapes@" + "b" * 129, "is 129 characters long; at most 128"),
    ],
)
def test_malformed_model_references_get_400_naming_the_rule(
    plain_server: RunningServer, ref: str, rule: str
) -> None:
    for path, answer in _ask_every_route(plain_server.url, ref):
        assert answer.status_code == 400, (path, answer.text)
        document = answer.json()
        assert list(document) == ["error"], (path, document)
        assert document["error"].startswith(f"model reference '{ref[:40]}"), (path, document)
        assert rule in document["error"], (path, document)


@pytest.mark.parametrize("ref", ["nosuch", "nosuch@champion", "shapes@champion"])
def test_well_formed_unknown_model_references_stay_404(
    plain_server: RunningServer, ref: str
) -> None:
    for path, answer in _ask_every_route(plain_server.url, ref):
        if "@" in ref and "/versions/" in path and ref.startswith("shapes"):
            # a served model asked for an alias and a version at once
            assert answer.status_code == 400 and "not both" in answer.json()["error"], path
            continue
        assert answer.status_code == 404, (path, answer.text)
        assert "model 'nosuch' is not served" in answer.json()["error"] or (
            "model 'shapes' has no alias 'champion'" in answer.json()["error"]
        ), (path, answer.text)


def test_repository_routes_refuse_malformed_model_names(plain_server: RunningServer) -> None:
    with httpx.Client(base_url=plain_server.url, timeout=30) as http:
        for action in ("load", "unload"):
            for name, rule in [
                ("sha pes", "model name 'sha pes' is not allowed"),
                ("%2E%2E", "model name '..' is not allowed"),  # '..', past the client
                ("a" * 300, "is 300 characters long; at most 128"),
                ("shapes@champion", "this route takes a model name, not name@alias"),
            ]:
                answer = http.post(f"/v2/repository/models/{name}/{action}")
                assert answer.status_code == 400, (action, name, answer.text)
                assert list(answer.json()) == ["error"]
                assert rule in answer.json()["error"], (action, name, answer.text)
            unknown = http.post(f"/v2/repository/models/nosuch/{action}")
            assert unknown.status_code == 404, (action, unknown.text)
        assert http.get("/v2/models/shapes/ready").status_code == 200


def test_malformed_model_references_do_not_grow_the_metrics(plain_server: RunningServer) -> None:
    body, headers = binary_body(np.zeros((1, 8, 8, 3), np.uint8))

    def series() -> int:
        text = httpx.get(f"{plain_server.url}/metrics").text
        return sum(1 for line in text.splitlines() if line and not line.startswith("#"))

    with httpx.Client(base_url=plain_server.url, timeout=30) as http:

        def malformed(first: int, count: int) -> set[int]:
            statuses = set()
            for index in range(first, first + count):
                ref = f"bad{index}@" if index % 2 else f"bad {index}"
                v2 = http.post(f"/v2/models/{ref}/infer", content=body, headers=headers)
                v1 = http.post(f"/v1/models/{ref}:predict", content=body, headers=headers)
                statuses |= {v2.status_code, v1.status_code}
            return statuses

        assert malformed(0, 4) == {400}
        before = series()
        assert malformed(4, 100) == {400}
        after = series()
    text = httpx.get(f"{plain_server.url}/metrics").text
    assert after == before, (before, after)
    assert "bad" not in text
    counted = [
        line
        for line in text.splitlines()
        if line.startswith("cycleml_requests_total{")
        and 'model="_unknown"' in line
        and 'status="400"' in line
    ]
    assert {'endpoint="v2_infer"' in line for line in counted} == {True, False}, counted


def test_a_served_name_outside_the_naming_rules_is_still_served(
    tmp_path: Path, image_bundle: Path
) -> None:
    # a repository folder names its model; the rules are checked only when a look-up fails
    copy_version(image_bundle, tmp_path / "models", "my model", "1")
    body, headers = binary_body(np.zeros((1, 8, 8, 3), np.uint8))
    with (
        RunningServer(settings(tmp_path / "models")) as running,
        httpx.Client(base_url=running.url, timeout=30) as http,
    ):
        infer = http.post("/v2/models/my model/infer", content=body, headers=headers)
        ready = http.get("/v2/models/my model/ready")
        alias = http.get("/v2/models/my model@champion")
        unloaded = http.post("/v2/repository/models/my model/unload")
        loaded = http.post("/v2/repository/models/my model/load")
    assert infer.status_code == 200, infer.text
    assert ready.status_code == 200 and ready.json()["name"] == "my model"
    assert alias.status_code == 404 and "no alias 'champion'" in alias.json()["error"]
    assert unloaded.status_code == 200 and loaded.status_code == 200, loaded.text
