"""Experiment assignment and the experiment store: pure Python and a real SQLite file."""

from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from cycleml.experiments.assign import BUCKETS, Assigner, boundaries, bucket, pick_arm
from cycleml.experiments.store import ExperimentError, ExperimentSpec, ExperimentStore
from test_predict_support import DATABASES, POSTGRES_URL
from test_registry_support import postgres_schema_url


@pytest.fixture(params=DATABASES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh SQLite file, or a throw-away schema of the test PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ab.db'}"
    else:
        assert POSTGRES_URL
        yield from postgres_schema_url(POSTGRES_URL)


def spec(**changes: object) -> ExperimentSpec:
    data: dict = {
        "name": "new-digits",
        "model": "digits",
        "arms": {"control": "digits@champion", "treatment": "digits/7"},
        "weights": {"control": 0.9, "treatment": 0.1},
        "unit": {"header": "X-User-Id"},
        "salt": "s1",
    }
    data.update(changes)
    return ExperimentSpec.from_dict(data)


def test_split_of_100000_units_is_within_one_point_of_the_weights() -> None:
    weights = {"control": 0.7, "treatment": 0.2, "other": 0.1}
    assigner = Assigner("salt", "exp", weights)
    counts = Counter(assigner.assign(f"user-{i}") for i in range(100_000))
    for arm, weight in weights.items():
        assert abs(counts[arm] / 100_000 - weight) < 0.01, counts


def test_random_assignment_without_unit_follows_the_weights() -> None:
    assigner = Assigner("salt", "exp", {"a": 1, "b": 3})
    counts = Counter(assigner.assign(None) for _ in range(40_000))
    assert abs(counts["b"] / 40_000 - 0.75) < 0.015


def test_assigner_agrees_with_the_plain_functions() -> None:
    weights = {"control": 0.5, "treatment": 0.5}
    assigner = Assigner("s", "e", weights)
    for unit in ("a", "b", "üser", "x" * 200, ""):
        assert assigner.bucket(unit) == bucket("s", "e", unit)
        assert assigner.assign(unit) == pick_arm(bucket("s", "e", unit), weights)


def test_buckets_are_stable_across_processes() -> None:
    code = (
        "from cycleml.experiments.assign import bucket;"
        "print([bucket('s', 'e', f'u{i}') for i in range(50)])"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert other == str([bucket("s", "e", f"u{i}") for i in range(50)])
    # a different salt or experiment reshuffles units
    assert [bucket("t", "e", f"u{i}") for i in range(50)] != eval(other)  # noqa: S307
    assert all(0 <= bucket("s", "e", f"u{i}") < BUCKETS for i in range(1000))


def test_ranges_follow_sorted_arms_and_zero_weights_own_nothing() -> None:
    assert boundaries({"treatment": 1, "control": 3}) == (
        ("control", "treatment"),
        (7500, 10_000),
    )
    assert pick_arm(0, {"control": 0, "treatment": 1}) == "treatment"
    assert pick_arm(BUCKETS - 1, {"control": 1, "treatment": 0}) == "control"
    assert pick_arm(7499, {"treatment": 1, "control": 3}) == "control"
    assert pick_arm(7500, {"treatment": 1, "control": 3}) == "treatment"
    with pytest.raises(ValueError, match="positive"):
        boundaries({"a": 0, "b": 0})


def test_ramping_up_treatment_only_moves_control_units_to_treatment() -> None:
    before = Assigner("s", "e", {"control": 0.9, "treatment": 0.1})
    after = Assigner("s", "e", {"control": 0.5, "treatment": 0.5})
    units = [f"u{i}" for i in range(5000)]
    for unit in units:
        if before.assign(unit) == "treatment":
            assert after.assign(unit) == "treatment"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"weights": {"control": 0, "treatment": 0}}, "do not sum to a positive"),
        ({"weights": {"control": -1, "treatment": 2}}, "finite and ≥ 0"),
        ({"weights": {"control": "x", "treatment": 2}}, "must be a number"),
        ({"weights": {"control": 1, "other": 2}}, "unknown arms"),
        ({"weights": {"control": 1}}, "miss the arms"),
        ({"arms": {"control": "digits@champion"}}, "at least two arm"),
        ({"arms": {"control": "digits@champion", "treatment": "digits/x"}}, "arm 'treatment'"),
        ({"model": "digits/3"}, "model .digits/3. is not allowed"),
        ({"unit": {"cookie": "x"}}, "unit must be"),
        ({"unit": {"header": "X User"}}, "unit must be"),
        ({"mode": "canary"}, "mode must be"),
        ({"mode": "shadow", "arms": {"a": "digits/1", "b": "digits/2"}}, "shadow mode needs"),
        ({"salt": ""}, "salt must be"),
        ({"salt": "s\x00"}, "salt must be non-empty printable text"),
        # each weight finite, their sum not
        ({"weights": {"control": 1e308, "treatment": 1e308}}, "sum to more than the largest"),
        ({"extra": 1}, "unknown keys"),
        # what the admin route lists may come back; a revision that is no count is
        # the client's error, not a failing database
        ({"revision": [1]}, "revision must be a whole number"),
        ({"revision": "abc"}, "revision must be a whole number"),
        ({"revision": -1}, "revision must be a whole number"),
        ({"name": "bad name"}, "experiment name"),
    ],
)
def test_bad_specs_are_refused_naming_the_problem(changes: dict, message: str) -> None:
    with pytest.raises(ExperimentError, match=message):
        spec(**changes)


def test_spec_defaults_and_shorthand_unit() -> None:
    made = ExperimentSpec.from_dict(
        {
            "model": "digits",
            "arms": {"control": "digits/1", "b": "digits/2"},
            "unit": "parameter:uid",
        },
        name="e1",
    )
    assert made.weights == {"control": 1.0, "b": 1.0}
    assert made.salt == "e1"
    assert made.unit == {"parameter": "uid"}
    assert spec().unit == {"header": "x-user-id"}
    # a weight of -0.0 is 0 (not shown as "-0" in listings and reports)
    zero = spec(weights={"control": -0.0, "treatment": 1})
    assert math.copysign(1.0, zero.weights["control"]) == 1.0
    # what GET /v1/experiments lists may be sent back as it is
    listed = {**spec().to_dict(), "revision": 7, "created_at": "2026-01-01T00:00:00+00:00"}
    assert ExperimentSpec.from_dict(listed).same_setup(spec())


def test_store_start_ramp_stop_and_changes(db_url: str) -> None:
    store = ExperimentStore(db_url)
    started = store.start(spec(), source="config")
    assert started.revision == 1 and started.status == "running"
    assert started.created_at is not None and started.created_at.tzinfo is not None
    # the same config again (a restart) adds no change
    assert store.start(spec(), source="config").revision == 1
    ramped = store.ramp("new-digits", {"treatment": 0.5}, source="admin", note="ramp up")
    assert ramped.weights == {"control": 0.9, "treatment": 0.5}
    assert ramped.revision == 2
    stopped = store.stop("new-digits", source="cli")
    assert stopped.status == "stopped" and stopped.revision == 3
    with pytest.raises(ExperimentError, match="is stopped"):
        store.ramp("new-digits", {"treatment": 1}, source="cli")
    restarted = store.start(spec(weights={"control": 1, "treatment": 1}), source="admin")
    assert restarted.status == "running" and restarted.revision == 4
    actions = [(c["source"], c["action"]) for c in store.changes("new-digits")]
    assert actions == [("config", "start"), ("admin", "ramp"), ("cli", "stop"), ("admin", "start")]
    assert store.changes("new-digits")[1]["weights_before"] == {"control": 0.9, "treatment": 0.1}
    # another process (a second server, the CLI) sees the same store
    assert ExperimentStore(store.db_url).get("new-digits").weights == restarted.weights
    assert [s.name for s in store.list()] == ["new-digits"]


def test_store_refuses_bad_changes(db_url: str) -> None:
    store = ExperimentStore(db_url)
    store.start(spec(), source="config")
    with pytest.raises(ExperimentError, match="already has the running experiment 'new-digits'"):
        store.start(spec(name="second"), source="admin")
    with pytest.raises(ExperimentError, match="known experiments: \\['new-digits'\\]"):
        store.get("nope")
    with pytest.raises(ExperimentError, match="do not sum to a positive"):
        store.ramp("new-digits", {"control": 0, "treatment": 0}, source="admin")
    with pytest.raises(ExperimentError, match="unknown arms"):
        store.ramp("new-digits", {"third": 1}, source="admin")
    with pytest.raises(ExperimentError, match="sum to more than the largest number"):
        store.ramp("new-digits", {"control": 1e308, "treatment": 1e308}, source="admin")
    assert store.get("new-digits").weights == {"control": 0.9, "treatment": 0.1}
    with pytest.raises(ExperimentError, match="source must be"):
        store.stop("new-digits", source="web")
    store.stop("new-digits", source="admin")
    # once stopped, another experiment may take the model
    assert store.start(spec(name="second"), source="admin").status == "running"


def test_configured_experiment_keeps_its_ramps_across_restarts(db_url: str) -> None:
    store = ExperimentStore(db_url)
    assert store.ensure(spec(), source="config").revision == 1
    store.ramp("new-digits", {"treatment": 0.3}, source="cli")
    # a restart with the same configuration keeps the ramp
    kept = ExperimentStore(db_url).ensure(spec(), source="config")
    assert kept.weights == {"control": 0.9, "treatment": 0.3} and kept.revision == 2
    store.stop("new-digits", source="cli")
    assert store.ensure(spec(), source="config").status == "stopped"
    # a changed setup (another salt) is an update from the configuration
    changed = store.ensure(spec(salt="s2"), source="config")
    assert changed.status == "running" and changed.salt == "s2"
    assert store.changes("new-digits")[-1]["action"] == "start"
    assert store.changes("new-digits")[-1]["note"] == "configuration changed"


def test_a_spec_saying_stopped_does_not_start_an_experiment(db_url: str) -> None:
    store = ExperimentStore(db_url)
    stopped = ExperimentSpec.from_dict({**spec().to_dict(), "status": "stopped"})
    for call in (store.start, store.ensure):
        with pytest.raises(ExperimentError, match="status 'stopped' in a spec that starts it"):
            call(stopped, source="config")
    assert store.list() == []  # nothing stored, nothing running
    # the same spec once stopped by a command stays stopped; the config cannot run it
    store.ensure(spec(), source="config")
    store.stop("new-digits", source="cli")
    with pytest.raises(ExperimentError, match="cycleml experiment stop"):
        store.ensure(stopped, source="config")
    assert store.get("new-digits").status == "stopped"
