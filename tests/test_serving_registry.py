"""Serving a model registry: versions chosen by aliases, ``model@alias`` resolved per
request, every answer naming the version that computed it, and aliases followed live."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from cycleml.inference import Predictor, load_bundle
from cycleml.registry import Registry
from cycleml.serving.metrics import ServingMetrics
from cycleml.serving.repository import ModelRepository
from test_predict_support import DATABASES, POSTGRES_URL
from test_registry_support import postgres_schema_url
from test_serving_support import (  # noqa: F401 - the *_fixture names register fixtures
    IMAGE_SIZE,
    RunningServer,
    binary_body,
    free_port,
    image_bundle_fixture,
    image_bundle_v2_fixture,
    server_process,
    settings,
    text_bundle_fixture,
    v2_body,
    wait_ready,
)

PIXELS = np.random.default_rng(7).integers(0, 256, (1, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)


def make_registry(root: Path, image_bundle: Path, image_bundle_v2: Path) -> Registry:
    """``shapes`` at versions 1 and 2 (different weights), champion on 1."""
    registry = Registry(root=root)
    assert registry.register(image_bundle)[0].version == 1
    assert registry.register(image_bundle_v2)[0].version == 2
    registry.set_alias("shapes", "champion", 1, reason="first")
    return registry


def expected_outputs(image_bundle: Path, image_bundle_v2: Path) -> dict[str, np.ndarray]:
    """What each version answers for ``PIXELS``, from the in-process predictor."""
    return {
        version: Predictor(load_bundle(bundle)).run(PIXELS)
        for version, bundle in (("1", image_bundle), ("2", image_bundle_v2))
    }


def version_of_output(output: np.ndarray, expected: dict[str, np.ndarray]) -> str:
    """The version whose output this is."""
    (version,) = [v for v, e in expected.items() if np.allclose(output, e, atol=1e-5)]
    return version


@pytest.fixture(scope="module")
def registry_root(
    tmp_path_factory: pytest.TempPathFactory, image_bundle: Path, image_bundle_v2: Path
) -> Path:
    root = tmp_path_factory.mktemp("registry")
    registry = make_registry(root, image_bundle, image_bundle_v2)
    registry.set_alias("shapes", "challenger", 2)
    registry.close()
    return root


@pytest.fixture(scope="module")
def client(registry_root: Path, text_bundle: Path) -> Iterator[httpx.Client]:
    registry = Registry(root=registry_root)
    registry.register(text_bundle)  # a model without aliases: its newest version
    registry.close()
    with (
        RunningServer(settings(registry_root)) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
    ):
        yield http


def _binary_answer(response: httpx.Response) -> tuple[dict, np.ndarray]:
    length = int(response.headers["inference-header-content-length"])
    header = json.loads(response.content[:length])
    return header, np.frombuffer(response.content[length:], dtype=np.float32)


def test_metadata_and_index_show_what_each_alias_resolves_to(client: httpx.Client) -> None:
    meta = client.get("/v2/models/shapes").json()
    assert meta["name"] == "shapes"
    assert meta["version"] == "1"  # a bare name: the champion
    assert meta["versions"] == ["1", "2"]
    assert meta["aliases"] == {"challenger": "2", "champion": "1"}
    assert client.get("/v2/models/shapes@challenger").json()["version"] == "2"
    assert client.get("/v2/models/shapes@champion/ready").json()["version"] == "1"
    assert client.get("/v2/models/topics").json()["aliases"] == {}
    index = client.post("/v2/repository/index").json()
    assert {(e["name"], e["version"], tuple(e.get("aliases", ()))) for e in index} == {
        ("shapes", "1", ("champion",)),
        ("shapes", "2", ("challenger",)),
        ("topics", "1", ()),
    }


@pytest.mark.parametrize(
    ("path", "version"),
    [
        ("/v2/models/shapes/infer", "1"),
        ("/v2/models/shapes@champion/infer", "1"),
        ("/v2/models/shapes@challenger/infer", "2"),
        ("/v2/models/shapes/versions/2/infer", "2"),
        ("/v2/models/shapes/versions/1/infer", "1"),
    ],
)
def test_alias_and_version_routing_names_the_version_that_answered(
    client: httpx.Client,
    image_bundle: Path,
    image_bundle_v2: Path,
    path: str,
    version: str,
) -> None:
    expected = expected_outputs(image_bundle, image_bundle_v2)
    body, headers = binary_body(PIXELS)
    # a declared Content-Length
    direct = client.post(path, content=body, headers=headers)
    assert direct.status_code == 200, direct.text
    header, output = _binary_answer(direct)
    assert direct.headers["x-model-version"] == header["model_version"] == version
    assert header["model_name"] == "shapes"
    assert version_of_output(output, expected) == version
    # a chunked JSON body: uvicorn's general request cycle
    chunked = client.post(
        path,
        content=iter([json.dumps(v2_body(PIXELS)).encode()]),
        headers={"content-type": "application/json"},
    )
    assert chunked.status_code == 200, chunked.text
    answer = chunked.json()
    assert chunked.headers["x-model-version"] == answer["model_version"] == version
    output = np.asarray(answer["outputs"][0]["data"], dtype=np.float32)
    assert version_of_output(output, expected) == version


@pytest.mark.parametrize(
    ("path", "version"),
    [
        ("/v1/models/shapes:predict", "1"),
        ("/v1/models/shapes@challenger:predict", "2"),
        ("/v1/models/shapes/versions/2:predict", "2"),
    ],
)
def test_v1_routes_resolve_aliases_and_name_the_version(
    client: httpx.Client, path: str, version: str
) -> None:
    answer = client.post(path, json={"instances": [PIXELS[0].tolist()]})
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-model-version"] == answer.json()["model_version"] == version
    assert answer.json()["model_name"] == "shapes"


def test_unknown_alias_model_or_version_is_named(client: httpx.Client) -> None:
    body, headers = binary_body(PIXELS)
    unknown = client.post("/v2/models/shapes@staging/infer", content=body, headers=headers)
    assert unknown.status_code == 404
    assert unknown.json()["error"] == (
        "model 'shapes' has no alias 'staging' (aliases: challenger, champion)"
    )
    assert client.get("/v2/models/shapes@staging").status_code == 404
    v1 = client.post("/v1/models/shapes@staging:predict", json={"instances": [PIXELS[0].tolist()]})
    assert v1.status_code == 404 and "no alias 'staging'" in v1.json()["error"]
    both = client.post("/v2/models/shapes@champion/versions/2/infer", content=body, headers=headers)
    assert both.status_code == 400 and "not both" in both.json()["error"]
    for route in ("", "/ready", "/stats"):  # metadata, readiness and statistics alike
        both = client.get(f"/v2/models/shapes@champion/versions/2{route}")
        assert both.status_code == 400 and "not both" in both.json()["error"], route
    unserved = client.post("/v2/models/shapes/versions/3/infer", content=body, headers=headers)
    assert unserved.status_code == 404 and "no version '3'" in unserved.json()["error"]
    missing = client.post("/v2/models/nope@champion/infer", content=body, headers=headers)
    assert missing.status_code == 404 and "not served" in missing.json()["error"]


def test_alias_moves_load_first_then_switch_and_retire(
    tmp_path: Path, image_bundle: Path, image_bundle_v2: Path
) -> None:
    root = tmp_path / "registry"
    registry = make_registry(root, image_bundle, image_bundle_v2)
    repository = ModelRepository(settings(root), ServingMetrics())
    try:
        repository.load_all()
        assert repository.versions("shapes") == ["1"]  # only what an alias points to
        held = repository.acquire("shapes@champion")  # a request in flight on version 1
        registry.set_alias("shapes", "champion", 2)
        repository.follow_registry()
        assert repository.versions("shapes") == ["2"]
        assert repository.aliases("shapes") == {"champion": "2"}
        assert repository.get("shapes@champion").version == "2"
        assert repository.get("shapes").version == "2"
        # the request that held version 1 finishes on it; then it is retired
        assert held.version == "1" and held.ready
        held.release()
        deadline = time.monotonic() + 10
        while held.ready and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not held.ready

        # an alias whose version does not load stays where it was
        broken = root / "shapes" / "2" / "model.onnx"
        (root / "shapes" / "3").mkdir()
        for file in (root / "shapes" / "2").iterdir():
            (root / "shapes" / "3" / file.name).write_bytes(file.read_bytes())
        (root / "shapes" / "3" / "model.onnx").write_bytes(broken.read_bytes()[:100])
        registry.set_alias("shapes", "champion", 1)
        registry.set_alias("shapes", "challenger", 2)
        repository.follow_registry()
        assert repository.aliases("shapes") == {"challenger": "2", "champion": "1"}
        assert repository.versions("shapes") == ["1", "2"]
    finally:
        repository.close()
        registry.close()


@pytest.mark.slow
def test_alias_moves_under_load_fail_no_request_and_each_answer_names_its_version(
    tmp_path: Path, image_bundle: Path, image_bundle_v2: Path
) -> None:
    """``cycleml serve`` on a registry root while clients call ``shapes@champion`` for
    about 20 s and the alias moves 5 times between two versions that answer differently."""
    root = tmp_path / "registry"
    registry = make_registry(root, image_bundle, image_bundle_v2)
    expected = expected_outputs(image_bundle, image_bundle_v2)
    body, headers = binary_body(PIXELS)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    moves: list[tuple[float, str]] = []  # (when, to version)
    answers: list[tuple[float, float, int, str, str, str]] = []

    async def client(http: httpx.AsyncClient, until: float) -> None:
        while time.monotonic() < until:
            sent = time.monotonic()
            response = await http.post("/v2/models/shapes@champion/infer", content=body)
            done = time.monotonic()
            if response.status_code != 200:
                answers.append((sent, done, response.status_code, "", "", response.text))
                continue
            header, output = _binary_answer(response)
            computed = version_of_output(output, expected)
            answers.append(
                (
                    sent,
                    done,
                    200,
                    response.headers["x-model-version"],
                    header["model_version"],
                    computed,
                )
            )

    readiness: list[int] = []

    async def probe(http: httpx.AsyncClient, until: float) -> None:
        """Readiness stays true while a new version loads next to the served one."""
        while time.monotonic() < until:
            readiness.append((await http.get("/v2/health/ready")).status_code)
            await asyncio.sleep(0.02)

    async def mover() -> None:
        for to in ("2", "1", "2", "1", "2"):
            await asyncio.sleep(3.5)
            await asyncio.to_thread(registry.set_alias, "shapes", "champion", int(to))
            moves.append((time.monotonic(), to))

    async def scenario() -> None:
        until = time.monotonic() + 21.0
        async with httpx.AsyncClient(base_url=url, timeout=30, headers=headers) as http:
            await asyncio.gather(
                mover(), probe(http, until), *(client(http, until) for _ in range(4))
            )

    try:
        with server_process(root, port, "access_log=false", "registry.poll_interval_s=0.5"):
            wait_ready(url)
            asyncio.run(scenario())
    finally:
        registry.close()

    failed = [a for a in answers if a[2] != 200]
    assert not failed, failed[:5]
    assert len(answers) > 500
    assert len(readiness) > 100 and set(readiness) == {200}
    # the version named in the header and the body is the one whose output came back
    assert all(a[3] == a[4] == a[5] for a in answers)
    for index, (moved_at, to) in enumerate(moves):
        next_move = moves[index + 1][0] if index + 1 < len(moves) else float("inf")
        first = min(a[1] for a in answers if a[0] >= moved_at and a[5] == to)
        assert first - moved_at < 3.0, (
            f"move {index + 1} to {to} served after {first - moved_at:.2f} s"
        )
        # once the new version answers, every request sent afterwards gets it
        later = [a for a in answers if first <= a[0] < next_move]
        assert later and all(a[5] == to for a in later)
    assert [to for _, to in moves] == ["2", "1", "2", "1", "2"]


@pytest.mark.parametrize("database", DATABASES)
def test_registry_database_given_by_url_is_followed(
    tmp_path: Path, image_bundle: Path, image_bundle_v2: Path, database: str
) -> None:
    """``registry.db_url`` names the database (PostgreSQL, or a SQLite file elsewhere)."""
    with contextlib.ExitStack() as stack:
        if database == "sqlite":
            url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
        else:
            url = stack.enter_context(contextlib.contextmanager(postgres_schema_url)(POSTGRES_URL))
        root = tmp_path / "registry"
        registry = Registry(url, root)
        stack.callback(registry.close)
        registry.register(image_bundle)
        registry.register(image_bundle_v2)
        assert not (root / "registry.db").exists()
        repository = ModelRepository(settings(root, registry={"db_url": url}), ServingMetrics())
        stack.callback(repository.close)
        repository.load_all()
        assert repository.versions("shapes") == ["2"]  # no alias: the newest
        assert repository.aliases("shapes") == {}
        registry.set_alias("shapes", "champion", 1)
        repository.follow_registry()
        assert repository.versions("shapes") == ["1"]
        assert repository.get("shapes@champion").version == "1"
        assert repository.get("shapes").version == "1"
