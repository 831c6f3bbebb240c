"""Killing `cycleml predict` with SIGKILL midway and rerunning it gives exactly one row per
input: every batch is one transaction, and a rerun skips the keys already written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import create_engine, func, select

from cycleml.batch.store import predictions
from test_export_support import cached_bundle, synthetic_texts
from test_predict_support import DATABASES, database_url, stored

ROWS = 6000


def count(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            query = select(func.count()).where(predictions.c.model_name == "tiny-text")
            return int(conn.execute(query.select_from(predictions)).scalar_one())
    except Exception:  # the table may not exist yet
        return 0
    finally:
        engine.dispose()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
@pytest.mark.parametrize("database", DATABASES)
def test_sigkill_midway_then_rerun_gives_one_row_per_input(tmp_path, database):
    texts, _ = synthetic_texts(ROWS, seed=60)
    path = tmp_path / "texts.jsonl"
    path.write_text(
        "".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    url = database_url(database, tmp_path, ["tiny-text"])
    command = [
        sys.executable, "-m", "cycleml.cli", "predict", f"bundle={cached_bundle('text')}",
        f"input={path}", f"db_url={url}", "key_field=id", "batch_size=4", "prefetch=1",
        "progress=false", "runtime.intra_op_threads=1", f"hydra.run.dir={tmp_path / 'run'}",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while count(url) < 200:
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no rows were written in time"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    partial = count(url)
    assert 200 <= partial < ROWS, "the run finished before it could be killed"

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "predict_summary.json").read_text())
    assert summary["skipped"] == partial
    assert summary["written"] == ROWS - partial and summary["failed"] == 0
    rows, errors = stored(url, "tiny-text")  # asserts no duplicate keys
    assert set(rows) == {f"t{i}" for i in range(ROWS)} and errors == {}
