"""A password on the command line is never stored nor printed; bundles follow the umask."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
from pathlib import Path

import pytest

from cycleml.redaction import RedactSecrets, redact, redact_values
from test_config_checks import cycleml
from test_serving_support import export_image_bundle

PASSWORD = "Pa55-w0rd/x"
URL = f"postgresql+psycopg://someone:{PASSWORD}@127.0.0.1:1/nodb"


def test_redact_hides_url_and_query_passwords():
    assert redact(URL) == "postgresql+psycopg://someone:***@127.0.0.1:1/nodb"
    assert redact("db_url=mysql://u:p%40ss@h/db, then") == "db_url=mysql://u:***@h/db, then"
    assert redact("postgresql://h/db?user=u&password=s3cret&x=1") == (
        "postgresql://h/db?user=u&password=***&x=1"
    )
    # no password: unchanged
    for text in (
        "postgresql+psycopg://postgres@127.0.0.1:5432/test",
        "http://host:8080/p",
        "a:b@c",
    ):
        assert redact(text) == text
    assert redact_values({"a": [URL, 3], "b": None}) == {"a": [redact(URL), 3], "b": None}


def test_redact_hides_a_password_holding_a_raw_at_and_one_after_a_user_at_server():
    # an '@' should be written %40, but a raw one must not leave the password's tail shown
    assert redact("postgresql://u:pa@ss_Tail@h:5/db") == "postgresql://u:***@h:5/db"
    # SQLAlchemy's safe_url of such a URL hides only the part before the first '@'
    assert redact("postgresql://u:***@ss_Tail@h:5/db") == "postgresql://u:***@h:5/db"
    # a user name of the form user@server (some cloud databases)
    assert redact("postgresql://admin@server:s3cret@h/db") == "postgresql://admin@server:***@h/db"
    # an '@' after the host is not part of the password
    assert redact("postgresql://u:p@h/db?x=a@b") == "postgresql://u:***@h/db?x=a@b"
    assert redact("postgresql://admin@server@h:5432/db") == "postgresql://admin@server@h:5432/db"


def test_a_raw_at_in_the_password_is_named_without_showing_the_password():
    from cycleml.db import open_database
    from cycleml.errors import ConfigError

    with pytest.raises(ConfigError) as raised:
        open_database("postgresql+psycopg://someone:pa@ss_Tail@127.0.0.1:1/nodb")
    message = str(raised.value)
    assert "ss_Tail" not in message and "pa@" not in message
    assert "%40" in message and "someone:***@127.0.0.1:1/nodb" in message


def test_log_records_are_redacted(caplog):
    logger = logging.getLogger("cycleml.test_secrets")
    caplog.handler.addFilter(RedactSecrets())
    with caplog.at_level(logging.INFO):
        logger.info("connecting to %s", URL)
    assert PASSWORD not in caplog.text and "someone:***@" in caplog.text


def run_predict(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    result, _ = cycleml("predict", *args, cwd=tmp_path)
    return result


def files_under(folder: Path) -> dict[Path, str]:
    return {p: p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return export_image_bundle(tmp_path_factory.mktemp("bundles") / "shapes" / "1")


def test_password_is_neither_stored_nor_printed_when_the_database_fails(bundle, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"not an image")
    result = run_predict(
        tmp_path, f"bundle={bundle}", f"input={images}", f"db_url={URL}", "decode_workers=0"
    )
    assert result.returncode != 0
    assert PASSWORD not in result.stdout + result.stderr
    # the failed run wrote no result, so its folder (config and log) was removed; the
    # redacted .hydra files of a run that stays are checked in the training test below
    runs = tmp_path / "logs" / "predict" / "runs"
    assert not runs.exists() or list(runs.iterdir()) == []
    leaked = [str(p) for p, text in files_under(tmp_path).items() if PASSWORD in text]
    assert leaked == []


def test_password_in_a_misspelled_override_is_not_echoed(tmp_path):
    result = run_predict(tmp_path, "bundle=b", "input=i", f"db_urll={URL}")
    assert result.returncode == 2
    assert "did you mean db_url=" in result.stderr
    assert PASSWORD not in result.stdout + result.stderr


def test_hydra_echo_of_a_bad_override_is_redacted(tmp_path):
    result = run_predict(tmp_path, "bundle=b", "input=i", f"+db_url={URL}")
    assert result.returncode != 0
    assert "someone:***@" in result.stdout + result.stderr
    assert PASSWORD not in result.stdout + result.stderr


def test_bundle_folder_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = export_image_bundle(tmp_path / "bundles" / "shapes" / "1")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "bundle.json").stat().st_mode) == 0o644


def test_multirun_files_and_failure_output_are_redacted(tmp_path):
    # the job fails (no such bundle) after Hydra wrote the sweep's multirun.yaml
    result = run_predict(tmp_path, "-m", "bundle=b", "input=i", f"db_url={URL}")
    assert result.returncode != 0
    assert PASSWORD not in result.stdout + result.stderr
    sweeps = list((tmp_path / "logs" / "predict" / "multiruns").iterdir())
    written = files_under(sweeps[0])
    assert "***@127.0.0.1" in written[sweeps[0] / "multirun.yaml"]
    assert "***@127.0.0.1" in written[sweeps[0] / "0" / ".hydra" / "overrides.yaml"]
    assert [str(p) for p, text in written.items() if PASSWORD in text] == []


def test_escaped_overrides_are_redacted():
    escaped = r"db_url=postgresql+psycopg\://someone\:Pa55-w0rd/x@127.0.0.1\:1/nodb"
    assert redact(escaped) == r"db_url=postgresql+psycopg\://someone\:***@127.0.0.1\:1/nodb"


@pytest.mark.slow
def test_train_run_folder_holds_no_password(tmp_path):
    # a URL in the training config reaches summary.json and the trackers' config
    result, _ = cycleml("train", "debug=fdr", f"+notes.db={URL}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert PASSWORD not in result.stdout + result.stderr
    (run,) = (tmp_path / "logs" / "debug" / "runs").iterdir()
    written = files_under(run)
    assert "someone:***@" in written[run / "summary.json"]
    assert [str(p) for p, text in written.items() if PASSWORD in text] == []


@pytest.mark.slow
def test_wandb_run_metadata_holds_no_password(tmp_path):
    # W&B stores the command line in the run's metadata when the run starts
    result, _ = cycleml(
        "train",
        "logger=wandb",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=1",
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
        f"+notes.db={URL}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    stored = [p for p in (run / "wandb").rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.suffix == ".wandb" for p in stored)
    command_line = b"someone:***@127.0.0.1"
    assert any(command_line in p.read_bytes() for p in stored if p.suffix == ".wandb")
    assert [str(p) for p in stored if PASSWORD.encode() in p.read_bytes()] == []
