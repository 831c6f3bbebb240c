"""`cycleml experiment …` in subprocesses: what a user types and sees."""

from __future__ import annotations

import contextlib
import json
import sqlite3

import pytest

from cycleml.experiments.store import ExperimentStore
from cycleml.monitoring.log import PredictionLog
from test_errors_cli import cycleml
from test_experiments_report import simulate
from test_registry_support import sqlite_tables


@pytest.mark.slow  # six commands, each a fresh interpreter
def test_start_ramp_report_stop_and_errors(tmp_path):
    started = cycleml("experiment", "start", "new-cnn", "digits",
                      "arms.control=digits@champion", "arms.treatment=digits/2",
                      "weights.control=0.5", "weights.treatment=0.5", cwd=tmp_path)  # fmt: skip
    assert started.returncode == 0, started.stderr[-2000:]
    assert "experiment new-cnn is running (revision 1)" in started.stdout

    store = ExperimentStore(f"sqlite:///{tmp_path / 'monitoring.db'}")
    spec = store.get("new-cnn")
    simulate(store, spec, 6000, {"control": 0.10, "treatment": 0.16}, seed=9)
    store.close()

    report = cycleml("experiment", "report", "new-cnn", "format=json", "min_effect=0.02",
                     f"out={tmp_path / 'report'}", cwd=tmp_path)  # fmt: skip
    assert report.returncode == 0, report.stderr[-2000:]
    shown = json.loads(report.stdout)
    assert shown["verdict"]["code"] == "treatment_wins"
    assert shown["arms"]["control"]["units"] + shown["arms"]["treatment"]["units"] == 6000
    assert (tmp_path / "report" / "report.html").is_file()

    ramped = cycleml("experiment", "ramp", "new-cnn", "weights.control=0.2",
                     "weights.treatment=0.8", "note=wins", cwd=tmp_path)  # fmt: skip
    assert ramped.returncode == 0, ramped.stderr[-2000:]
    assert "control 0.5, treatment 0.5 -> control 0.2, treatment 0.8" in ramped.stdout

    unknown = cycleml("experiment", "report", "old-cnn", cwd=tmp_path)
    assert unknown.returncode == 2
    assert "cycleml experiment: error: no experiment named 'old-cnn'; known experiments: " \
        "['new-cnn']" in unknown.stderr  # fmt: skip
    assert "Traceback" not in unknown.stderr

    stopped = cycleml("experiment", "stop", "new-cnn", cwd=tmp_path)
    assert "experiment new-cnn is stopped (revision 3)" in stopped.stdout
    store = ExperimentStore(f"sqlite:///{tmp_path / 'monitoring.db'}")
    changes = store.changes("new-cnn")
    store.close()
    assert [(c["action"], c["source"]) for c in changes] == [
        ("start", "cli"), ("ramp", "cli"), ("stop", "cli")
    ]  # fmt: skip


def test_commands_other_than_start_name_a_missing_database_and_create_nothing(tmp_path):
    """A mistyped db_url is not answered as an empty list of experiments."""
    database = tmp_path / "monitoring.db"
    listed = cycleml("experiment", "list", cwd=tmp_path)
    assert listed.returncode == 2, listed.stderr
    assert listed.stderr.splitlines() == [
        f"cycleml experiment: error: database file '{database}' does not exist (db_url "
        f"'sqlite:///{database}'): no experiment database there yet; check the path, or "
        "create it with `cycleml experiment start` or `cycleml serve`"
    ]
    typo = tmp_path / "typo" / "monitoring.db"
    for command in ("report", "stop"):
        result = cycleml("experiment", command, "new-cnn", f"db_url=sqlite:///{typo}", cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert f"database file '{typo}' does not exist" in result.stderr
        assert "Traceback" not in result.stderr
    assert not database.exists() and not typo.parent.exists()


def test_a_prediction_log_without_experiments_lists_none_and_stays_as_it_is(tmp_path):
    """monitoring.db holds predictions (`cycleml predict`) but no experiment yet: that
    is no experiments, not an error, and reading adds no table; another program's
    database is named."""
    database = tmp_path / "monitoring.db"
    PredictionLog(f"sqlite:///{database}").close()

    before = sqlite_tables(database)
    listed = cycleml("experiment", "list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith("no experiments")
    report = cycleml("experiment", "report", "new-cnn", cwd=tmp_path)
    assert report.returncode == 2 and "new-cnn" in report.stderr, report.stderr
    assert "Traceback" not in report.stderr
    assert sqlite_tables(database) == before
    other = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE notes (id INTEGER)")
        conn.commit()
    foreign = cycleml("experiment", "list", f"db_url=sqlite:///{other}", cwd=tmp_path)
    assert foreign.returncode == 2
    assert foreign.stderr.splitlines() == [
        f"cycleml experiment: error: no experiment tables in '{other}' (it lacks "
        "ab_experiments, ab_experiment_changes, ab_assignments, ab_events; it holds notes): "
        "not a cycleml database; check db_url"
    ]


def test_a_failing_command_keeps_the_log_folder_earlier_commands_share(tmp_path):
    """Every `cycleml experiment` command logs to logs/experiments; one that fails
    removes no folder it did not make (the log of the commands before it)."""
    ExperimentStore(f"sqlite:///{tmp_path / 'monitoring.db'}").close()
    log = tmp_path / "logs" / "experiments" / "experiment.log"
    log.parent.mkdir(parents=True)
    log.write_text("an earlier command's line\n")
    failed = cycleml("experiment", "report", "nope", cwd=tmp_path)
    assert failed.returncode == 2 and "no experiment named 'nope'" in failed.stderr
    assert log.read_text().startswith("an earlier command's line\n")
    assert "no experiment named 'nope'" in log.read_text()  # its own line is kept too
