"""A/B experiments in a real server: requests to a model name routed by unit to arms
(two real registered versions), answers naming arm and version, assignment rows in the
database, live ramps through the admin route and through the store, shadow mode,
stable assignment across servers and restarts, outcome events, and bad input."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import create_engine, inspect, select, text

from cycleml.db import open_database
from cycleml.errors import ConfigError
from cycleml.experiments.assign import Assigner
from cycleml.experiments.store import ExperimentSpec, ExperimentStore
from cycleml.experiments.tables import READ_TABLES, assignments, events, units
from cycleml.inference import Predictor, load_bundle
from cycleml.registry import Registry
from cycleml.serving import app as serving_app
from cycleml.serving.app import create_app
from cycleml.serving.protocol import ProtocolError
from cycleml.serving.routes_feedback import parse_feedback_items
from test_predict_support import DATABASES, POSTGRES_URL
from test_registry_support import postgres_schema_url
from test_serving_support import (  # noqa: F401 - the *_fixture names register fixtures
    IMAGE_SIZE,
    RunningServer,
    binary_body,
    copy_version,
    export_image_bundle,
    free_port,
    image_bundle_fixture,
    image_bundle_v2_fixture,
    server_process,
    settings,
    v2_body,
    wait_ready,
)

PIXELS = np.random.default_rng(11).integers(0, 256, (1, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
SPEC = {
    "model": "shapes",
    "arms": {"control": "shapes@champion", "treatment": "shapes/2"},
    "weights": {"control": 0.5, "treatment": 0.5},
    "unit": {"header": "X-User-Id"},
    "salt": "s1",
}
ARM_VERSION = {"control": "1", "treatment": "2"}


@pytest.fixture(scope="module")
def registry_root(
    tmp_path_factory: pytest.TempPathFactory, image_bundle: Path, image_bundle_v2: Path
) -> Path:
    """``shapes`` 1 (champion) and 2 (no alias: served only for an experiment)."""
    root = tmp_path_factory.mktemp("ab-registry")
    registry = Registry(root=root)
    registry.register(image_bundle)
    registry.register(image_bundle_v2)
    registry.set_alias("shapes", "champion", 1, reason="first")
    registry.close()
    return root


@pytest.fixture(scope="module")
def expected(image_bundle: Path, image_bundle_v2: Path) -> dict[str, np.ndarray]:
    return {
        version: Predictor(load_bundle(bundle)).run(PIXELS)
        for version, bundle in (("1", image_bundle), ("2", image_bundle_v2))
    }


def _load_failure(serve: Any) -> str:
    """Why a server with the settings ``serve`` would not start (its load failure)."""
    state = create_app(serve).state.serving
    try:
        serving_app._load(state)
        assert state.load_failure is not None
        return state.load_failure
    finally:
        state.experiments.close()
        state.repository.close()


def _serve(root: Path, db_url: str, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "monitoring": {"db_url": db_url},
        "runtime": {"intra_op_threads": 1},
        "registry": {"poll_interval_s": 0.2},
        **overrides,
    }
    return settings(root, **values)


def _infer(client: httpx.Client, unit: str | None, **extra: Any) -> httpx.Response:
    headers = {} if unit is None else {"X-User-Id": unit}
    body, binary_headers = binary_body(PIXELS)
    return client.post(
        "/v2/models/shapes/infer", content=body, headers={**binary_headers, **headers}, **extra
    )


def _header(response: httpx.Response) -> dict:
    length = int(response.headers["inference-header-content-length"])
    return json.loads(response.content[:length])


def _rows(db_url: str, **where: Any) -> list[Any]:
    engine = create_engine(db_url)
    query = select(assignments)
    for key, value in where.items():
        query = query.where(assignments.c[key] == value)
    with engine.connect() as conn:
        rows = conn.execute(query.order_by(assignments.c.id)).all()
    engine.dispose()
    return rows


def _wait_rows(db_url: str, count: int, timeout_s: float = 20.0, **where: Any) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        rows = _rows(db_url, **where)
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


@pytest.fixture(scope="module", params=DATABASES)
def server(
    request: pytest.FixtureRequest, registry_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """A server with the experiment configured; its database SQLite or PostgreSQL."""
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            db_url = f"sqlite:///{tmp_path_factory.mktemp('ab-db') / 'project.db'}"
        else:
            assert POSTGRES_URL
            db_url = stack.enter_context(
                contextlib.contextmanager(postgres_schema_url)(POSTGRES_URL)
            )
        serve = _serve(registry_root, db_url, experiments={"shapes-v2": SPEC})
        with RunningServer(serve) as running:
            running.db_url = db_url
            yield running


@pytest.fixture
def client(server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        # every test starts from the configured split
        http.put("/v1/experiments/shapes-v2", json=SPEC).raise_for_status()
        yield http


def test_units_get_their_arm_and_answers_name_arm_and_version(
    client: httpx.Client, server: Any, expected: dict[str, np.ndarray]
) -> None:
    assigner = Assigner("s1", "shapes-v2", SPEC["weights"])
    seen = set()
    for index in range(24):
        unit = f"user-{index}"
        arm = assigner.assign(unit)
        seen.add(arm)
        for _ in range(2):  # the same unit, the same arm
            reply = _infer(client, unit)
            assert reply.status_code == 200, reply.text
            header = _header(reply)
            assert reply.headers["x-experiment-arm"] == header["arm"] == arm
            assert reply.headers["x-experiment"] == header["experiment"] == "shapes-v2"
            assert reply.headers["x-model-version"] == header["model_version"] == ARM_VERSION[arm]
            output = np.frombuffer(
                reply.content[int(reply.headers["inference-header-content-length"]) :], np.float32
            )
            assert np.allclose(output, expected[ARM_VERSION[arm]].reshape(-1), atol=1e-5)
    assert seen == {"control", "treatment"}
    # the convenience endpoint takes part too, with the arm in its JSON body
    unit = "user-3"
    reply = client.post(
        "/v1/models/shapes:predict",
        json={"instances": PIXELS.tolist()},
        headers={"X-User-Id": unit, "X-Request-Id": "v1-user-3"},
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["arm"] == reply.headers["x-experiment-arm"] == assigner.assign(unit)
    assert reply.json()["model_version"] == ARM_VERSION[assigner.assign(unit)]
    # naming a version or an alias leaves the experiment out
    pinned = client.post(
        "/v2/models/shapes/versions/2/infer", json=v2_body(PIXELS), headers={"X-User-Id": "u"}
    )
    assert pinned.status_code == 200 and "x-experiment-arm" not in pinned.headers
    rows = _wait_rows(server.db_url, 1, request_id="v1-user-3")
    assert [(r.arm, r.unit, r.version, r.mode, r.status_code) for r in rows] == [
        (assigner.assign(unit), unit, ARM_VERSION[assigner.assign(unit)], "split", 200)
    ]
    assert rows[0].latency_ms > 0
    # written as UTC (SQLite hands it back without the zone)
    logged = rows[0].logged_at.replace(tzinfo=dt.timezone.utc)
    assert abs((dt.datetime.now(dt.timezone.utc) - logged).total_seconds()) < 120


def test_every_request_is_logged_and_requests_without_unit_are_random(
    client: httpx.Client, server: Any
) -> None:
    """Assignment rows are written for every request, with the prediction log off."""
    for index in range(30):
        reply = client.post(
            "/v2/models/shapes/infer",
            json=v2_body(PIXELS),
            headers={"X-Request-Id": f"anon-{index}"},
        )
        assert reply.status_code == 200
        assert reply.json()["arm"] in ("control", "treatment")
    rows = [r for r in _wait_rows(server.db_url, 30) if r.request_id.startswith("anon-")]
    deadline = time.monotonic() + 20
    while len(rows) < 30 and time.monotonic() < deadline:
        time.sleep(0.1)
        rows = [r for r in _rows(server.db_url) if r.request_id.startswith("anon-")]
    assert len(rows) == 30
    assert all(r.unit is None for r in rows)
    metrics = client.get("/metrics").text
    random_count = sum(
        float(v)
        for v in re.findall(
            r'^cycleml_experiment_requests_total\{arm="\w+",assigned="random",'
            r'experiment="shapes-v2"\} (\S+)$',
            metrics,
            re.M,
        )
    )
    assert random_count >= 30, metrics
    assert "cycleml_experiment_assignments_dropped_total 0.0" in metrics


def test_bad_unit_ids_are_refused(client: httpx.Client) -> None:
    reply = _infer(client, "x" * 300)
    assert reply.status_code == 400
    assert "at most 255" in reply.json()["error"]
    # a unit from a request parameter must be text
    by_parameter = {**SPEC, "unit": {"parameter": "user_id"}}
    assert client.put("/v1/experiments/shapes-v2", json=by_parameter).status_code == 200
    bad = client.post("/v2/models/shapes/infer", json=v2_body(PIXELS, parameters={"user_id": 42}))
    assert bad.status_code == 400
    assert "must be text, got int" in bad.json()["error"]
    # a NUL or another control character in a query parameter (headers cannot carry one)
    for unit in ("%00", "a%0Ab"):
        bad = client.post(f"/v2/models/shapes/infer?user_id={unit}", json=v2_body(PIXELS))
        assert bad.status_code == 400, bad.text
        assert "parameter 'user_id': unit id holds the control character" in bad.json()["error"]
    good = client.post(
        "/v2/models/shapes/infer", json=v2_body(PIXELS, parameters={"user_id": "user-5"})
    )
    query = client.post("/v2/models/shapes/infer?user_id=user-5", json=v2_body(PIXELS))
    arm = Assigner("s1", "shapes-v2", SPEC["weights"]).assign("user-5")
    assert good.json()["arm"] == query.json()["arm"] == arm


def test_admin_ramp_stop_and_bad_changes(client: httpx.Client, server: Any) -> None:
    units = [f"ramp-{i}" for i in range(20)]
    ramp = client.post(
        "/v1/experiments/shapes-v2/ramp",
        json={"weights": {"control": 0, "treatment": 1}, "note": "all in"},
    )
    assert ramp.status_code == 200, ramp.text
    assert ramp.json()["weights"] == {"control": 0.0, "treatment": 1.0}
    assert {_infer(client, u).headers["x-experiment-arm"] for u in units} == {"treatment"}
    listed = client.get("/v1/experiments").json()["experiments"]
    assert [(e["name"], e["status"], e["routed"]) for e in listed] == [
        ("shapes-v2", "running", True)
    ]
    stop = client.post("/v1/experiments/shapes-v2/stop", json={"note": "done"})
    assert stop.json()["status"] == "stopped"
    after = _infer(client, "ramp-1")
    assert "x-experiment-arm" not in after.headers and after.headers["x-model-version"] == "1"
    changes = ExperimentStore(server.db_url).changes("shapes-v2")
    assert [(c["source"], c["action"]) for c in changes[-2:]] == [
        ("admin", "ramp"),
        ("admin", "stop"),
    ]
    assert changes[-2]["weights_before"] == {"control": 0.5, "treatment": 0.5}
    assert changes[-2]["note"] == "all in"
    assert client.put("/v1/experiments/shapes-v2", json=SPEC).json()["status"] == "running"
    # bad input: each a 4xx naming the problem
    cases = [
        (
            "put",
            "/v1/experiments/shapes-v2",
            {**SPEC, "arms": {"control": "shapes/1", "treatment": "shapes/9"}},
            400,
            "no version 9",
        ),
        (
            "put",
            "/v1/experiments/shapes-v2",
            {**SPEC, "weights": {"control": 0, "treatment": 0}},
            400,
            "positive",
        ),
        (
            "put",
            "/v1/experiments/other",
            {**SPEC, "arms": {"control": "nope@champion", "treatment": "nope/1"}},
            400,
            "nope",
        ),
        ("post", "/v1/experiments/shapes-v2/ramp", {"weights": {"third": 1}}, 400, "unknown arms"),
        ("post", "/v1/experiments/missing/stop", {}, 404, "no experiment named 'missing'"),
        ("post", "/v1/experiments/shapes-v2/ramp", {"w": 1}, 400, "weights"),
        # each weight finite, their sum not: the client's input, not a database failure
        (
            "post",
            "/v1/experiments/shapes-v2/ramp",
            {"weights": {"control": 1e308, "treatment": 1e308}},
            400,
            "sum to more than the largest number",
        ),
        (
            "put",
            "/v1/experiments/shapes-v2",
            {**SPEC, "weights": {"control": 1e308, "treatment": 1e308}},
            400,
            "sum to more than the largest number",
        ),
        # a listed spec sent back with a revision that is no count: not a database failure
        ("put", "/v1/experiments/shapes-v2", {**SPEC, "revision": [1]}, 400, "revision must be"),
        # text PostgreSQL cannot store (NUL) is refused as such, in either database
        ("put", "/v1/experiments/shapes-v2", {**SPEC, "salt": "s\x00"}, 400, "printable"),
        (
            "post",
            "/v1/experiments/shapes-v2/ramp",
            {"weights": {"control": 1}, "note": "a\x00b"},
            400,
            "note holds the control character U+0000 at position 1",
        ),
        ("post", "/v1/experiments/shapes-v2/stop", {"note": "\x00"}, 400, "U+0000"),
        # a misspelled key is named, not dropped (nor the experiment stopped without it)
        (
            "post",
            "/v1/experiments/shapes-v2/ramp",
            {"weights": {"control": 1}, "notes": "why"},
            400,
            "unknown keys ['notes']",
        ),
        ("post", "/v1/experiments/shapes-v2/stop", {"nte": "done"}, 400, "unknown keys ['nte']"),
        # PUT starts: a spec marked stopped is refused, neither started nor stored
        (
            "put",
            "/v1/experiments/shapes-v2",
            {**SPEC, "status": "stopped"},
            400,
            "use POST /v1/experiments/shapes-v2/stop",
        ),
        ("put", "/v1/experiments/quiet", {**SPEC, "status": "stopped"}, 400, "to stop it"),
    ]
    for method, path, body, status, message in cases:
        reply = getattr(client, method)(path, json=body)
        assert reply.status_code == status, (path, reply.text)
        assert message in reply.json()["error"], reply.text
    listed = client.get("/v1/experiments").json()["experiments"]
    assert [e["name"] for e in listed] == ["shapes-v2"]
    current = listed[0]
    assert (current["status"], current["salt"]) == ("running", "s1")
    assert current["weights"] == {"control": 0.5, "treatment": 0.5}
    assert client.put("/v1/experiments/shapes-v2", json=SPEC).status_code == 200
    clash = client.put("/v1/experiments/second", json=SPEC | {"salt": "x"})
    assert clash.status_code == 400
    assert "already has the running experiment 'shapes-v2'" in clash.json()["error"]


def test_a_ramp_written_to_the_store_routes_live(client: httpx.Client, server: Any) -> None:
    """What `cycleml experiment ramp` does: write the store; the server polls it."""
    store = ExperimentStore(server.db_url)
    store.ramp("shapes-v2", {"control": 1, "treatment": 0}, source="cli", note="roll back")
    units = [f"live-{i}" for i in range(12)]
    deadline = time.monotonic() + 10
    while True:
        arms = {_infer(client, u).headers["x-experiment-arm"] for u in units}
        if arms == {"control"} or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert arms == {"control"}
    assert store.changes("shapes-v2")[-1]["source"] == "cli"


def test_outcome_events_attach_to_assignments_and_unknown_ones_are_reported(
    client: httpx.Client, server: Any
) -> None:
    assigner = Assigner("s1", "shapes-v2", SPEC["weights"])
    for index in range(4):
        reply = _infer(client, f"buyer-{index}")
        reply2 = client.post(
            "/v2/models/shapes/infer",
            json=v2_body(PIXELS),
            headers={"X-User-Id": f"buyer-{index}", "X-Request-Id": f"buy-{index}"},
        )
        assert reply.status_code == reply2.status_code == 200
    feedback = client.post(
        "/v1/feedback",
        json=[
            {"request_id": "buy-0", "event": "click"},
            {"request_id": "buy-1", "event": "conversion", "value": 12.5},
            {"unit": "buyer-2", "event": "click", "experiment": "shapes-v2"},
            {"unit": "buyer-3", "event": "click"},
            {"request_id": "never-served", "event": "click"},
            {"unit": "stranger", "event": "click"},
        ],
    )
    assert feedback.status_code == 200, feedback.text
    assert feedback.json() == {
        "received": 6,
        "attached": 4,
        "unknown": 2,
        "unknown_request_ids": ["never-served"],
        "unknown_units": ["stranger"],
        "mismatched_request_ids": [],
    }
    engine = create_engine(server.db_url)
    with engine.connect() as conn:
        stored = conn.execute(select(events).order_by(events.c.id)).all()
    engine.dispose()
    by_key = {(e.request_id or e.unit): e for e in stored}
    assert by_key["buy-1"].value == 12.5 and by_key["buy-1"].event == "conversion"
    for key, unit in (
        ("buy-0", "buyer-0"),
        ("buy-1", "buyer-1"),
        ("buyer-2", "buyer-2"),
        ("buyer-3", "buyer-3"),
    ):
        assert by_key[key].arm == assigner.assign(unit)
        assert by_key[key].experiment == "shapes-v2"
    assert by_key["never-served"].arm is None and by_key["stranger"].arm is None
    assert "cycleml_feedback_unknown_total 2.0" in client.get("/metrics").text
    bad = [
        {"request_id": "buy-0", "unit": "u", "event": "click"},
        {"request_id": "buy-0", "event": ""},
        {"request_id": "buy-0", "event": "   "},
        {"request_id": "buy-0", "event": "click", "value": "high"},
        {"unit": 7, "event": "click"},
        {"unit": "u" * 300, "event": "click"},
    ]
    for item in bad:
        reply = client.post("/v1/feedback", json=item)
        assert reply.status_code == 400, item
        assert "feedback" in reply.json()["error"]
    blank = client.post("/v1/feedback", json={"request_id": "buy-0", "event": "  "})
    assert blank.status_code == 400 and "only whitespace" in blank.json()["error"]


def test_feedback_naming_another_experiment_than_the_requests_is_reported(
    client: httpx.Client, server: Any
) -> None:
    reply = client.post(
        "/v2/models/shapes/infer",
        json=v2_body(PIXELS),
        headers={"X-User-Id": "mixer", "X-Request-Id": "mix-1"},
    )
    assert reply.status_code == 200, reply.text
    feedback = client.post(
        "/v1/feedback",
        json=[
            {"request_id": "mix-1", "event": "click", "experiment": "some-other-test"},
            {"request_id": "mix-1", "event": "view", "experiment": "shapes-v2"},
        ],
    )
    assert feedback.status_code == 200, feedback.text
    answer = feedback.json()
    assert answer["received"] == 2 and answer["unknown"] == 0
    assert answer["mismatched_request_ids"] == ["mix-1"]
    engine = create_engine(server.db_url)
    with engine.connect() as conn:
        stored = conn.execute(select(events).where(events.c.request_id == "mix-1")).all()
    engine.dispose()
    # kept, under the request's own experiment and arm
    assert sorted(e.event for e in stored) == ["click", "view"]
    arm = Assigner("s1", "shapes-v2", SPEC["weights"]).assign("mixer")
    assert {(e.experiment, e.arm) for e in stored} == {("shapes-v2", arm)}


def _feedback_arms(
    client: httpx.Client, db_url: str, items: list[dict]
) -> list[tuple[str | None, str | None]]:
    """(experiment, arm) each feedback item was stored with (None: unknown)."""
    reply = client.post("/v1/feedback", json=items)
    assert reply.status_code == 200, reply.text
    received = reply.json()["received"]
    engine = create_engine(db_url)
    with engine.connect() as conn:
        stored = conn.execute(select(events).order_by(events.c.id.desc()).limit(received)).all()
    engine.dispose()
    return [(e.experiment, e.arm) for e in reversed(stored)]


def _unit_arms(db_url: str, unit: str) -> list[tuple[str, str]]:
    engine = create_engine(db_url)
    with engine.connect() as conn:
        rows = conn.execute(select(units).where(units.c.unit == unit).order_by(units.c.id)).all()
    engine.dispose()
    return [(r.experiment, r.arm) for r in rows]


def test_feedback_by_unit_finds_the_arm_a_ramp_moved_the_unit_to(
    client: httpx.Client, server: Any
) -> None:
    """A unit in control, then in the treatment after a ramp: feedback by unit (with or
    without the experiment) attaches to its latest arm; one unit row per arm, however
    many requests."""
    assigner = Assigner("s1", "shapes-v2", SPEC["weights"])
    mover = next(u for u in (f"mover-{i}" for i in range(100)) if assigner.assign(u) == "control")
    for _ in range(3):
        assert _infer(client, mover).headers["x-experiment-arm"] == "control"
    before = _feedback_arms(
        client,
        server.db_url,
        [
            {"unit": mover, "event": "click", "experiment": "shapes-v2"},
            {"unit": mover, "event": "click"},
            {"unit": "mover-never-seen", "event": "click"},
            {"unit": mover, "event": "click", "experiment": "another-experiment"},
        ],
    )
    assert before == [
        ("shapes-v2", "control"),
        ("shapes-v2", "control"),
        (None, None),
        ("another-experiment", None),
    ]
    client.post(
        "/v1/experiments/shapes-v2/ramp", json={"weights": {"control": 0, "treatment": 1}}
    ).raise_for_status()
    for _ in range(3):
        assert _infer(client, mover).headers["x-experiment-arm"] == "treatment"
    after = _feedback_arms(
        client,
        server.db_url,
        [
            {"unit": mover, "event": "click", "experiment": "shapes-v2"},
            {"unit": mover, "event": "click"},
        ],
    )
    assert after == [("shapes-v2", "treatment"), ("shapes-v2", "treatment")]
    assert _unit_arms(server.db_url, mover) == [
        ("shapes-v2", "control"),
        ("shapes-v2", "treatment"),
    ]


def _old_layout(db_url: str) -> None:
    """The experiment tables as they were before ab_units (ab_assignments indexed by
    experiment and unit), with assignments of two experiments."""
    engine = open_database(db_url, READ_TABLES)
    t0 = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
    rows = [
        ("o1", "gone", "control", "old-1", "split"),
        ("o2", "shapes-v2", "control", "old-1", "split"),
        ("o3", "shapes-v2", "control", "old-2", "split"),
        ("o3:shadow", "shapes-v2", "treatment", "old-2", "shadow"),
        ("o4", "shapes-v2", "treatment", "old-1", "split"),  # after a ramp
        ("o5", "shapes-v2", "treatment", None, "split"),
        ("o6", "shapes-v2", "control", "old-3", "split"),
        ("o6:shadow", "shapes-v2", "treatment", "old-3", "shadow"),
    ]
    with engine.begin() as conn:
        conn.execute(
            text("CREATE INDEX ab_assignments_by_unit ON ab_assignments (experiment, unit)")
        )
        for index, (request_id, experiment, arm, unit, mode) in enumerate(rows):
            conn.execute(
                assignments.insert().values(
                    request_id=request_id, experiment=experiment, arm=arm, unit=unit,
                    model="shapes", version="1", mode=mode, status_code=200, latency_ms=1.0,
                    logged_at=t0 + dt.timedelta(seconds=index),
                )
            )  # fmt: skip
    engine.dispose()


@pytest.mark.parametrize("database", DATABASES)
def test_a_database_from_before_ab_units_is_upgraded_when_a_server_opens_it(
    database: str, registry_root: Path, tmp_path: Path
) -> None:
    """An older database (assignments indexed by unit, no ab_units): the server fills
    ab_units from each unit's latest split assignment and drops the old index; feedback
    by unit finds the arms it found before. Commands that only read leave it as it is."""
    with contextlib.ExitStack() as stack:
        if database == "sqlite":
            db_url = f"sqlite:///{tmp_path / 'project.db'}"
        else:
            assert POSTGRES_URL
            db_url = stack.enter_context(
                contextlib.contextmanager(postgres_schema_url)(POSTGRES_URL)
            )
        _old_layout(db_url)
        ExperimentStore(db_url, must_exist=True).close()  # `cycleml experiment list`
        engine = create_engine(db_url)
        try:
            assert not inspect(engine).has_table(units.name)
            serve = _serve(registry_root, db_url, experiments={"shapes-v2": SPEC})
            with RunningServer(serve) as running, httpx.Client(base_url=running.url) as client:
                found = _feedback_arms(
                    client,
                    db_url,
                    [
                        {"unit": "old-1", "event": "click", "experiment": "shapes-v2"},
                        {"unit": "old-1", "event": "click"},
                        {"unit": "old-1", "event": "click", "experiment": "gone"},
                        {"unit": "old-2", "event": "click"},
                        {"unit": "old-3", "event": "click", "experiment": "shapes-v2"},
                        {"unit": "never-seen", "event": "click"},
                    ],
                )
            indexes = {index["name"] for index in inspect(engine).get_indexes(assignments.name)}
        finally:
            engine.dispose()
    assert found == [
        ("shapes-v2", "treatment"),
        ("shapes-v2", "treatment"),
        ("gone", "control"),
        ("shapes-v2", "control"),  # shadow mode: the split row's arm
        ("shapes-v2", "control"),
        (None, None),
    ]
    assert "ab_assignments_by_unit" not in indexes
    assert "ab_assignments_by_experiment" in indexes


def test_same_unit_same_arm_on_two_servers_and_after_a_restart(
    registry_root: Path, tmp_path: Path
) -> None:
    db_url = f"sqlite:///{tmp_path / 'project.db'}"
    serve = _serve(registry_root, db_url, experiments={"shapes-v2": SPEC})
    units = [f"stable-{i}" for i in range(16)]

    def arms(url: str) -> list[str]:
        with httpx.Client(base_url=url, timeout=30) as http:
            return [_infer(http, u).headers["x-experiment-arm"] for u in units]

    with RunningServer(serve) as first, RunningServer(serve) as second:
        before = arms(first.url)
        assert arms(second.url) == before
        # a ramp on one server reaches the other one through the store
        httpx.post(
            f"{first.url}/v1/experiments/shapes-v2/ramp",
            json={"weights": {"control": 0.5, "treatment": 0.25}},
        ).raise_for_status()
        ramped = arms(first.url)
        deadline = time.monotonic() + 10
        while arms(second.url) != ramped and time.monotonic() < deadline:
            time.sleep(0.2)
        assert arms(second.url) == ramped
    assert set(before) == {"control", "treatment"}
    with RunningServer(serve) as restarted:
        # the configuration is the same: the ramp survives the restart
        assert arms(restarted.url) == ramped
    expected = Assigner("s1", "shapes-v2", {"control": 0.5, "treatment": 0.25})
    assert ramped == [expected.assign(u) for u in units]


def test_feedback_by_unit_after_a_ramp_and_back_across_two_servers(
    registry_root: Path, tmp_path: Path
) -> None:
    """A unit answered in control by the first server, in the treatment by the second
    after a ramp, and in control by the first again after the ramp back: its feedback
    goes to control, the arm of its latest request, although the first server had
    already written that unit's arm as control before the ramps."""
    db_url = f"sqlite:///{tmp_path / 'project.db'}"
    serve = _serve(registry_root, db_url, experiments={"shapes-v2": SPEC})
    assigner = Assigner("s1", "shapes-v2", SPEC["weights"])
    mover = next(u for u in (f"mover-{i}" for i in range(100)) if assigner.assign(u) == "control")
    # units in control before the ramps: they show which ramp a server routes by
    probes = [u for u in (f"probe-{i}" for i in range(100)) if assigner.assign(u) == "control"]

    def routes(http: httpx.Client, arm: str) -> None:
        """Wait until ``http``'s server routes by the last ramp (other units probe it)."""
        deadline = time.monotonic() + 20
        for probe in probes * 1000:
            if _infer(http, probe).headers["x-experiment-arm"] == arm:
                return
            assert time.monotonic() < deadline, f"the server does not route to {arm}"
            time.sleep(0.1)

    def written(count: int) -> None:
        deadline = time.monotonic() + 20
        while len(_unit_arms(db_url, mover)) < count:
            assert time.monotonic() < deadline, "the unit's arm was not written"
            time.sleep(0.05)

    with (
        RunningServer(serve) as first,
        RunningServer(serve) as second,
        httpx.Client(base_url=first.url, timeout=30) as one,
        httpx.Client(base_url=second.url, timeout=30) as two,
    ):
        assert _infer(one, mover).headers["x-experiment-arm"] == "control"
        written(1)
        one.post(
            "/v1/experiments/shapes-v2/ramp", json={"weights": {"control": 0, "treatment": 1}}
        ).raise_for_status()
        routes(two, "treatment")
        assert _infer(two, mover).headers["x-experiment-arm"] == "treatment"
        written(2)
        two.post(
            "/v1/experiments/shapes-v2/ramp", json={"weights": {"control": 1, "treatment": 0}}
        ).raise_for_status()
        routes(one, "control")
        assert _infer(one, mover).headers["x-experiment-arm"] == "control"
        found = _feedback_arms(one, db_url, [{"unit": mover, "event": "click"}])
    assert found == [("shapes-v2", "control")]
    assert _unit_arms(db_url, mover)[-1] == ("shapes-v2", "control")


@pytest.fixture(scope="module")
def slow_v3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``shapes`` retrained much bigger: tens of milliseconds per row."""
    return export_image_bundle(
        tmp_path_factory.mktemp("slow-shapes"), version="3", channels=256, depth=8, seed=2
    )


def test_shadow_mode_mirrors_to_treatment_without_delaying_control(
    tmp_path: Path, image_bundle: Path, slow_v3: Path
) -> None:
    root = tmp_path / "registry"
    registry = Registry(root=root)
    registry.register(image_bundle)
    assert registry.register(slow_v3)[0].version == 2
    registry.set_alias("shapes", "champion", 1)
    registry.close()
    db_url = f"sqlite:///{tmp_path / 'project.db'}"
    shadow = {
        **SPEC,
        "mode": "shadow",
        "weights": {"control": 0, "treatment": 1},  # every unit is mirrored
    }
    serve = _serve(root, db_url, experiments={"shadow": shadow}, batching={"max_batch_size": 16})
    # 16 rows a request: under a millisecond for control, far longer for the treatment
    rows = np.random.default_rng(5).integers(0, 256, (16, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    latencies = []
    with RunningServer(serve) as running, httpx.Client(base_url=running.url) as client:
        for index in range(12):
            started = time.perf_counter()
            reply = client.post(
                "/v2/models/shapes/infer",
                json=v2_body(rows),
                headers={"X-User-Id": f"u{index}", "X-Request-Id": f"sh-{index}"},
            )
            latencies.append(time.perf_counter() - started)
            assert reply.status_code == 200
            # every answer comes from control
            assert reply.headers["x-experiment-arm"] == reply.json()["arm"] == "control"
            assert reply.headers["x-model-version"] == "1"
        shadow_rows = _wait_rows(db_url, 12, mode="shadow")
        # the treatment on its own, pinned: what waiting for it would cost
        slow = []
        for _ in range(3):
            started = time.perf_counter()
            assert (
                client.post("/v2/models/shapes/versions/2/infer", json=v2_body(rows)).status_code
                == 200
            )
            slow.append(time.perf_counter() - started)
        # feedback by unit: the arm that answered (control), not the mirrored one
        found = _feedback_arms(
            client, db_url, [{"unit": f"u{i}", "event": "click"} for i in range(3)]
        )
        assert found == [("shadow", "control")] * 3
    control_rows = _rows(db_url, mode="split")
    assert len(control_rows) == 12 and {r.arm for r in control_rows} == {"control"}
    assert _unit_arms(db_url, "u0") == [("shadow", "control")]
    assert sorted(r.request_id for r in shadow_rows) == sorted(f"sh-{i}:shadow" for i in range(12))
    assert {(r.arm, r.version, r.status_code) for r in shadow_rows} == {("treatment", "2", 200)}
    # control answered well before one treatment run, and the mirrored calls queued
    assert statistics.median(latencies) < 0.5 * min(slow), (latencies, slow)
    assert statistics.median(r.latency_ms for r in shadow_rows) > 1000 * min(slow) * 0.5


def test_bad_experiment_configs_are_refused_at_load(registry_root: Path, tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'project.db'}"
    with pytest.raises(ConfigError, match="do not sum to a positive"):
        _serve(
            registry_root,
            db_url,
            experiments={"e": {**SPEC, "weights": {"control": 0, "treatment": 0}}},
        )
    with pytest.raises(ConfigError, match="already has the experiment 'a'"):
        _serve(registry_root, db_url, experiments={"a": SPEC, "b": SPEC})
    with pytest.raises(ConfigError, match="need a database"):
        settings(registry_root, experiments={"a": SPEC})
    # an arm naming a version the registry does not have: the server does not start
    unknown = {**SPEC, "arms": {"control": "shapes@champion", "treatment": "shapes/9"}}
    failure = _load_failure(_serve(registry_root, db_url, experiments={"a": unknown}))
    assert "arm 'treatment' (shapes/9)" in failure
    assert "no version 9" in failure


def test_admin_routes_need_a_key_when_auth_is_on(
    registry_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AB_TEST_KEYS", "secret-key")
    db_url = f"sqlite:///{tmp_path / 'project.db'}"
    serve = _serve(registry_root, db_url, auth={"enabled": True, "keys_env": "AB_TEST_KEYS"})
    with RunningServer(serve) as running:
        assert httpx.get(f"{running.url}/v1/experiments").status_code == 401
        assert httpx.put(f"{running.url}/v1/experiments/e", json=SPEC).status_code == 401
        key = {"Authorization": "Bearer secret-key"}
        started = httpx.put(f"{running.url}/v1/experiments/e", json=SPEC, headers=key)
        assert started.status_code == 200, started.text
        listed = httpx.get(f"{running.url}/v1/experiments", headers=key).json()
        assert [(e["name"], e["routed"]) for e in listed["experiments"]] == [("e", True)]


@pytest.mark.slow
def test_cycleml_serve_processes_agree_and_keep_arms_across_a_restart(
    registry_root: Path, tmp_path: Path
) -> None:
    """Real `cycleml serve` processes, the experiment given as config overrides."""
    db_url = f"sqlite:///{tmp_path / 'project.db'}"
    overrides = [
        f"monitoring.db_url={db_url}",
        "access_log=false",
        "+experiments.ab.model=shapes",
        '+experiments.ab.arms.control="shapes@champion"',
        '+experiments.ab.arms.treatment="shapes/2"',
        "+experiments.ab.salt=s1",
    ]
    units = [f"proc-{i}" for i in range(16)]

    def arms(port: int) -> list[str]:
        wait_ready(f"http://127.0.0.1:{port}", timeout_s=120)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            return [_infer(http, u).headers["x-experiment-arm"] for u in units]

    expected = Assigner("s1", "ab", {"control": 1.0, "treatment": 1.0})
    want = [expected.assign(u) for u in units]
    one, two = free_port(), free_port()
    with (
        server_process(registry_root, one, *overrides),
        server_process(registry_root, two, *overrides),
    ):
        assert arms(one) == arms(two) == want
    with server_process(registry_root, one, *overrides):
        assert arms(one) == want


def test_an_experiment_on_a_model_the_server_does_not_serve_is_refused(
    client: httpx.Client, server: Any, registry_root: Path, tmp_path: Path
) -> None:
    """An experiment splits the requests to a served model name: one on a name the
    server does not serve (its arms served or not) would route requests that metadata
    and readiness answer 404 for, so it is refused at start and by the admin route."""
    unserved = {**SPEC, "model": "shapes-ab", "salt": "other"}
    reply = client.put("/v1/experiments/unserved", json=unserved)
    assert reply.status_code == 400, reply.text
    assert "model 'shapes-ab' is not served" in reply.json()["error"]
    assert "experiment 'unserved'" in reply.json()["error"]
    listed = client.get("/v1/experiments").json()["experiments"]
    assert "unserved" not in [e["name"] for e in listed]
    # the name stays unknown everywhere: inference, metadata and readiness agree
    for answer in (
        _infer_name(client, "shapes-ab", "user-1"),
        client.get("/v2/models/shapes-ab"),
        client.get("/v2/models/shapes-ab/ready"),
    ):
        assert answer.status_code == 404, answer.text
        assert "x-experiment-arm" not in answer.headers
    # written to the store by `cycleml experiment start`: this server does not route it
    store = ExperimentStore(server.db_url)
    store.start(ExperimentSpec.from_dict(unserved, name="by-cli"), source="cli")
    try:
        time.sleep(2.5)  # two polls of the store
        listed = client.get("/v1/experiments").json()["experiments"]
        assert [e["routed"] for e in listed if e["name"] == "by-cli"] == [False]
        assert _infer_name(client, "shapes-ab", "user-1").status_code == 404
    finally:
        store.stop("by-cli", source="cli")
        store.close()
    # in serve.yaml's experiments: the server does not start, and says why
    db_url = f"sqlite:///{tmp_path / 'project.db'}"
    failure = _load_failure(_serve(registry_root, db_url, experiments={"ab": unserved}))
    assert "experiment 'ab': model 'shapes-ab' is not served" in failure
    assert "served models: shapes" in failure


def test_cycleml_serve_exits_in_one_line_on_an_experiment_on_an_unserved_model(
    registry_root: Path, tmp_path: Path
) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cycleml.serving.cli",
            f"path={registry_root}",
            f"port={free_port()}",
            "reload.watch=false",
            f"monitoring.db_url=sqlite:///{tmp_path / 'project.db'}",
            "+experiments.ab.model=shapes-ab",
            '+experiments.ab.arms.control="shapes@champion"',
            '+experiments.ab.arms.treatment="shapes/2"',
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"cycleml serve: error: cannot serve '{registry_root}': experiments: experiment 'ab': "
        "model 'shapes-ab' is not served (served models: shapes); an experiment splits the "
        "requests to a served model"
    ]


def _infer_name(
    client: httpx.Client, model: str, unit: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    body, binary_headers = binary_body(PIXELS)
    return client.post(
        f"/v2/models/{model}/infer",
        content=body,
        headers={**binary_headers, "X-User-Id": unit, **(headers or {})},
    )


@pytest.fixture
def two_models(tmp_path: Path, image_bundle: Path, image_bundle_v2: Path) -> Path:
    """A registry of ``shapes`` 1 and ``blocks`` 1, each its own champion."""
    root = tmp_path / "two-models"
    registry = Registry(root=root)
    registry.register(image_bundle)
    registry.register(image_bundle_v2, name="blocks")
    registry.set_alias("shapes", "champion", 1)
    registry.set_alias("blocks", "champion", 1)
    registry.close()
    return root


def test_an_unloaded_model_is_no_longer_routed_to_its_arms(
    two_models: Path, tmp_path: Path
) -> None:
    """The arms of an experiment may be other models; once its own model is unloaded the
    experiment stops routing (404 like metadata, never another model's answers), and
    it routes again once the model is loaded again."""
    db_url = f"sqlite:///{tmp_path / 'project.db'}"
    spec = {
        "model": "shapes",
        "arms": {"control": "shapes@champion", "treatment": "blocks@champion"},
        "weights": {"control": 0, "treatment": 1},
    }
    serve = _serve(two_models, db_url, experiments={"cross": spec})
    with RunningServer(serve) as running, httpx.Client(base_url=running.url, timeout=30) as http:
        before = _infer_name(http, "shapes", "u1")
        assert before.status_code == 200, before.text
        assert _header(before)["model_name"] == "blocks"
        assert before.headers["x-experiment-arm"] == "treatment"
        assert http.post("/v2/repository/models/shapes/unload").status_code == 200
        for answer in (
            _infer_name(http, "shapes", "u1", headers={"X-Request-Id": "after-unload"}),
            http.post(
                "/v1/models/shapes:predict",
                json={"instances": PIXELS.tolist()},
                headers={"X-User-Id": "u1"},
            ),
            http.get("/v2/models/shapes"),
            http.get("/v2/models/shapes/ready"),
        ):
            assert answer.status_code == 404, answer.text
            assert "model 'shapes' is not served" in answer.json()["error"]
            assert "x-experiment-arm" not in answer.headers
        listed = http.get("/v1/experiments").json()["experiments"]
        assert [(e["name"], e["routed"]) for e in listed] == [("cross", False)]
        assert http.post("/v2/repository/models/shapes/load").status_code == 200
        again = _infer_name(http, "shapes", "u1")
        assert again.status_code == 200 and again.headers["x-experiment-arm"] == "treatment"
        assert http.get("/v1/experiments").json()["experiments"][0]["routed"] is True
    assert _rows(db_url, request_id="after-unload") == []


def test_an_arm_that_is_no_longer_served_answers_503_naming_it(
    two_models: Path, tmp_path: Path
) -> None:
    """An arm's model unloaded while the experiment runs: its units get a 503 naming the
    experiment and the arm (the client asked for a served model, not a missing one),
    recorded as such; the other arm keeps answering."""
    db_url = f"sqlite:///{tmp_path / 'project.db'}"
    spec = {
        "model": "shapes",
        "arms": {"control": "shapes@champion", "treatment": "blocks@champion"},
        "salt": "s1",
    }
    assigner = Assigner("s1", "cross", {"control": 1.0, "treatment": 1.0})
    units = [f"u{i}" for i in range(40)]
    serve = _serve(two_models, db_url, experiments={"cross": spec})
    with RunningServer(serve) as running, httpx.Client(base_url=running.url, timeout=30) as http:
        assert http.post("/v2/repository/models/blocks/unload").status_code == 200
        for unit in units:
            arm = assigner.assign(unit)
            for answer in (
                _infer_name(http, "shapes", unit, headers={"X-Request-Id": f"v2-{unit}"}),
                http.post(
                    "/v1/models/shapes:predict",
                    json={"instances": PIXELS.tolist()},
                    headers={"X-User-Id": unit},
                ),
            ):
                assert answer.headers["x-experiment-arm"] == arm
                if arm == "control":
                    assert answer.status_code == 200, answer.text
                    continue
                assert answer.status_code == 503, answer.text
                assert "retry-after" in answer.headers
                error = answer.json()["error"]
                assert "experiment 'cross': arm 'treatment' (blocks@champion)" in error, error
                assert "model 'blocks' is not served" in error, error
        rows = _wait_rows(db_url, len(units), mode="split")
    statuses = {r.request_id: (r.arm, r.status_code) for r in rows}
    for unit in units:
        arm = assigner.assign(unit)
        assert statuses[f"v2-{unit}"] == (arm, 200 if arm == "control" else 503)


def test_an_arm_whose_version_folder_is_removed_answers_503(
    tmp_path: Path, image_bundle: Path, image_bundle_v2: Path
) -> None:
    """A watched folder: the treatment's version is deleted, so the watch stops serving
    it; its units get a 503 naming the arm, the control's units keep their answers."""
    root = tmp_path / "models"
    copy_version(image_bundle, root, "shapes", "1")
    copy_version(image_bundle_v2, root, "shapes", "2")
    db_url = f"sqlite:///{tmp_path / 'project.db'}"
    spec = {"model": "shapes", "arms": {"control": "shapes/2", "treatment": "shapes/1"}}
    serve = _serve(
        root, db_url, experiments={"ab": spec}, reload={"watch": True, "interval_s": 0.1}
    )
    assigner = Assigner("ab", "ab", {"control": 1.0, "treatment": 1.0})
    units = [f"w{i}" for i in range(16)]
    with RunningServer(serve) as running, httpx.Client(base_url=running.url, timeout=30) as http:
        assert {_infer_name(http, "shapes", u).status_code for u in units} == {200}
        shutil.rmtree(root / "shapes" / "1")
        deadline = time.monotonic() + 20
        while "1" in running.app.state.serving.repository.versions("shapes"):
            assert time.monotonic() < deadline, "the watch did not drop version 1"
            time.sleep(0.05)
        for unit in units:
            answer = _infer_name(http, "shapes", unit)
            if assigner.assign(unit) == "control":
                assert answer.status_code == 200 and answer.headers["x-model-version"] == "2"
            else:
                assert answer.status_code == 503, answer.text
                assert "arm 'treatment' (shapes/1) is not served" in answer.json()["error"]
                assert "no version '1'" in answer.json()["error"]


def _messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def _wait_for(check: Any, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_an_experiment_that_cannot_route_loads_no_arm_version(
    two_models: Path, tmp_path: Path, image_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The experiment's model was unloaded and the experiment was never routed here:
    an arm naming an explicit version of another model is not loaded (and retired, and
    loaded again at every poll of the store) for an experiment that cannot route."""
    registry = Registry(root=two_models)
    registry.register(image_bundle, name="blocks")  # blocks 2: served for experiments only
    registry.close()
    db_url = f"sqlite:///{tmp_path / 'project.db'}"
    spec = {"model": "shapes", "arms": {"control": "shapes@champion", "treatment": "blocks/2"}}
    caplog.set_level(logging.INFO, logger="cycleml.serving")
    # the prediction log on: the server reads the store's experiments from start-up
    serve = _serve(two_models, db_url, monitoring={"db_url": db_url, "enabled": True})
    with RunningServer(serve) as running:
        http = httpx.Client(base_url=running.url, timeout=30)
        repository = running.state.repository
        assert http.post("/v2/repository/models/shapes/unload").status_code == 200
        store = ExperimentStore(db_url)
        try:
            store.start(ExperimentSpec.from_dict(spec, name="cross"), source="cli")
            # on a served model, an arm that cannot be served after one that loads
            odd = {"model": "blocks", "arms": {"control": "blocks/2", "treatment": "shapes@x"}}
            store.start(ExperimentSpec.from_dict(odd, name="odd"), source="cli")
            time.sleep(3.5)  # three polls of the store
            listed = http.get("/v1/experiments").json()["experiments"]
            assert [(e["name"], e["routed"]) for e in listed] == [("cross", False), ("odd", False)]
            assert repository.versions("blocks") == ["1"]
            assert len(_messages(caplog, "experiment odd is not routed")) == 1
            assert _messages(caplog, "loaded model blocks version 2") == []
            assert len(_messages(caplog, "experiment cross is not routed")) == 1
            why = _messages(caplog, "is not routed")[0]
            assert "model 'shapes' was unloaded on request; load it first" in why, why
            # the model loaded again: the experiment routes, and serves its arm's version
            assert http.post("/v2/repository/models/shapes/load").status_code == 200
            _wait_for(
                lambda: http.get("/v1/experiments").json()["experiments"][0]["routed"],
                "the experiment did not route once its model was loaded",
            )
            assert repository.versions("blocks") == ["1", "2"]
            assert [e["routed"] for e in http.get("/v1/experiments").json()["experiments"]] == [
                True,
                False,
            ]
            assert "model 'shapes' has no alias 'x'" in _messages(caplog, "odd is not routed")[-1]
        finally:
            store.close()
            http.close()


def test_an_experiment_does_not_reload_a_model_unloaded_on_request(
    two_models: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An unload on request holds until a load: an experiment whose arm names a version
    of that model is not routed (logged once, listed as not routed) instead of loading
    the model again; once the model is loaded the experiment routes."""
    db_url = f"sqlite:///{tmp_path / 'project.db'}"
    spec = {
        "model": "shapes",
        "arms": {"control": "shapes/1", "treatment": "blocks@champion"},
        "weights": {"control": 0, "treatment": 1},
    }
    caplog.set_level(logging.INFO, logger="cycleml.serving")
    # the prediction log on: the server reads the store's experiments from start-up
    serve = _serve(two_models, db_url, monitoring={"db_url": db_url, "enabled": True})
    with RunningServer(serve) as running:
        http = httpx.Client(base_url=running.url, timeout=30)
        assert http.post("/v2/repository/models/shapes/unload").status_code == 200
        store = ExperimentStore(db_url)
        try:
            store.start(ExperimentSpec.from_dict(spec, name="cross"), source="cli")
            time.sleep(3.5)  # three polls of the store
            assert http.get("/v2/models/shapes/ready").status_code == 404
            assert running.state.repository.versions("shapes") == []
            listed = http.get("/v1/experiments").json()["experiments"]
            assert [(e["name"], e["routed"]) for e in listed] == [("cross", False)]
            assert _infer_name(http, "shapes", "u1").status_code == 404
            why = _messages(caplog, "experiment cross is not routed")
            assert len(why) == 1, why
            assert "model 'shapes' was unloaded on request; load it first" in why[0]
            # the admin route refuses it too, naming the reason
            reply = http.put("/v1/experiments/other", json={**spec, "salt": "x"})
            assert reply.status_code == 400, reply.text
            assert "model 'shapes' was unloaded on request" in reply.json()["error"]
            # loaded again: the experiment routes
            assert http.post("/v2/repository/models/shapes/load").status_code == 200
            _wait_for(
                lambda: http.get("/v1/experiments").json()["experiments"][0]["routed"],
                "the experiment did not route once its model was loaded",
            )
            answer = _infer_name(http, "shapes", "u1")
            assert answer.status_code == 200, answer.text
            assert answer.headers["x-experiment-arm"] == "treatment"
        finally:
            store.close()
            http.close()


def test_stopping_an_experiment_does_not_reload_a_model_unloaded_on_request(
    two_models: Path, tmp_path: Path, image_bundle: Path
) -> None:
    """An arm's model unloaded while the experiment runs stays unloaded when the
    experiment stops (its arm's version is released, nothing else is loaded)."""
    registry = Registry(root=two_models)
    registry.register(image_bundle, name="blocks")
    registry.close()
    db_url = f"sqlite:///{tmp_path / 'project.db'}"
    spec = {"model": "shapes", "arms": {"control": "shapes@champion", "treatment": "blocks/2"}}
    serve = _serve(two_models, db_url, experiments={"cross": spec})
    with RunningServer(serve) as running, httpx.Client(base_url=running.url, timeout=30) as http:
        repository = running.state.repository
        assert repository.versions("blocks") == ["1", "2"]
        assert http.post("/v2/repository/models/blocks/unload").status_code == 200
        assert http.post("/v1/experiments/cross/stop").status_code == 200
        time.sleep(1.5)  # a poll of the store, a poll of the registry
        assert repository.versions("blocks") == []
        assert http.get("/v2/models/blocks/ready").status_code == 404
        assert http.post("/v2/repository/models/blocks/load").status_code == 200
        assert repository.versions("blocks") == ["1"]


@pytest.mark.parametrize("broken", ["model.onnx", "bundle.json"])
def test_an_arm_whose_version_does_not_load_is_tried_again_only_once_its_files_change(
    tmp_path: Path,
    image_bundle: Path,
    image_bundle_v2: Path,
    caplog: pytest.LogCaptureFixture,
    broken: str,
) -> None:
    """An arm names a version whose model file is truncated (or whose bundle.json is
    not valid JSON): the experiment is not routed (logged once, listed as not routed,
    the admin route answers naming the arm and the failure), the broken version is not
    loaded again at every poll of the store, nor the other arm's version loaded and
    retired each time; once the file is fixed the next poll loads it and the
    experiment routes."""
    root = tmp_path / "models"
    copy_version(image_bundle, root, "shapes", "1")
    broken_file = copy_version(image_bundle_v2, root, "shapes", "2") / broken
    good = broken_file.read_bytes()
    broken_file.write_bytes(good[: len(good) // 2])
    copy_version(image_bundle_v2, root, "shapes", "3")  # the newest: served by the folder
    db_url = f"sqlite:///{tmp_path / 'project.db'}"
    spec = {
        "model": "shapes",
        "arms": {"control": "shapes/1", "treatment": "shapes/2"},
        "weights": {"control": 0, "treatment": 1},
    }
    caplog.set_level(logging.INFO, logger="cycleml.serving")
    # the prediction log on: the server reads the store's experiments from start-up
    serve = _serve(root, db_url, monitoring={"db_url": db_url, "enabled": True})
    with RunningServer(serve) as running:
        http = httpx.Client(base_url=running.url, timeout=30)
        repository = running.state.repository
        assert repository.versions("shapes") == ["3"]
        store = ExperimentStore(db_url)
        try:
            store.start(ExperimentSpec.from_dict(spec, name="ab"), source="cli")
            time.sleep(3.5)  # three polls of the store
            failures = _messages(caplog, "cannot load model shapes version 2")
            assert len(failures) == 1, failures
            assert len(_messages(caplog, "loaded model shapes version 1")) <= 1
            assert len(_messages(caplog, "retired model shapes version 1")) <= 1
            assert repository.versions("shapes") == ["3"]
            why = _messages(caplog, "experiment ab is not routed")
            assert len(why) == 1, why
            assert "arm 'treatment' (shapes/2) cannot be served" in why[0], why[0]
            assert broken in why[0], why[0]
            listed = http.get("/v1/experiments").json()["experiments"]
            assert [(e["name"], e["routed"]) for e in listed] == [("ab", False)]
            answer = _infer_name(http, "shapes", "u1")
            assert answer.status_code == 200 and "x-experiment-arm" not in answer.headers
            # the admin route answers naming the arm and the load failure
            reply = http.put("/v1/experiments/other", json={**spec, "salt": "x"})
            assert reply.status_code == 400, reply.text
            error = reply.json()["error"]
            assert "arm 'treatment' (shapes/2) cannot be served" in error, error
            assert "failed to load" in error and broken in error, error
            # the file fixed: the next poll loads the version and the experiment routes
            broken_file.write_bytes(good)
            _wait_for(
                lambda: http.get("/v1/experiments").json()["experiments"][0]["routed"],
                "the experiment did not route once its arm's version was fixed",
            )
            answer = _infer_name(http, "shapes", "u1")
            assert answer.status_code == 200, answer.text
            assert answer.headers["x-experiment-arm"] == "treatment"
            assert answer.headers["x-model-version"] == "2"
            assert repository.versions("shapes") == ["1", "2", "3"]
            assert len(_messages(caplog, "loaded model shapes version 2")) == 1
        finally:
            store.close()
            http.close()


def test_an_event_name_of_only_whitespace_is_refused() -> None:
    for name in (" ", "   ", "\u00a0\u2003"):
        body = json.dumps({"request_id": "r-1", "event": name}).encode()
        with pytest.raises(ProtocolError, match="event must be a name, got only whitespace"):
            parse_feedback_items(body)
    _, events = parse_feedback_items(b'{"request_id": "r-1", "event": "click"}')
    assert events[0].event == "click"
