"""The experiment report from a database filled with simulated assignments and events:
what it counts per arm, the verdict, SRM, guardrails, accuracy, and the files."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest

from cycleml.errors import ConfigError, DataError
from cycleml.experiments.assign import Assigner
from cycleml.experiments.report import ReportSettings, build_report, write_experiment_report
from cycleml.experiments.store import ExperimentError, ExperimentSpec, ExperimentStore
from cycleml.experiments.tables import assignments, events
from test_registry_support import database_url

T0 = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    yield from database_url(request.param, tmp_path, "project.db")


def start(store: ExperimentStore, name: str = "new-model", mode: str = "split") -> ExperimentSpec:
    spec = ExperimentSpec.from_dict(
        {
            "name": name,
            "model": "digits",
            "arms": {"control": "digits@champion", "treatment": "digits/2"},
            "weights": {"control": 0.5, "treatment": 0.5},
            "mode": mode,
        }
    )
    return store.start(spec, source="cli")


def simulate(
    store: ExperimentStore,
    spec: ExperimentSpec,
    units: int,
    rates: dict[str, float],
    seed: int,
    *,
    alternate: bool = False,
    drop_treatment_every: int = 0,
    slow_treatment_ms: float = 0.0,
    treatment_errors: float = 0.0,
    anonymous: int = 0,
) -> None:
    """One request per unit over one hour (hash-assigned, or alternating arms), a
    conversion event per converted unit (half by unit id, half by request id)."""
    rng = np.random.default_rng(seed)
    assigner = Assigner(spec.salt, spec.name, spec.weights)
    calls, outcomes = [], []
    treatment_seen = 0
    for i in range(units + anonymous):
        unit = f"user-{i}" if i < units else None
        arm = ("control" if i % 2 == 0 else "treatment") if alternate else assigner.assign(unit)
        if arm == "treatment":
            treatment_seen += 1
            if drop_treatment_every and treatment_seen % drop_treatment_every == 0:
                continue  # this request's assignment was never logged
        at = T0 + dt.timedelta(seconds=3600 * i / (units + anonymous))
        failed = arm == "treatment" and rng.random() < treatment_errors
        latency = rng.gamma(4.0, 5.0) + (slow_treatment_ms if arm == "treatment" else 0.0)
        calls.append({
            "request_id": f"{spec.name}-r{i}", "experiment": spec.name, "arm": arm, "unit": unit,
            "model": "digits", "version": "1" if arm == "control" else "2", "mode": "split",
            "logged_at": at, "status_code": 500 if failed else 200, "latency_ms": latency,
        })  # fmt: skip
        if rng.random() < rates[arm]:
            by_unit = unit is not None and i % 2 == 0
            outcomes.append({
                "received_at": at + dt.timedelta(seconds=30), "experiment": spec.name,
                "request_id": None if by_unit else f"{spec.name}-r{i}", "unit": unit if by_unit else None,
                "event": "conversion", "value": 1.0, "arm": arm,
            })  # fmt: skip
    with store.engine.begin() as conn:
        conn.execute(assignments.insert(), calls)
        if outcomes:
            conn.execute(events.insert(), outcomes)


def test_report_declares_the_treatment_the_winner(db_url, tmp_path):
    store = ExperimentStore(db_url)
    try:
        spec = start(store)
        simulate(store, spec, 20_000, {"control": 0.10, "treatment": 0.12}, seed=1, anonymous=200)
        report = build_report(store, spec.name, ReportSettings(min_effect=0.01))
    finally:
        store.close()
    arms = report["arms"]
    assert arms["control"]["units"] + arms["treatment"]["units"] == 20_200
    assert arms["control"]["requests"] == arms["control"]["units"]  # one request per unit
    assert arms["treatment"]["versions"] == ["2"]
    assert 0.09 < arms["control"]["rate"] < 0.11 and 0.11 < arms["treatment"]["rate"] < 0.13
    (comparison,) = report["comparisons"]
    assert comparison["difference"] == pytest.approx(
        arms["treatment"]["rate"] - arms["control"]["rate"]
    )
    low, high = comparison["difference_ci"]
    assert low < comparison["difference"] < high and low > 0
    assert comparison["p_value"] < 1e-4 and comparison["sequential_p_value"] < 0.05
    assert report["verdict"]["code"] == "treatment_wins"
    assert report["verdict"]["arm"] == "treatment"
    assert not report["srm"]["mismatch"] and report["guardrails"]["ok"]
    # the p-values over the looks: 20 buckets, the sequential one never rises
    sequential = report["looks"]["comparisons"]["treatment"]["sequential_p_value"]
    assert len(sequential) == 20 and sequential == sorted(sequential, reverse=True)
    assert report["looks"]["arms"]["control"]["n"][-1] == arms["control"]["trials"]
    json_path, html_path = write_experiment_report(report, tmp_path / "out")
    assert json.loads(json_path.read_text())["verdict"]["code"] == "treatment_wins"
    page = html_path.read_text()
    assert "Verdict: treatment wins" in page and "data:image/png;base64," in page
    # a folder that cannot be made is named (a ConfigError: one line, exit status 2)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"cannot write the report to '.*file/out': Not a dir"):
        write_experiment_report(report, tmp_path / "file" / "out")


def test_a_5_percent_loss_of_treatment_assignments_is_a_sample_ratio_mismatch(tmp_path):
    store = ExperimentStore(f"sqlite:///{tmp_path / 'project.db'}")
    spec = start(store)
    # exactly 10,000 units per arm, then every 20th treatment assignment lost: 10,000
    # vs 9,500 (chi-square 12.8, p = 3.4e-4)
    simulate(store, spec, 20_000, {"control": 0.10, "treatment": 0.20}, seed=2, alternate=True,
             drop_treatment_every=20)  # fmt: skip
    report = build_report(store, spec.name)
    assert report["srm"]["counts"] == {"control": 10_000, "treatment": 9_500}
    assert report["srm"]["mismatch"] and report["srm"]["p_value"] < 0.001
    # a large difference, but the verdict refuses it
    assert report["comparisons"][0]["p_value"] < 1e-10
    assert report["verdict"]["code"] == "invalid"
    assert report["verdict"]["text"].startswith("do not trust: sample ratio mismatch")
    # without the loss: no mismatch
    store.stop(spec.name, source="cli")
    clean = start(store, "clean")
    simulate(store, clean, 20_000, {"control": 0.10, "treatment": 0.10}, seed=3, alternate=True)
    report = build_report(store, clean.name)
    assert not report["srm"]["mismatch"] and report["srm"]["p_value"] == 1.0
    assert report["verdict"]["code"] == "no_difference_yet"
    assert "units per arm" in report["verdict"]["text"]
    store.close()


def test_guardrails_flag_a_slower_and_failing_treatment(tmp_path):
    store = ExperimentStore(f"sqlite:///{tmp_path / 'project.db'}")
    spec = start(store)
    simulate(store, spec, 4000, {"control": 0.10, "treatment": 0.10}, seed=4,
             slow_treatment_ms=30.0, treatment_errors=0.05)  # fmt: skip
    report = build_report(store, spec.name)
    guard = report["guardrails"]
    assert not guard["ok"] and len(guard["breaches"]) == 2
    assert guard["arms"]["control"]["error_rate"] == 0.0
    assert 0.03 < guard["arms"]["treatment"]["error_rate"] < 0.07
    assert guard["arms"]["treatment"]["error_rate_p_value"] < 1e-6
    assert any("p99 latency" in b for b in guard["breaches"])
    relaxed = build_report(
        store, spec.name,
        ReportSettings(max_error_rate_increase=0.2, max_p99_latency_increase=5.0),
    )  # fmt: skip
    assert relaxed["guardrails"]["ok"]
    store.close()


def test_per_request_metric_and_ramps(tmp_path):
    store = ExperimentStore(f"sqlite:///{tmp_path / 'project.db'}")
    spec = start(store)
    simulate(store, spec, 2000, {"control": 0.3, "treatment": 0.3}, seed=5)
    per_request = build_report(store, spec.name, ReportSettings(per="request", bucket="15min"))
    # events sent by unit cannot count per request
    assert any("sent by unit" in note for note in per_request["notes"])
    # an hour of requests, the last events 30 s later: five 15-minute looks
    assert len(per_request["looks"]["end"]) == 5
    total = sum(a["successes"] for a in per_request["arms"].values())
    assert 0.1 < total / 2000 < 0.2  # half of the ~30% conversions came by request id
    store.ramp(spec.name, {"treatment": 0.9}, source="cli")
    ramped = build_report(store, spec.name)
    assert any("weights changed 1 times" in note for note in ramped["notes"])


def test_accuracy_from_labels_of_the_prediction_log(tmp_path):
    from cycleml.db import open_database
    from cycleml.monitoring.tables import predictions

    url = f"sqlite:///{tmp_path / 'project.db'}"
    store = ExperimentStore(url)
    spec = start(store)
    simulate(store, spec, 400, {"control": 0.1, "treatment": 0.1}, seed=6, alternate=True)
    engine = open_database(url, create=[predictions])
    with engine.begin() as conn:
        conn.execute(predictions.insert(), [
            {"request_id": f"new-model-r{i}", "logged_at": T0, "model": "digits", "version": "1",
             "predicted_class": 0, "predicted_label": "a", "probabilities": b"",
             "features": {}, "label": "a" if (i % 2 == 0 or i % 4 == 1) else "b",
             "labeled_at": T0 + dt.timedelta(minutes=1)}
            for i in range(400)
        ])  # fmt: skip
    engine.dispose()
    # control (even i) always right, treatment (odd i) right half of the time
    report = build_report(store, spec.name)
    assert report["arms"]["control"]["accuracy"] == {"labelled": 200, "accuracy": 1.0}
    assert report["arms"]["treatment"]["accuracy"] == {"labelled": 200, "accuracy": 0.5}
    by_accuracy = build_report(store, spec.name, ReportSettings(event="accuracy"))
    assert by_accuracy["metric"]["event"] == "accuracy"
    assert by_accuracy["verdict"]["code"] == "control_wins"
    store.close()


def test_unknown_experiment_and_empty_data_are_named(tmp_path):
    store = ExperimentStore(f"sqlite:///{tmp_path / 'project.db'}")
    with pytest.raises(
        ExperimentError, match="no experiment named 'nope'; known experiments: none"
    ):
        build_report(store, "nope")
    spec = start(store)
    with pytest.raises(DataError, match="no logged requests yet.*header x-user-id"):
        build_report(store, spec.name)
    with pytest.raises(Exception, match="control='ctrl' is no arm"):
        build_report(store, spec.name, ReportSettings(control="ctrl"))
    store.close()


def test_report_without_events_says_so(tmp_path: Path):
    store = ExperimentStore(f"sqlite:///{tmp_path / 'project.db'}")
    spec = start(store)
    simulate(store, spec, 100, {"control": 0.0, "treatment": 0.0}, seed=7)
    report = build_report(store, spec.name)
    assert any("no 'conversion' events" in note for note in report["notes"])
    assert report["verdict"]["code"] == "no_difference_yet"
    write_experiment_report(report, tmp_path / "out")  # plots of empty rates draw
    (note,) = [n for n in report["notes"] if "'conversion' events" in n]
    assert "events recorded for it" not in note  # there are none of any name
    # a misspelled metric.event: the note names the events that were recorded
    store.stop(spec.name, source="cli")  # one running experiment per model
    simulate(store, start(store, "typo"), 400, {"control": 0.3, "treatment": 0.3}, seed=8)
    report = build_report(store, "typo", ReportSettings(event="convertion"))
    assert any(
        "no 'convertion' events" in n and "events recorded for it: conversion" in n
        for n in report["notes"]
    ), report["notes"]
    store.close()


def test_an_event_name_with_dollar_signs_is_drawn_as_text(tmp_path: Path):
    """Event names are whatever clients send to /v1/feedback; one with "$" in the
    report's metric must not be parsed as matplotlib mathtext (a traceback)."""
    store = ExperimentStore(f"sqlite:///{tmp_path / 'project.db'}")
    spec = start(store)
    simulate(store, spec, 200, {"control": 0.2, "treatment": 0.3}, seed=5)
    with store.engine.begin() as conn:
        conn.execute(events.update().values(event="a$^$b <i>"))
    report = build_report(store, spec.name, ReportSettings(event="a$^$b <i>"))
    store.close()
    assert report["arms"]["treatment"]["successes"] > 0
    _, html_path = write_experiment_report(report, tmp_path / "out")
    page = html_path.read_text()
    assert "a$^$b &lt;i&gt; rate per unit" in page and "<i>" not in page


def test_units_in_an_arm_of_weight_0_make_a_mismatch_written_as_strict_json(tmp_path: Path):
    """An arm that should get no units but got some (a server that had not yet read a
    ramp to 0): chi-square is infinite, which report.json writes as null, not Infinity."""
    store = ExperimentStore(f"sqlite:///{tmp_path / 'project.db'}")
    spec = store.start(
        ExperimentSpec.from_dict(
            {
                "name": "all-control",
                "model": "digits",
                "arms": {"control": "digits@champion", "treatment": "digits/2"},
                "weights": {"control": 1, "treatment": 0},
            }
        ),
        source="cli",
    )
    simulate(store, spec, 300, {"control": 0.1, "treatment": 0.1}, seed=4, alternate=True)
    report = build_report(store, spec.name)
    store.close()
    assert report["srm"]["mismatch"] and report["srm"]["chi2"] is None
    assert report["verdict"]["code"] == "invalid"
    json_path, html_path = write_experiment_report(report, tmp_path / "out")

    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    assert json.loads(json_path.read_text(), parse_constant=refuse)["srm"]["chi2"] is None
    assert "MISMATCH" in html_path.read_text()


def test_shadow_mode_compares_accuracy_on_the_mirrored_requests(tmp_path):
    from cycleml.db import open_database
    from cycleml.monitoring.tables import predictions

    url = f"sqlite:///{tmp_path / 'project.db'}"
    store = ExperimentStore(url)
    spec = start(store, "shadow-test", mode="shadow")
    assigner = Assigner(spec.salt, spec.name, spec.weights)
    calls, logged = [], []
    for i in range(600):
        unit, at = f"user-{i}", T0 + dt.timedelta(seconds=i)
        mirrored = assigner.assign(unit) == "treatment"
        row = {"request_id": f"s{i}", "experiment": spec.name, "arm": "control", "unit": unit,
               "model": "digits", "version": "1", "mode": "split", "logged_at": at,
               "status_code": 200, "latency_ms": 10.0}  # fmt: skip
        calls.append(row)
        # the control is right on every third request, the treatment on all
        logged.append({"request_id": f"s{i}", "predicted_label": "a" if i % 3 == 0 else "b"})
        if mirrored:
            calls.append({**row, "request_id": f"s{i}:shadow", "arm": "treatment",
                          "version": "2", "mode": "shadow", "latency_ms": 30.0})  # fmt: skip
            logged.append({"request_id": f"s{i}:shadow", "predicted_label": "a"})
    engine = open_database(url, create=[predictions])
    with engine.begin() as conn:
        conn.execute(assignments.insert(), calls)
        conn.execute(predictions.insert(), [
            {**row, "logged_at": T0, "model": "digits", "version": "1", "predicted_class": 0,
             "probabilities": b"", "features": {},
             "label": None if row["request_id"].endswith(":shadow") else "a",
             "labeled_at": None if row["request_id"].endswith(":shadow") else T0}
            for row in logged
        ])  # fmt: skip
    engine.dispose()
    report = build_report(store, spec.name)
    store.close()
    assert report["metric"]["event"] == "accuracy"
    assert any("shadow mode" in note for note in report["notes"])
    arms = report["arms"]
    mirrored_units = arms["treatment"]["units"]
    assert 240 < mirrored_units < 360 and arms["control"]["units"] == 600 - mirrored_units
    # both arms judged on the same mirrored requests
    assert arms["treatment"]["trials"] == arms["control"]["trials"] == mirrored_units
    assert arms["treatment"]["rate"] == 1.0 and 0.25 < arms["control"]["rate"] < 0.42
    assert report["verdict"]["code"] == "treatment_wins"
    assert not report["srm"]["mismatch"]
    # the mirrored calls are 3x slower: a guardrail breach, noted in the verdict
    assert report["guardrails"]["arms"]["treatment"]["p99_latency_ms"] == 30.0
    assert "guardrails are breached" in report["verdict"]["text"]
