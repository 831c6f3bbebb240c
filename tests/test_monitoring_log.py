"""The prediction log (SQLite and PostgreSQL), labels, and `cycleml monitor` end to end."""

from __future__ import annotations

import datetime as dt
import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import root_logging_kept
from cycleml.db import open_database
from cycleml.inference.reference import input_features
from cycleml.monitoring.log import (
    PredictionLog,
    PredictionRecord,
    columns_from_batch,
    records_from_batch,
)
from cycleml.monitoring.monitor import gauge_values
from test_monitoring_support import (
    CLASSES,
    brighten,
    bundle_before_monitoring,
    digits,
    digits_bundle,
    digits_predictor,
)
from test_registry_support import database_url

T0 = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    yield from database_url(request.param, tmp_path, "log.db")


def synthetic_records(n: int, prefix: str, start: dt.datetime = T0) -> list[PredictionRecord]:
    rng = np.random.default_rng(len(prefix) + n)
    images = rng.integers(0, 255, size=(n, 8, 8, 1)).astype(np.uint8)
    probabilities = rng.dirichlet(np.ones(10), size=n).astype(np.float32)
    records = records_from_batch(
        model="digits", version="1", kind="image", class_names=CLASSES,
        request_ids=[f"{prefix}{i}" for i in range(n)], inputs=images,
        probabilities=probabilities, embeddings=rng.normal(size=(n, 4)).astype(np.float32),
    )  # fmt: skip
    return [
        PredictionRecord(**{**r.__dict__, "logged_at": start + dt.timedelta(seconds=i)})
        for i, r in enumerate(records)
    ]


def test_write_read_round_trip_and_idempotent_retries(db_url):
    log = PredictionLog(db_url)
    records = synthetic_records(50, "a-")
    assert log.write(records) == 50
    assert log.write(records[:10]) == 0  # a retried batch adds nothing
    rows = log.read("digits", "1")
    assert len(rows) == 50 and rows.request_ids[0] == "a-0"
    np.testing.assert_array_equal(rows.probabilities[7], records[7].probabilities)
    np.testing.assert_array_equal(rows.embedding[7], records[7].embedding)
    assert rows.features["brightness"][7] == pytest.approx(records[7].features["brightness"])
    assert rows.predicted_label[7] == CLASSES[int(records[7].probabilities.argmax())]
    assert rows.logged_at[0] == T0
    newest = log.read("digits", "1", last=5)
    assert newest.request_ids == [f"a-{i}" for i in range(45, 50)]
    middle = log.read("digits", "1", start=T0 + dt.timedelta(seconds=10),
                      end=T0 + dt.timedelta(seconds=20))  # fmt: skip
    assert middle.request_ids == [f"a-{i}" for i in range(10, 20)]
    # the same instants written with another UTC offset select the same rows
    plus2 = dt.timezone(dt.timedelta(hours=2))
    shifted = log.read("digits", "1", start=(T0 + dt.timedelta(seconds=10)).astimezone(plus2),
                       end=(T0 + dt.timedelta(seconds=20)).astimezone(plus2))  # fmt: skip
    assert shifted.request_ids == middle.request_ids
    assert log.versions("digits") == {"1": 50} and log.versions("other") == {}
    log.close()


def test_columns_write_the_same_rows_as_records(db_url):
    """The server's columnar path stores what the record path stores, skips ids already
    logged, and keeps a non-finite feature readable (NaN, as json.dumps writes it)."""
    log = PredictionLog(db_url)
    records = synthetic_records(6, "r-")
    log.write(records)
    rng = np.random.default_rng(len("r-") + 6)  # synthetic_records' draws, again
    images = rng.integers(0, 255, size=(6, 8, 8, 1)).astype(np.uint8)
    probabilities = rng.dirichlet(np.ones(10), size=6).astype(np.float32)
    embeddings = rng.normal(size=(6, 4)).astype(np.float32)
    probabilities[5] = np.nan  # a model that answered NaN: its confidence is NaN
    columns = columns_from_batch(
        model="digits", version="1", kind="image", class_names=CLASSES,
        request_ids=[f"c-{i}" for i in range(6)], inputs=images, probabilities=probabilities,
        embeddings=embeddings, logged_at=[T0 + dt.timedelta(seconds=i) for i in range(6)],
    )  # fmt: skip
    log.write_columns([columns])
    log.write_columns([columns])  # a retried write adds nothing
    rows = log.read("digits", "1")
    assert len(rows) == 12
    by_id = {rid: i for i, rid in enumerate(rows.request_ids)}
    for i in range(5):
        r, c = by_id[f"r-{i}"], by_id[f"c-{i}"]
        assert rows.logged_at[c] == rows.logged_at[r] == T0 + dt.timedelta(seconds=i)
        assert rows.predicted_class[c] == rows.predicted_class[r]
        assert rows.predicted_label[c] == rows.predicted_label[r]
        np.testing.assert_array_equal(rows.probabilities[c], rows.probabilities[r])
        np.testing.assert_array_equal(rows.embedding[c], rows.embedding[r])
        for name in ("brightness", "contrast", "confidence"):
            assert rows.features[name][c] == rows.features[name][r], name
    assert np.isnan(rows.features["confidence"][by_id["c-5"]])
    assert rows.features["brightness"][by_id["c-5"]] == rows.features["brightness"][by_id["r-5"]]
    # and the record path likewise
    nan_record = PredictionRecord(**{**records[0].__dict__, "request_id": "r-nan",
                                     "features": {"confidence": float("nan")}})  # fmt: skip
    assert log.write([nan_record]) == 1
    rows = log.read("digits", "1")
    assert np.isnan(rows.features["confidence"][rows.request_ids.index("r-nan")])
    log.close()


def test_uint8_image_features_match_the_float_formula():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(20, 7, 5, 3)).astype(np.uint8)
    images[0] = 0  # no contrast at all
    images[1] = 255
    exact = input_features("image", images)
    floats = input_features("image", images.astype(np.float32))
    for name in ("brightness", "contrast"):
        assert exact[name].dtype == np.float32
        np.testing.assert_allclose(exact[name], floats[name], rtol=1e-6, atol=1e-7)
    assert exact["contrast"][0] == exact["contrast"][1] == 0.0


def test_uint8_image_features_are_exact_on_both_sides_of_the_32_bit_sums():
    # 66,051 pixels is the most whose squares 32-bit sums hold (255² each); more take
    # the 64-bit sums (a 224x224 RGB image: 150,528): white and nearly white images,
    # whose squares sum highest, give the float formula's figures on either side
    rng = np.random.default_rng(4)
    for size in (66_051, 66_052, 150_528):
        images = rng.integers(0, 256, size=(3, size)).astype(np.uint8)
        images[0] = 255
        images[1] = 255
        images[1, :1000] = 0
        exact = input_features("image", images)
        floats = input_features("image", images.astype(np.float64))
        assert exact["brightness"][0] == 1.0 and exact["contrast"][0] == 0.0
        for name in ("brightness", "contrast"):
            np.testing.assert_allclose(exact[name], floats[name], rtol=1e-6)


def test_writes_from_several_threads(db_url):
    log = PredictionLog(db_url)
    batches = [synthetic_records(40, f"t{k}-") for k in range(4)]
    threads = [threading.Thread(target=log.write, args=(batch,)) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert log.versions("digits") == {"1": 160}
    log.close()


def test_labels_attach_by_request_id_and_unknown_ids_are_reported(db_url):
    log = PredictionLog(db_url)
    log.write(synthetic_records(20, "l-"))
    report = log.attach_labels([("l-1", "3"), ("l-2", "4"), ("nope-1", "5"), ("nope-2", "1")])
    assert (report.received, report.attached, report.unknown) == (4, 2, 2)
    assert report.unknown_examples == ["nope-1", "nope-2"]
    log.attach_labels([("l-2", "7")])  # a later label replaces the earlier one
    labels = log.read("digits", "1").labels
    assert labels[1] == "3" and labels[2] == "7" and labels[0] is None
    log.close()


# -- cycleml monitor ---------------------------------------------------------------------
def cycleml(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`cycleml monitor …` in a subprocess: what a user (or cron) types and sees."""
    return subprocess.run(
        [sys.executable, "-m", "cycleml", "monitor", *args, f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def monitor_here(capsys, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """The same command in this process (no interpreter start-up), as a CompletedProcess."""
    from hydra.core.global_hydra import GlobalHydra

    from cycleml.cli import main

    GlobalHydra.instance().clear()
    saved = list(sys.argv)
    try:
        with root_logging_kept():
            main(["monitor", *args, f"hydra.run.dir={tmp_path / 'run'}"])
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    finally:
        sys.argv = saved
        GlobalHydra.instance().clear()
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def log_digits(url: str, images: np.ndarray, prefix: str, start: dt.datetime) -> None:
    predictor = digits_predictor()
    probabilities, embeddings = predictor.run_with_embedding(images)
    records = records_from_batch(
        model="digits", version="1", kind="image", class_names=CLASSES,
        request_ids=[f"{prefix}{i}" for i in range(len(images))], inputs=images,
        probabilities=probabilities, embeddings=embeddings, logged_at=start,
    )  # fmt: skip
    PredictionLog(url).write(records)


@pytest.fixture(scope="module")
def traffic(tmp_path_factory) -> tuple[str, np.ndarray]:
    """A log of 500 validation-like scans at T0, then 500 brightened ones an hour later."""
    folder = tmp_path_factory.mktemp("traffic")
    url = f"sqlite:///{folder / 'monitoring.db'}"
    images, labels = digits().val
    rng = np.random.default_rng(11)
    calm, shifted = rng.choice(len(images), 500), rng.choice(len(images), 500)
    log_digits(url, images[calm], "calm-", T0)
    log_digits(url, brighten(images[shifted]), "bright-", T0 + dt.timedelta(hours=1))
    return url, labels[shifted]


def test_monitor_reports_drift_in_the_latest_window_with_exit_status_1(tmp_path, traffic):
    url, shifted_labels = traffic
    labels = tmp_path / "labels.csv"
    lines = [f"bright-{i},{label}" for i, label in enumerate(shifted_labels[:300])]
    labels.write_text("request_id,label\n" + "\n".join([*lines, "ghost-1,3"]) + "\n")
    attached = cycleml(tmp_path, "labels", f"input={labels}", f"db_url={url}")
    assert attached.returncode == 0, attached.stderr
    assert "attached 300 labels" in attached.stdout
    assert "1 request ids match no logged prediction (e.g. ghost-1)" in attached.stderr

    out = tmp_path / "report"
    result = cycleml(tmp_path, str(digits_bundle()), f"db_url={url}", f"out_dir={out}")
    assert result.returncode == 1, result.stderr
    report = json.loads((out / "report.json").read_text())
    first, latest = report["windows"]
    assert not first["drift"] and latest["drift"] and "brightness" in latest["drifted"]
    assert latest["performance"]["labelled"] == 300
    assert (
        abs(latest["performance"]["accuracy"] - latest["performance"]["estimated_accuracy"]) < 0.1
    )
    tests = {t["feature"]: t["test"] for t in latest["tests"]}
    assert tests == {"brightness": "ks", "contrast": "ks", "confidence": "ks",
                     "predicted_class": "chi2", "embedding": "mmd"}  # fmt: skip
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "DRIFT" in html
    gauges = gauge_values(report)
    assert gauges["cycleml_drift_detected"] == 1.0
    assert gauges["cycleml_drift_p_value_brightness"] <= 0.05
    assert 0 < gauges["cycleml_estimated_accuracy"] <= 1
    assert report["gauges"] == gauges


def test_time_windows_small_and_empty_windows_are_skipped_with_reasons(tmp_path, traffic, capsys):
    url, _ = traffic
    out = tmp_path / "report"
    result = monitor_here(
        capsys, tmp_path, str(digits_bundle()), f"db_url={url}", f"out_dir={out}",
        "window.by=time", "window.duration=30min", f"window.start='{T0.isoformat()}'",
        f"window.end='{(T0 + dt.timedelta(hours=2)).isoformat()}'", "format=json",
    )  # fmt: skip
    # the exit status follows the latest window: empty, so no drift
    assert result.returncode == 0, result.stderr
    windows = json.loads((out / "report.json").read_text())["windows"]
    assert [w["rows"] for w in windows] == [500, 0, 500, 0]
    assert [w["drift"] for w in windows] == [False, False, True, False]
    assert windows[1]["skipped"]["brightness"] == "empty window: no logged predictions"
    assert windows[1]["performance"]["estimated_accuracy"] is None

    small = monitor_here(capsys, tmp_path, str(digits_bundle()), f"db_url={url}", f"out_dir={out}",
                    "window.size=20", "window.last=1")  # fmt: skip
    assert small.returncode == 0, small.stderr
    assert "skipped embedding: window has 20 rows, the mmd test needs 30" in small.stdout


def test_a_partial_newest_count_window_does_not_decide_the_verdict(tmp_path, traffic, capsys):
    """1,000 rows in windows of 490: the second (mostly brightened) drifts; the third
    holds 20 rows, too few for any test. The verdict is the second's."""
    url, _ = traffic
    out = tmp_path / "report"
    for last in ("null", "1"):
        result = monitor_here(capsys, tmp_path, str(digits_bundle()), f"db_url={url}",
                              f"out_dir={out}", "window.size=490", f"window.last={last}")  # fmt: skip
        assert result.returncode == 1, result.stdout + result.stderr
        report = json.loads((out / "report.json").read_text())
        windows = report["windows"]
        assert [w["rows"] for w in windows][-2:] == [490, 20]
        assert len(windows) == (3 if last == "null" else 2)
        assert [w["partial"] for w in windows][-2:] == [False, True]
        assert windows[-2]["drift"] and not windows[-1]["drift"]
        assert windows[-1]["skipped"]["brightness"] == "window has 20 rows, the ks test needs 30"
        assert report["drift"] and report["decided_by"] == 1
        assert report["gauges"]["cycleml_drift_detected"] == 1.0
        assert any("window 2 holds 20 of 490 predictions" in note for note in report["notes"])
        assert "window 2: 20 rows, no drift (partial: not used for the verdict)" in result.stdout
        assert "DRIFT in window 1" in (out / "report.html").read_text()

    # fewer rows than one window: the partial window is all there is, and decides
    result = monitor_here(capsys, tmp_path, str(digits_bundle()), f"db_url={url}",
                          f"out_dir={out}", "window.size=2000")  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["decided_by"] == 0 and report["windows"][0]["partial"]
    assert report["drift"] == report["windows"][0]["drift"]
    assert result.returncode == (1 if report["drift"] else 0)
    assert "window 0 holds 1000 of 2000 predictions, and no window is complete" in result.stdout


def test_a_run_in_this_process_leaves_no_log_handler_behind(tmp_path, traffic, capsys):
    """Hydra's handlers would write later tests' records to this test's closed capture."""
    root = logging.getLogger()
    before = list(root.handlers)
    result = monitor_here(capsys, tmp_path, str(digits_bundle()), f"db_url={traffic[0]}",
                          f"out_dir={tmp_path / 'report'}", "window.size=490", "window.last=1")  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert root.handlers == before
    assert (tmp_path / "run" / "monitor.log").is_file()  # Hydra's handlers did run


def test_unknown_version_and_bad_settings_are_one_line_errors(tmp_path, traffic, capsys):
    url, _ = traffic
    result = monitor_here(capsys, tmp_path, str(digits_bundle()), f"db_url={url}", "log_version=9")
    assert result.returncode == 2
    assert "no logged predictions for model 'digits' version '9'" in result.stderr
    assert "logged versions of 'digits': 1 (1000)" in result.stderr
    assert "Traceback" not in result.stderr
    bad = monitor_here(
        capsys, tmp_path, str(digits_bundle()), f"db_url={url}", "drift.correction=fdr"
    )
    assert bad.returncode == 2 and "drift.correction='fdr'" in bad.stderr
    nowhere = tmp_path / "no-registry"
    unknown = monitor_here(capsys, tmp_path, "digits", f"registry.root={nowhere}", f"db_url={url}")
    assert unknown.returncode == 2 and "there is no registry at" in unknown.stderr
    assert not nowhere.exists()  # looking a model up creates no registry


def test_a_missing_prediction_log_or_registry_database_is_named_not_created(tmp_path, capsys):
    """A mistyped db_url is not answered as an empty log: report and labels need the
    database to exist, and neither creates a file or folder."""
    missing = tmp_path / "typo" / "monitoring.db"
    report = monitor_here(capsys, tmp_path, str(digits_bundle()), f"db_url=sqlite:///{missing}")
    assert report.returncode == 2
    assert report.stderr == (
        f"cycleml monitor: error: database file '{missing}' does not exist (db_url "
        f"'sqlite:///{missing}'): no prediction log database there yet; check the path, or "
        "create it with `cycleml serve` or `cycleml predict` with monitoring.enabled=true\n"
    )
    table = tmp_path / "labels.csv"
    table.write_text("request_id,label\nreq-0,3\n")
    labels = monitor_here(
        capsys, tmp_path, "labels", f"input={table}", f"db_url=sqlite:///{missing}"
    )
    assert labels.returncode == 2 and f"database file '{missing}' does not exist" in labels.stderr
    registry_db = tmp_path / "typo-registry" / "registry.db"
    lookup = monitor_here(
        capsys, tmp_path, "digits", f"registry.db_url=sqlite:///{registry_db}",
        f"db_url=sqlite:///{missing}",
    )  # fmt: skip
    assert lookup.returncode == 2
    assert f"registry database: database file '{registry_db}' does not exist" in lookup.stderr
    assert not missing.parent.exists() and not registry_db.parent.exists()


def test_old_bundle_without_reference_sample_still_monitors_the_class_mix(
    tmp_path, traffic, capsys
):
    url, _ = traffic
    old = bundle_before_monitoring(tmp_path / "old")
    out = tmp_path / "report"
    result = monitor_here(capsys, tmp_path, str(old), f"db_url={url}", f"out_dir={out}")
    assert result.returncode in (0, 1), result.stderr
    report = json.loads((out / "report.json").read_text())
    assert any("no monitoring reference sample" in note for note in report["notes"])
    assert any("no calibration" in note for note in report["notes"])
    assert [t["feature"] for t in report["windows"][0]["tests"]] == ["predicted_class"]


def test_log_tables_open_on_an_existing_engine(tmp_path):
    engine = open_database(f"sqlite:///{tmp_path / 'shared.db'}")
    log = PredictionLog(engine)
    assert log.write(synthetic_records(3, "e-")) == 3
    engine.dispose()


def test_a_registry_reference_reads_the_registered_version(tmp_path, traffic, capsys):
    from cycleml.registry.model_registry import Registry

    url, _ = traffic
    registry = Registry(None, tmp_path / "registry")
    registry.register(digits_bundle())
    registry.close()
    out = tmp_path / "report"
    result = monitor_here(
        capsys, tmp_path, "digits/1", f"registry.root={tmp_path / 'registry'}",
        f"db_url={url}", f"out_dir={out}",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert (report["model"], report["version"]) == ("digits", "1")
    assert report["source"]["registry"] == "digits/1"
    missing = monitor_here(capsys, tmp_path, "digits/7", f"registry.root={tmp_path / 'registry'}",
                           f"db_url={url}")  # fmt: skip
    assert missing.returncode == 2 and "digits" in missing.stderr and "7" in missing.stderr


@pytest.mark.parametrize(
    ("label", "problem"),
    [
        ("x" * 256, "row 2: label is 256 characters long; at most 255"),
        ("c\x00t", "row 2: label holds the control character U+0000 at position 1"),
    ],
)
def test_labels_no_database_can_store_are_refused_naming_the_row(tmp_path, capsys, label, problem):
    url = f"sqlite:///{tmp_path / 'monitoring.db'}"
    log_digits(url, digits().val[0][:2], "req-", T0)
    table = tmp_path / "labels.jsonl"
    rows = [{"request_id": "req-0", "label": "3"}, {"request_id": "req-1", "label": label}]
    table.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = monitor_here(capsys, tmp_path, "labels", f"input={table}", f"db_url={url}")
    assert result.returncode == 2, result.stdout + result.stderr
    assert problem in result.stderr and result.stderr.endswith("; nothing was attached\n")
    # refused whole: not even the good row before it is attached
    assert list(PredictionLog(url).read("digits", "1").labels) == [None, None]


def test_a_request_id_repeated_in_a_labels_table_is_counted(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'monitoring.db'}"
    PredictionLog(url).write(synthetic_records(2, "req-"))
    table = tmp_path / "labels.csv"
    table.write_text("request_id,label\nreq-0,3\nreq-0,5\nreq-1,2\nnope,1\n")
    result = monitor_here(capsys, tmp_path, "labels", f"input={table}", f"db_url={url}")
    assert result.returncode == 0, result.stderr
    # every row is accounted for: 2 attached + 1 unknown + 1 overridden = 4 received
    assert "attached 2 labels" in result.stdout
    assert "1 rows repeat the request_id of a later row" in result.stderr
    assert list(PredictionLog(url).read("digits", "1").labels) == ["5", "2"]
    as_json = monitor_here(
        capsys, tmp_path, "labels", f"input={table}", f"db_url={url}", "format=json"
    )
    summary = json.loads(as_json.stdout)
    assert summary["received"] == 4 and summary["rows_overridden_by_a_later_row"] == 1
