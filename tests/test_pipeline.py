"""`cycleml pipeline`: state and keys, skipping unchanged stages, resuming a failed run,
the lock per model, triggers and bad input, with the tiniest trainer settings."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from conftest import compose_config
from cycleml.errors import ConfigError
from cycleml.monitoring.log import PredictionLog
from cycleml.pipeline import state as st
from cycleml.pipeline.lock import PipelineBusy, PipelineLock
from cycleml.pipeline.runner import FAILED_EXIT, LOG_FILE, TRIGGER_LOG, model_dir, run_pipeline
from cycleml.pipeline.stages import (
    ASIDE,
    NEW,
    RESUME,
    REUSE,
    Context,
    _train_run,
    train_folder_plan,
)
from cycleml.pipeline.triggers import drift_trigger, labels_trigger
from cycleml.registry import Registry
from test_serving_support import image_bundle_fixture  # noqa: F401 - registers the fixture

# a few hundred digits at 16x16 grey, one short epoch, a small export
TINY = [
    "sources={digits: {kind: digits, limit: 200}}",
    "data.image_size=16",
    "data.channels=1",
    "data.mean=[0.5]",
    "data.std=[0.5]",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "+trainer.enable_progress_bar=false",
    "callbacks.progress_bar=null",
    "export.parity_samples=32",
    "export.reference_rows=64",
    "export.embedding_dim=8",
    "workers=1",
]


@pytest.fixture
def pipeline_cfg(tmp_path: Path) -> Iterator:
    def make(*overrides: str) -> DictConfig:
        return compose_config("pipeline", [*TINY, *overrides], tmp_path)

    yield make
    HydraConfig.instance().cfg = None
    GlobalHydra.instance().clear()


def _state(cfg: DictConfig) -> dict:
    runs = st.list_runs(model_dir(cfg))
    assert runs, "no run folder"
    return json.loads((runs[-1] / st.STATE_FILE).read_text())


def test_fingerprints_follow_content_and_keys_follow_config_and_inputs(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "x.txt").write_text("one")
    first = st.path_fingerprint(folder)
    (folder / ".hidden").write_text("not data")
    assert st.path_fingerprint(folder) == first
    (folder / "a" / "x.txt").write_text("two")
    assert st.path_fingerprint(folder) != first
    assert st.path_fingerprint(tmp_path / "nope") == "missing"

    key, chash = st.stage_key({"lr": 0.1}, {"dataset": "abc"})
    assert st.stage_key({"lr": 0.1}, {"dataset": "abc"}) == (key, chash)
    assert st.stage_key({"lr": 0.2}, {"dataset": "abc"})[0] != key
    assert st.stage_key({"lr": 0.1}, {"dataset": "abd"}) == (
        st.stage_key({"lr": 0.1}, {"dataset": "abd"})[0],
        chash,
    )
    assert st.stage_key({"lr": 0.1}, {"dataset": "abd"})[0] != key


def test_a_finished_stage_is_reused_only_while_its_outputs_exist(tmp_path: Path) -> None:
    folder = tmp_path / "digits"
    earlier = st.RunState(run_dir=st.new_run_dir(folder), name="digits", status=st.PROMOTED)
    data = earlier.run_dir / "gather"
    data.mkdir()
    record = earlier.stage("gather")
    record.status, record.key = st.DONE, "k1"
    record.outputs = {"dataset_dir": str(data), "fingerprint": "f"}
    earlier.save()
    assert st.unfinished_run(folder) is None  # a promoted run is not continued

    current = st.RunState(run_dir=st.new_run_dir(folder), name="digits")
    current.save()
    assert st.unfinished_run(folder).run_dir == current.run_dir
    owner, found = st.find_reusable(folder, current, "gather", "k1")
    assert owner.run_dir == earlier.run_dir and found.outputs["fingerprint"] == "f"
    assert st.find_reusable(folder, current, "gather", "k2") is None  # another key
    data.rmdir()
    assert st.find_reusable(folder, current, "gather", "k1") is None  # outputs gone


HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from cycleml.pipeline.lock import PipelineLock
    lock = PipelineLock(Path(sys.argv[1]), "digits")
    lock.acquire("run-A")
    print("held", flush=True)
    time.sleep(60)
    """
)


def test_a_second_pipeline_on_the_same_model_is_refused_naming_the_holder(
    tmp_path: Path, pipeline_cfg
) -> None:
    cfg = pipeline_cfg()
    folder = model_dir(cfg)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            PipelineBusy, match=rf"model 'digits' is already running \(pid {holder.pid}, run run-A"
        ):
            run_pipeline(cfg)
        # another model is not blocked
        other = PipelineLock(folder.parent / "other", "other")
        other.acquire()
        other.release()
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the killed holder's lock: no stale lock
    lock = PipelineLock(folder, "digits")
    lock.acquire()
    lock.release()


def test_a_missing_source_fails_at_gather_naming_it_and_leaves_the_champion(
    tmp_path: Path, pipeline_cfg, capsys: pytest.CaptureFixture
) -> None:
    missing = tmp_path / "incoming"
    cfg = pipeline_cfg(f"+sources.incoming={{kind: image_folder, path: {missing}}}")
    assert run_pipeline(cfg) == FAILED_EXIT
    state = _state(cfg)
    assert state["status"] == "failed" and state["failed_stage"] == "gather"
    assert f"sources.incoming.path: '{missing}' does not exist" in state["reason"]
    assert state["stages"]["gather"]["status"] == "failed"
    assert "train" not in state["stages"]
    out = capsys.readouterr().out
    assert "stage gather failed" in out and "the champion is unchanged (none)" in out
    registry = Registry(root=cfg.registry.root)
    assert registry.aliases("digits") == {}
    registry.close()


@pytest.mark.slow
def test_a_crashing_stage_is_recorded_and_a_rerun_skips_the_unchanged_stages(
    pipeline_cfg, capsys: pytest.CaptureFixture
) -> None:
    broken = "model.net._target_=cycleml.models.cnn.NoSuchNet"
    cfg = pipeline_cfg(broken)
    assert run_pipeline(cfg) == FAILED_EXIT
    first = _state(cfg)
    assert first["failed_stage"] == "train"
    assert "NoSuchNet" in first["stages"]["train"]["error"]
    assert [first["stages"][s]["status"] for s in ("gather", "clean")] == ["done", "done"]

    # the same command again continues the run: gather and clean are not run again
    capsys.readouterr()
    assert run_pipeline(pipeline_cfg(broken)) == FAILED_EXIT
    second = _state(cfg)
    assert second["run"] == first["run"] and len(second["launches"]) == 2
    for stage in ("gather", "clean"):
        assert second["stages"][stage]["finished_at"] == first["stages"][stage]["finished_at"]
        assert second["stages"][stage]["key"] == first["stages"][stage]["key"]
    assert second["stages"]["train"]["started_at"] >= first["stages"]["train"]["started_at"]

    # a changed source reruns gather (and what follows) in the same run
    changed = pipeline_cfg(broken, "sources.digits.limit=150")
    assert run_pipeline(changed) == FAILED_EXIT
    third = _state(cfg)
    assert third["run"] == first["run"]
    assert third["stages"]["gather"]["key"] != first["stages"]["gather"]["key"]
    assert third["stages"]["gather"]["outputs"]["items"] == 150
    assert (
        third["stages"]["clean"]["inputs"]["dataset"]
        == (third["stages"]["gather"]["outputs"]["fingerprint"])
    )


def test_labels_trigger_waits_for_enough_new_labels(
    tmp_path: Path, pipeline_cfg, capsys: pytest.CaptureFixture
) -> None:
    cfg = pipeline_cfg("trigger=labels", "min_new_labels=1000")
    assert run_pipeline(cfg) == 0
    state = _state(cfg)
    assert state["status"] == "waiting"
    assert state["stages"]["trigger"]["outputs"]["new_labelled"] == 200
    assert "only 200 new labelled item(s), fewer than min_new_labels=1000" in state["reason"]
    assert "clean" not in state["stages"]
    assert "not triggered" in capsys.readouterr().out

    # compared with a champion's training data: only what it has not seen counts
    from cycleml.data.gather import gather

    old = gather({"digits": {"kind": "digits", "limit": 100}}, tmp_path / "old", progress=False)
    new = gather({"digits": {"kind": "digits", "limit": 160}}, tmp_path / "new", progress=False)
    enough = labels_trigger(new.root, old.root, 60, "digits/1")
    assert enough.fire and enough.details["new_labelled"] == 60
    assert not labels_trigger(new.root, old.root, 61, "digits/1").fire


def test_bad_trigger_and_stop_after_are_named(pipeline_cfg) -> None:
    with pytest.raises(ConfigError, match="trigger='often': expected one of always, drift, labels"):
        run_pipeline(pipeline_cfg("trigger=often"))
    with pytest.raises(ConfigError, match="stop_after='deploy': expected null or one of gather"):
        run_pipeline(pipeline_cfg("stop_after=deploy"))
    # the gate's rules are checked before the first stage, not after training
    cfg = pipeline_cfg("gate.min_accuracy=2")
    with pytest.raises(ConfigError, match="gate.min_accuracy=2.*less than or equal to 1"):
        run_pipeline(cfg)
    assert not model_dir(cfg).exists()


def test_bad_aliases_are_named_before_the_first_stage(pipeline_cfg) -> None:
    # used only at register, gate and promote: found there, after a whole training run
    cfg = pipeline_cfg("champion_alias=../live")
    with pytest.raises(ConfigError, match="champion_alias: alias '../live' is not allowed"):
        run_pipeline(cfg)
    with pytest.raises(ConfigError, match="challenger_alias: alias is empty"):
        run_pipeline(pipeline_cfg("challenger_alias=null"))
    with pytest.raises(ConfigError, match="champion_alias and challenger_alias are both 'live'"):
        run_pipeline(pipeline_cfg("champion_alias=live", "challenger_alias=live"))
    assert not model_dir(cfg).exists()


def test_stop_after_runs_one_stage_per_launch_in_the_same_run(
    pipeline_cfg, capsys: pytest.CaptureFixture
) -> None:
    """What an orchestrator does: one launch per stage, each continuing the run."""
    cfg = pipeline_cfg("stop_after=gather")
    assert run_pipeline(cfg) == 0
    first = _state(cfg)
    assert first["status"] == "stopped" and list(first["stages"]) == ["trigger", "gather"]
    assert "stopped after gather" in capsys.readouterr().out
    assert run_pipeline(pipeline_cfg("stop_after=clean")) == 0
    second = _state(cfg)
    assert second["run"] == first["run"] and second["status"] == "stopped"
    assert second["stages"]["gather"] == first["stages"]["gather"]  # not run again
    assert second["stages"]["clean"]["status"] == "done"
    assert second["stages"]["clean"]["inputs"] == {
        "dataset": first["stages"]["gather"]["outputs"]["fingerprint"]
    }


def _training(folder: Path, key: str | None, *, finished: bool, checkpoint: str | None) -> Path:
    """A train folder as a launch leaves it: marked with ``key`` (None: no mark), with
    ``checkpoint`` (``best`` or ``last``) and with summary.json once ``finished``."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "run_info.json").write_text('{"run_id": "abc"}')
    if key is not None:
        st.mark_stage_dir(folder, "train", key)
    if checkpoint is not None:
        (folder / "checkpoints" / f"{checkpoint}.ckpt").write_bytes(b"weights")
    if finished:
        (folder / "summary.json").write_text('{"metrics": {"val/acc": 0.5}}')
    return folder


@pytest.mark.parametrize(
    ("mark", "recorded", "finished", "checkpoint", "action", "why"),
    [
        ("k1", None, True, "best", REUSE, "the finished training of this config"),
        # what state.json held before is another run's key: the folder's mark decides
        ("k1", "k0", True, "last", REUSE, "the finished training of this config"),
        ("k1", "k1", False, "last", RESUME, "an unfinished training of this config"),
        ("k0", "k1", True, "best", ASIDE, "a training of another config or dataset"),
        # a kill after the launch of k1 recorded its key, before it moved k0's folder
        ("k0", "k1", False, "last", ASIDE, "a training of another config or dataset"),
        ("k1", "k1", False, None, ASIDE, "without a checkpoint to resume from"),
        ("k1", "k1", True, None, ASIDE, "dataset without its checkpoint"),
        # a folder without a mark (written before marks): resumed when state.json says so
        (None, "k1", False, "last", RESUME, "an unfinished training of this config"),
        (None, "k1", True, "best", ASIDE, "does not record its config and dataset"),
        (None, "k0", False, "last", ASIDE, "does not record its config and dataset"),
    ],
)
def test_the_train_folder_an_earlier_launch_left_is_judged_by_its_own_mark(
    tmp_path: Path, mark, recorded, finished, checkpoint, action, why
) -> None:
    folder = tmp_path / "train"
    assert train_folder_plan(folder, "k1", recorded)[0] == NEW
    _training(folder, mark, finished=finished, checkpoint=checkpoint)
    assert st.stage_dir_key(folder, "train") == mark
    assert st.stage_dir_key(folder, "evaluate") is None
    found, reason = train_folder_plan(folder, "k1", recorded)
    assert (found, why in reason) == (action, True), reason


@pytest.mark.parametrize(
    "summary",
    [
        b"{",  # not JSON
        b"\xff\xfe{}",  # not UTF-8
        b"[]",
        b'{"run_id": "abc"}',  # no metrics
        b'{"metrics": [0.5]}',
        b'{"metrics": {"val/acc": "0.5"}}',
        b'{"metrics": {"val/acc": null}}',
        b"[" * 100_000,  # nested deeper than the parser recurses
    ],
)
def test_a_finished_training_whose_summary_cannot_be_read_is_moved_aside(
    tmp_path: Path, summary: bytes
) -> None:
    """A finished training of this key whose summary.json is not what training writes:
    not reused (its metrics would be wrong or crash the stage), moved aside."""
    folder = _training(tmp_path / "train", "k1", finished=True, checkpoint="best")
    (folder / "summary.json").write_bytes(summary)
    found, reason = train_folder_plan(folder, "k1", "k1")
    assert found == ASIDE and "summary.json cannot be read" in reason, reason


def test_a_stage_mark_that_cannot_be_read_is_no_mark(tmp_path: Path) -> None:
    folder = _training(tmp_path / "train", None, finished=False, checkpoint="last")
    for mark in (b"[" * 100_000, b"\xff", b'{"stage": "train", "key": 7}', b"[]"):
        (folder / st.STAGE_MARK).write_bytes(mark)
        assert st.stage_dir_key(folder, "train") is None
        assert train_folder_plan(folder, "k1", "k1")[0] == RESUME


@pytest.mark.parametrize("run_info", [b"5", b"[]", b"{", b'"resumed_from"'])
def test_a_reused_training_reports_what_its_launch_returned_whatever_its_run_info(
    tmp_path: Path, run_info: bytes
) -> None:
    """The stage's outputs for a reused training: its summary's metrics, rounded as a
    fresh launch rounds them, its best checkpoint, not resumed (an unreadable
    run_info.json records no resume) and reused."""
    folder = _training(tmp_path / "train", "k1", finished=True, checkpoint="best")
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    (folder / "summary.json").write_text(
        '{"metrics": {"val/acc": 0.123456, "test/acc": 1, "train/loss": 0.2}}'
    )
    (folder / "run_info.json").write_bytes(run_info)
    cfg = OmegaConf.create({"paths": {"output_dir": None}, "data": {"path": None},
                            "ckpt_path": None})  # fmt: skip
    ctx = Context(cfg=cfg, run_dir=tmp_path, run_id="r1", registry=None, champion=None,
                  outputs={"gather": {"dataset_dir": str(tmp_path / "data")}},
                  keys={"train": "k1"})  # fmt: skip
    outputs = _train_run(ctx, folder)
    assert outputs == {
        "run_dir": str(folder),
        "checkpoint": str(folder / "checkpoints" / "best.ckpt"),
        "metrics": {"val/acc": 0.1235, "test/acc": 1.0},
        "resumed": False,
        "reused": True,
    }


def _as_killed_before_recording_train(run_dir: Path) -> None:
    """state.json as a kill leaves it once training has ended but before the pipeline
    recorded it: the train stage still running, without outputs, and no saved config."""
    path = run_dir / st.STATE_FILE
    state = json.loads(path.read_text())
    state["status"] = "running"
    state["stages"]["train"].update(status="running", outputs={}, finished_at=None, seconds=None)
    path.write_text(json.dumps(state))
    (run_dir / "train" / ".hydra" / "config.yaml").unlink()


def _files(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix in (".ckpt", ".json")
    }


@pytest.mark.slow
def test_a_training_finished_but_not_recorded_is_reused_and_another_configs_moved_aside(
    pipeline_cfg, caplog: pytest.LogCaptureFixture
) -> None:
    """Killed between the end of training and state.json: the rerun takes the finished
    training over instead of training again; a folder of another config is never taken."""
    caplog.set_level(logging.INFO, logger="cycleml")  # as the command line's logging has it
    cfg = pipeline_cfg("stop_after=train")
    assert run_pipeline(cfg) == 0
    first = _state(cfg)
    run_dir = Path(first["run_dir"])
    train_dir, log_file = run_dir / "train", run_dir / LOG_FILE
    done = first["stages"]["train"]
    assert done["status"] == "done" and done["outputs"]["reused"] is False
    assert done["outputs"]["resumed"] is False and done["outputs"]["metrics"]["val/acc"] >= 0
    trained = _files(train_dir)
    assert "checkpoints/last.ckpt" in trained and "summary.json" in trained

    _as_killed_before_recording_train(run_dir)
    logged = len(log_file.read_text())
    assert run_pipeline(pipeline_cfg("stop_after=train")) == 0
    again = _state(cfg)
    assert again["run"] == first["run"] and again["stages"]["train"]["status"] == "done"
    assert again["stages"]["train"]["outputs"] == {**done["outputs"], "reused": True}
    assert _files(train_dir) == trained  # not trained again: the same files, untouched
    assert (train_dir / ".hydra" / "config.yaml").is_file()
    assert not list(run_dir.glob("train.replaced-*"))
    log = log_file.read_text()[logged:]
    assert f"train: {train_dir} holds the finished training of this config and dataset: " \
           "reused, not trained again" in log  # fmt: skip
    assert "another config" not in log and "resuming" not in log

    # another config (seed) in the same run: the finished training is moved aside
    other = pipeline_cfg("stop_after=train", "seed=7")
    assert run_pipeline(other) == 0
    aside = list(run_dir.glob("train.replaced-*"))
    assert len(aside) == 1 and _files(aside[0]) == trained
    assert f"train: {train_dir} held a training of another config or dataset; moved to " \
           f"{aside[0]}" in log_file.read_text()  # fmt: skip
    seventh = _state(other)["stages"]["train"]
    assert seventh["key"] != done["key"] and seventh["outputs"]["reused"] is False

    # killed after that launch recorded its key, before it moved the folder of seed 0
    # aside: state.json names seed 7, the folder holds seed 0's finished training
    aside[0].rename(run_dir / "seed-0")
    train_dir.rename(run_dir / "seed-7")
    (run_dir / "seed-0").rename(train_dir)
    _as_killed_before_recording_train(run_dir)
    logged = len(log_file.read_text())
    assert run_pipeline(pipeline_cfg("stop_after=train", "seed=7")) == 0
    last = _state(other)["stages"]["train"]
    assert last["key"] == seventh["key"] and last["outputs"]["reused"] is False
    aside = list(run_dir.glob("train.replaced-*"))
    assert len(aside) == 1 and _files(aside[0]) == trained  # kept, not taken over
    assert _files(train_dir).keys() == trained.keys() and _files(train_dir) != trained
    log = log_file.read_text()[logged:]
    assert f"train: {train_dir} held a training of another config or dataset; moved to " \
           f"{aside[0]}" in log and "reused" not in log  # fmt: skip


def test_drift_trigger_without_drift_starts_no_run(
    pipeline_cfg, image_bundle: Path, capsys: pytest.CaptureFixture
) -> None:
    """The champion's log looks like its reference sample: exit status 0, one line
    saying why, the reason in triggers.jsonl, and no run folder (no state.json)."""
    from cycleml.inference import Predictor
    from cycleml.monitoring.log import records_from_batch
    from test_serving_support import IMAGE_CLASSES, IMAGE_SIZE

    cfg = pipeline_cfg(
        "trigger=drift", "name=shapes", "monitor.window.size=64", "monitor.drift.min_rows=10"
    )
    registry = Registry(root=cfg.registry.root)
    registry.register(image_bundle)
    registry.set_alias("shapes", "champion", 1)
    registry.close()
    # random pixels, as the bundle's reference rows are
    pixels = np.random.default_rng(1).integers(0, 256, (64, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    predictor = Predictor(image_bundle, providers=["CPUExecutionProvider"], intra_op_threads=1)
    probabilities, embeddings = predictor.run_with_embedding(pixels)
    prediction_log = PredictionLog(cfg.monitor.db_url)
    prediction_log.write(records_from_batch(
        model="shapes", version="1", kind="image", class_names=IMAGE_CLASSES,
        request_ids=[f"r{i}" for i in range(len(pixels))], inputs=pixels,
        probabilities=probabilities, embeddings=embeddings,
    ))  # fmt: skip
    prediction_log.close()

    # the monitor's tests ran (the reference and the window are large enough)
    checked = drift_trigger(cfg, "shapes@champion")
    assert not checked.fire and checked.report is not None
    ran = {t["feature"] for t in checked.report["windows"][0]["tests"] if not t["skipped"]}
    assert {"brightness", "embedding"} <= ran

    assert run_pipeline(cfg) == 0
    reason = "shapes@champion: no drift in the latest of 1 window(s) (64 logged predictions)"
    assert f"cycleml pipeline: not triggered: {reason}" in capsys.readouterr().out
    assert st.list_runs(model_dir(cfg)) == []  # nothing started
    lines = (model_dir(cfg) / TRIGGER_LOG).read_text().splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert line["trigger"] == "drift" and line["fired"] is False and line["reason"] == reason
    assert line["rows"] == 64 and line["windows"] == 1 and line["drifted"] == []
    registry = Registry(root=cfg.registry.root)
    assert registry.aliases("shapes") == {"shapes": {"champion": 1}}  # untouched
    registry.close()


@pytest.mark.slow
def test_drift_trigger_without_logged_predictions_is_named(tmp_path: Path, pipeline_cfg) -> None:
    from test_serving_support import export_image_bundle

    cfg = pipeline_cfg("trigger=drift", "name=shapes")
    registry = Registry(root=cfg.registry.root)
    registry.register(export_image_bundle(tmp_path / "bundle"))
    registry.set_alias("shapes", "champion", 1)
    registry.close()
    # a prediction log that does not exist (a mistyped path) is named, not created
    log_file = Path(cfg.monitor.db_url.removeprefix("sqlite:///"))
    with pytest.raises(ConfigError, match=f"database file '{log_file}' does not exist"):
        run_pipeline(cfg)
    assert not log_file.exists()
    PredictionLog(cfg.monitor.db_url).close()
    with pytest.raises(ConfigError, match="no logged predictions for model 'shapes' version '1'"):
        run_pipeline(cfg)
    assert st.list_runs(model_dir(cfg)) == []  # nothing started


@pytest.mark.slow
def test_first_run_promotes_and_promote_false_waits_for_a_decision(
    pipeline_cfg, capsys: pytest.CaptureFixture
) -> None:
    """No champion: the challenger passes the absolute floor and becomes champion. A
    second run reuses gather and clean from the first, trains anew (another seed) and,
    with promote=false, stops after the gate."""
    cfg = pipeline_cfg("gate.min_accuracy=0.0")
    assert run_pipeline(cfg) == 0
    first = _state(cfg)
    assert first["status"] == "promoted"
    assert first["stages"]["promote"]["outputs"] == {
        "alias": "digits@champion", "from": None, "to": 1, "moved": True,
    }  # fmt: skip
    run_dir = Path(first["run_dir"])
    assert (run_dir / "gate" / "gate.json").is_file()
    assert (run_dir / "train" / ".hydra" / "config.yaml").is_file()

    cfg = pipeline_cfg("gate.min_accuracy=0.0", "gate.min_delta=-100", "gate.max_recall_drop=100",
                       "gate.max_regression=100", "seed=7", "promote=false")  # fmt: skip
    assert run_pipeline(cfg) == 0
    second = _state(cfg)
    assert second["run"] != first["run"]
    for stage in ("gather", "clean"):
        assert second["stages"][stage]["status"] == "reused"
        assert second["stages"][stage]["reused_from"] == str(run_dir)
    assert second["stages"]["train"]["status"] == "done"
    assert second["status"] == "awaiting_promotion"
    registry = Registry(root=cfg.registry.root)
    assert registry.aliases("digits")["digits"] == {"champion": 1, "challenger": 2}
    assert "cycleml registry promote digits challenger champion" in capsys.readouterr().out

    # the human decision, later: the registry command finishes the promotion
    finish = subprocess.run(
        [sys.executable, "-m", "cycleml", "registry", "promote", "digits", "challenger",
         "champion", f"root={cfg.registry.root}", "reason=reviewed the gate table"],
        cwd=cfg.paths.root_dir, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert finish.returncode == 0, finish.stdout + finish.stderr
    assert registry.aliases("digits")["digits"] == {"champion": 2, "challenger": 2}
    assert registry.audit("digits")[-1].reason == "reviewed the gate table"
    registry.close()
