"""Killing `cycleml predict` with SIGKILL midway and rerunning it gives exactly one row per
input: every batch is one transaction, and a rerun skips the keys already written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import create_engine, func, select

from cycleml.batch.store import predictions
from test_export_support import cached_bundle, synthetic_images, synthetic_texts
from test_predict_support import DATABASES, database_url, stored

ROWS = 6000


def count(url: str, model_name: str = "tiny-text") -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            query = select(func.count()).where(predictions.c.model_name == model_name)
            return int(conn.execute(query.select_from(predictions)).scalar_one())
    except Exception:  # the table may not exist yet
        return 0
    finally:
        engine.dispose()


def kill_midway(command: list[str], url: str, model_name: str, rows: int) -> list[int]:
    """Start ``command`` and SIGKILL it once it has written ``rows`` predictions; returns
    the ids of the processes it had started (from /proc, where there is one)."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while count(url, model_name) < rows:
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no rows were written in time"
        time.sleep(0.02)
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    workers = [int(p) for p in children.read_text().split()] if children.exists() else []
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    return workers


def rerun(command: list[str]) -> None:
    """Run ``command`` again to the end, in larger batches (the batch size does not
    change which keys a rerun skips)."""
    command = [a if not a.startswith("batch_size=") else "batch_size=256" for a in command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


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
        f"input={path}", f"db_url='{url}'", "key_field=id", "batch_size=4", "prefetch=1",
        "progress=false", "runtime.intra_op_threads=1", f"hydra.run.dir={tmp_path / 'run'}",
    ]  # fmt: skip
    kill_midway(command, url, "tiny-text", 200)
    partial = count(url)
    assert 200 <= partial < ROWS, "the run finished before it could be killed"

    rerun(command)
    summary = json.loads((tmp_path / "run" / "predict_summary.json").read_text())
    assert summary["skipped"] == partial
    assert summary["written"] == ROWS - partial and summary["failed"] == 0
    rows, errors = stored(url, "tiny-text")  # asserts no duplicate keys
    assert set(rows) == {f"t{i}" for i in range(ROWS)} and errors == {}


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_image_run_killed_midway_leaves_no_workers_and_resumes(tmp_path):
    images, _ = synthetic_images(1500, seed=61)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    url = f"sqlite:///{tmp_path / 'p.db'}"
    command = [
        sys.executable, "-m", "cycleml.cli", "predict", f"bundle={cached_bundle('image')}",
        f"input={folder}", f"db_url={url}", "batch_size=4", "prefetch=1", "decode_workers=2",
        "progress=false", "runtime.intra_op_threads=1", f"hydra.run.dir={tmp_path / 'run'}",
    ]  # fmt: skip
    workers = kill_midway(command, url, "tiny-image", 40)
    assert len(workers) == 2, "expected two decoding processes"
    partial = count(url, "tiny-image")
    assert 40 <= partial < 1500
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers), "decoding workers outlived the run"

    rerun(command)
    rows, errors = stored(url, "tiny-image")
    assert set(rows) == {f"{i:04d}.png" for i in range(1500)} and errors == {}
