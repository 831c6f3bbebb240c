"""`cycleml serve` configuration, the model repository's version rules, and the
multi-process mode."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from cycleml.errors import ConfigError
from cycleml.serving.cli import settings_from_config
from cycleml.serving.metrics import ServingMetrics
from cycleml.serving.repository import ModelNotFound, ModelRepository
from cycleml.serving.served_model import ServedModel
from cycleml.serving.server import use_gil_switch_interval
from test_serving_support import (  # noqa: F401 - the *_fixture names register fixtures
    IMAGE_SIZE,
    binary_body,
    copy_version,
    free_port,
    image_bundle_fixture,
    image_bundle_v2_fixture,
    server_process,
    settings,
    wait_ready,
)


def test_config_composes_into_settings(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(
        "serve",
        f"path={tmp_path}",
        "port=9001",
        "runtime.instances=3",
        "batching.max_queue_delay_ms=0.5",
        "runtime.gil_switch_interval_ms=0.5",
        "limits.overload_status=503",
        "+pinned_versions={digits: 4}",
    )
    serve = settings_from_config(cfg)
    assert serve.port == 9001 and serve.runtime.instances == 3
    assert serve.batching.max_queue_delay_ms == 0.5
    assert serve.runtime.gil_switch_interval_ms == 0.5
    saved = sys.getswitchinterval()
    try:
        use_gil_switch_interval(serve)
        assert sys.getswitchinterval() == pytest.approx(0.0005)
    finally:
        sys.setswitchinterval(saved)
    assert serve.limits.overload_status == 503
    assert serve.pinned_versions == {"digits": "4"}
    assert serve.auth.public_paths == ("/v2/health/live", "/v2/health/ready", "/metrics")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("batching.max_batch_size=0", "batching.max_batch_size must be >= 1"),
        ("limits.overload_status=500", "must be 429 or 503"),
        ("version_policy=newest", "version_policy must be one of"),
        ("limits.default_timeout_ms=90000", "default_timeout_ms must be > 0 and <="),
        ("runtime.instances=-1", "runtime.instances must be >= 0"),
        ("runtime.gil_switch_interval_ms=0", "runtime.gil_switch_interval_ms"),
    ],
)
def test_bad_settings_name_the_key(make_cfg, tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        settings_from_config(make_cfg("serve", f"path={tmp_path}", override))


@pytest.mark.parametrize(
    ("cores", "workers", "runtime", "accelerated", "expected"),
    [
        # 0 and 0: one single-threaded instance per core, at most four, threads shared out
        (2, 1, {}, False, (2, 1)),
        (1, 1, {}, False, (1, 1)),
        (16, 1, {}, False, (4, 4)),
        (16, 2, {}, False, (4, 2)),
        (3, 2, {}, False, (1, 1)),
        # on an accelerator one instance; its CPU threads take the worker's cores
        (8, 1, {}, True, (1, 8)),
        # what is set wins; unset threads share the cores between the set instances
        (16, 1, {"instances": 2}, False, (2, 8)),
        (2, 1, {"instances": 3}, False, (3, 1)),
        (2, 1, {"intra_op_threads": 2}, False, (2, 2)),
    ],
)
def test_instances_and_threads_fit_the_available_cpus(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    cores: int,
    workers: int,
    runtime: dict,
    accelerated: bool,
    expected: tuple[int, int],
) -> None:
    from cycleml.serving import settings as settings_module

    monkeypatch.setattr(settings_module, "available_cpus", lambda: cores)
    serve = settings_module.ServeSettings.from_dict(
        {"path": str(tmp_path), "workers": workers, "runtime": runtime}
    )
    assert (serve.instances(accelerated), serve.intra_op_threads(accelerated)) == expected


def test_missing_path_and_missing_keys(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="path is required"):
        settings_from_config(make_cfg("serve"))
    with pytest.raises(ConfigError, match="does not exist"):
        settings_from_config(make_cfg("serve", f"path={tmp_path / 'nothing'}"))
    monkey_env = {"path": str(tmp_path), "auth": {"enabled": True, "keys_env": "NO_SUCH_VAR"}}
    from cycleml.serving.app import create_app
    from cycleml.serving.settings import ServeSettings

    with pytest.raises(ConfigError, match="no API keys were found"):
        create_app(ServeSettings.from_dict(monkey_env))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["path={tmp}/missing"], "does not exist"),
        (
            ["path={tmp}", "registry.db_url=postgresql+psycopg://nobody@127.0.0.1:1/none"],
            "registry database: cannot connect",
        ),
    ],
)
def test_cli_reports_a_config_error_in_one_line(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cycleml.serving.cli",
            *(o.format(tmp=tmp_path) for o in overrides),
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def _repository(tmp_path: Path, v1: Path, v2: Path) -> Path:
    root = tmp_path / "models"
    copy_version(v1, root, "shapes", "1")
    copy_version(v2, root, "shapes", "2")
    copy_version(v1, root, "shapes", "10")
    return root


@pytest.mark.parametrize(
    ("overrides", "served"),
    [
        ({}, ["10"]),  # numeric order: 10 is newer than 2
        ({"version_policy": "all"}, ["1", "2", "10"]),
        ({"pinned_versions": {"shapes": "2"}}, ["2"]),
    ],
)
def test_version_policy_and_pins(
    tmp_path: Path, image_bundle: Path, image_bundle_v2: Path, overrides: dict, served: list[str]
) -> None:
    repository = ModelRepository(
        settings(_repository(tmp_path, image_bundle, image_bundle_v2), **overrides),
        ServingMetrics(),
    )
    try:
        assert not repository.ready  # not before every model loaded and ran its warm-up
        repository.load_all()
        assert repository.versions("shapes") == served
        assert repository.get("shapes").version == served[-1]
        assert repository.ready
        with pytest.raises(ModelNotFound, match="has no version '7' loaded"):
            repository.get("shapes", "7")
    finally:
        repository.close()


def test_a_model_folder_of_versions_serves_as_one_model(
    tmp_path: Path, image_bundle: Path, image_bundle_v2: Path
) -> None:
    """`serve path=bundles/shapes` (what `cycleml export` writes) serves that model."""
    model_dir = _repository(tmp_path, image_bundle, image_bundle_v2) / "shapes"
    repository = ModelRepository(settings(model_dir), ServingMetrics())
    try:
        repository.load_all()
        assert repository.versions("shapes") == ["10"]
        assert [(m["name"], m["version"]) for m in repository.index()] == [("shapes", "10")]
    finally:
        repository.close()


def test_broken_version_is_reported_and_watch_waits_for_a_settled_folder(
    tmp_path: Path, image_bundle: Path, image_bundle_v2: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "models"
    copy_version(image_bundle, root, "shapes", "1")
    broken = root / "other" / "1"
    broken.mkdir(parents=True)
    (broken / "bundle.json").write_text("{}")
    repository = ModelRepository(settings(root), ServingMetrics())
    caplog.set_level(logging.ERROR, logger="cycleml.serving.repository")
    try:
        repository.load_all()
        index = {entry["name"]: entry for entry in repository.index()}
        assert index["shapes"]["state"] == "READY"
        assert index["other"]["state"] == "UNAVAILABLE"
        assert "format_version" in index["other"]["reason"]

        copy_version(image_bundle_v2, root, "shapes", "2")
        repository.poll()  # first sight: the folder might still be copying
        assert repository.versions("shapes") == ["1"]
        repository.poll()  # unchanged since the last poll: load it
        assert repository.versions("shapes") == ["2"]

        def load_errors() -> int:
            return caplog.text.count("cannot load model other")

        tried = load_errors()
        assert tried >= 1
        repository.poll()
        repository.poll()  # the broken model is not retried until its files change
        assert load_errors() == tried and repository.versions("other") == []
        (broken / "bundle.json").write_text('{"format_version": 1}')
        repository.poll()
        repository.poll()
        assert load_errors() == tried + 1
    finally:
        repository.close()


def test_nothing_loads_after_close(
    tmp_path: Path, image_bundle: Path, image_bundle_v2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() waits for a load under way and stops its model too; a watch step that
    runs after close (it outlived the join) loads nothing."""
    root = tmp_path / "models"
    copy_version(image_bundle, root, "shapes", "1")
    repository = ModelRepository(settings(root), ServingMetrics())
    repository.load_all()
    copy_version(image_bundle_v2, root, "shapes", "2")

    warming, go_on = threading.Event(), threading.Event()
    loaded: list[ServedModel] = []
    warm_up = ServedModel.warm_up

    def held_warm_up(model: ServedModel) -> None:
        loaded.append(model)
        warming.set()
        assert go_on.wait(10)
        warm_up(model)

    monkeypatch.setattr(ServedModel, "warm_up", held_warm_up)
    loader = threading.Thread(target=lambda: repository.load_model("shapes"))
    loader.start()
    assert warming.wait(10)
    closer = threading.Thread(target=repository.close)
    closer.start()
    closer.join(1.0)  # still waiting for the load (before the fix: closed already)
    go_on.set()
    closer.join(10)
    loader.join(10)
    assert not closer.is_alive() and not loader.is_alive()
    assert repository.all_models() == []
    assert [m.version for m in loaded] == ["2"]
    assert not loaded[0].ready and all(batcher.join(0) for batcher in loaded[0].batchers)

    copy_version(image_bundle_v2, root, "shapes", "3")
    repository.poll()
    repository.poll()
    assert repository.all_models() == [] and len(loaded) == 1


def test_served_model_count_survives_concurrent_loads_and_stops() -> None:
    """Loads and stops of versions come from several threads (the watch, loads on
    request, retiring threads); no update of the served count may be lost. A race, so
    the test makes thread switches frequent to make a lost update likely."""
    metrics = ServingMetrics()
    metrics.model_loaded("m")  # one version stays served throughout

    def churn() -> None:
        for _ in range(20_000):
            metrics.model_loaded("m")
            metrics.model_stopped("m")

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=churn) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(switch)
    assert metrics._served == {"m": 1}
    metrics.request_done("m", "", "infer", 404, 0.001, None, None)
    assert (
        metrics.registry.get_sample_value(
            "cycleml_requests_total",
            {"model": "m", "version": "", "endpoint": "infer", "status": "404"},
        )
        == 1
    )


def test_several_worker_processes_share_the_port_and_metrics(
    tmp_path: Path, image_bundle: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    pixels = np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    body, headers = binary_body(pixels)
    with server_process(image_bundle, port, "workers=2", "access_log=false") as process:
        wait_ready(url)
        # each worker loads the model itself: ready once new connections, which land on
        # either worker, all find it ready
        deadline = time.monotonic() + 60
        streak = 0
        while streak < 10 and time.monotonic() < deadline:
            with httpx.Client(base_url=url) as fresh:
                ready = fresh.get("/v2/health/ready").status_code == 200
            streak = streak + 1 if ready else 0
        assert streak == 10, "the worker processes did not all become ready"
        with httpx.Client(base_url=url) as http:
            statuses = [
                http.post(
                    "/v2/models/shapes/infer",
                    content=body,
                    headers=headers,
                ).status_code
                for _ in range(20)
            ]
            # new connections land on either worker; the metrics add up over both
            for _ in range(20):
                with httpx.Client(base_url=url) as fresh:
                    fresh.post("/v2/models/shapes/infer", content=body, headers=headers)
            text = http.get("/metrics").text
        process.terminate()
        process.wait(timeout=60)
    assert statuses == [200] * 20
    total = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("cycleml_requests_total{") and 'status="200"' in line
    )
    assert total == 40, json.dumps(text[:2000])


def test_serving_never_imports_torch() -> None:
    code = (
        "import sys, cycleml.serving.cli, cycleml.serving.loadgen; "
        "bad = sorted(m for m in ('torch', 'lightning', 'onnx') if m in sys.modules); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("runtime", "expected"),
    [
        # spin inside a run, stop when it ends, shrinking blocks for preempted threads
        (
            {},
            {
                "session.intra_op.allow_spinning": "1",
                "session.force_spinning_stop": "1",
                "session.dynamic_block_base": "4",
            },
        ),
        # spin between runs too: nothing stops the spinning
        (
            {"spin_wait": True},
            {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": None},
        ),
        # entries given in the config win over the serving defaults
        (
            {
                "session_config": {
                    "session.dynamic_block_base": 8,
                    "session.set_denormal_as_zero": "1",
                }
            },
            {"session.dynamic_block_base": "8", "session.set_denormal_as_zero": "1"},
        ),
    ],
)
def test_runtime_session_options(
    image_bundle: Path, runtime: dict, expected: dict[str, str | None]
) -> None:
    repository = ModelRepository(settings(image_bundle, runtime=runtime), ServingMetrics())
    try:
        repository.load_all()
        options = repository.get("shapes").predictors[0].session.get_session_options()
        for entry, value in expected.items():
            if value is None:  # not set: ONNX Runtime's own behaviour
                with pytest.raises(Exception, match=entry):
                    options.get_session_config_entry(entry)
            else:
                assert options.get_session_config_entry(entry) == value, entry
    finally:
        repository.close()


def test_runtime_session_config_values_must_be_single(image_bundle: Path) -> None:
    with pytest.raises(ConfigError, match=r"runtime.session_config\['session'\] must be a single"):
        settings(image_bundle, runtime={"session_config": {"session": {"dynamic_block_base": 4}}})


def test_queue_depth_reports_the_latest_queue_of_a_label_set() -> None:
    """A reload of the same version registers its new queue before the old model stops;
    the old model's stop must not blank the new one's depth."""
    metrics = ServingMetrics()
    old, new = [object()] * 2, [object()] * 3

    def depth() -> float | None:
        return metrics.registry.get_sample_value(
            "cycleml_queue_depth", {"model": "m", "version": "1"}
        )

    metrics.watch_queue(("m", "1"), old.__len__)
    assert depth() == 2
    metrics.watch_queue(("m", "1"), new.__len__)
    metrics.unwatch_queue(("m", "1"), old.__len__)
    assert depth() == 3
    new.append(object())
    assert depth() == 4  # read when scraped
    metrics.unwatch_queue(("m", "1"), new.__len__)
    assert depth() == 0
