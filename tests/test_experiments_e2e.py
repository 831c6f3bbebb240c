"""One A/B experiment through everything a user touches: `cycleml serve` on a registry
with two versions, `cycleml experiment start`, 20,000 simulated users sending requests
with their id and conversions to the feedback route, then `cycleml experiment report`.

The users convert with probability 0.10 when they were answered by the control and
0.12 by the treatment (the arm each answer names); at 20,000 units the sequential test
declares the treatment the winner in ~95% of such experiments (tests/
test_experiments_stats.py), and this one is deterministic: the arms come from the
stable hash of the unit ids and each user's draw is seeded.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from cycleml.registry import Registry
from test_errors_cli import cycleml
from test_serving_support import (  # noqa: F401 - the *_fixture names register fixtures
    IMAGE_SIZE,
    binary_body,
    free_port,
    image_bundle_fixture,
    image_bundle_v2_fixture,
    server_process,
    wait_ready,
)

UNITS = 20_000
RATES = {"control": 0.10, "treatment": 0.12}
THREADS = 8
FEEDBACK_BATCH = 500


def _send(url: str, units: range, draws: np.ndarray) -> tuple[dict[str, int], list[dict]]:
    """Requests for ``units`` (one each); the conversions their users send back."""
    pixels = np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    body, headers = binary_body(pixels)
    arms: dict[str, int] = {}
    outcomes = []
    with httpx.Client(base_url=url, timeout=60) as http:
        for index in units:
            unit = f"user-{index}"
            request_id = f"req-{index}"
            reply = http.post(
                "/v2/models/shapes/infer",
                content=body,
                headers={**headers, "X-User-Id": unit, "X-Request-Id": request_id},
            )
            reply.raise_for_status()
            arm = reply.headers["x-experiment-arm"]
            arms[arm] = arms.get(arm, 0) + 1
            if draws[index] < RATES[arm]:
                # half the users' conversions arrive by request id, half by unit id
                key = {"request_id": request_id} if index % 2 else {"unit": unit}
                outcomes.append({**key, "event": "conversion"})
    return arms, outcomes


@pytest.mark.slow  # 20,000 requests and a server process: one to a few minutes
def test_twenty_thousand_users_through_http_make_the_treatment_win(
    tmp_path: Path, image_bundle: Path, image_bundle_v2: Path
) -> None:
    root = tmp_path / "registry"
    registry = Registry(root=root)
    registry.register(image_bundle)
    registry.register(image_bundle_v2)
    registry.set_alias("shapes", "champion", 1, reason="first")
    registry.close()
    db_url = f"sqlite:///{tmp_path / 'monitoring.db'}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # monitoring on: the server opens the project's database and follows the experiments
    # that `cycleml experiment` starts there (and logs predictions for accuracy)
    serve = (f"monitoring.db_url={db_url}", "monitoring.enabled=true", "access_log=false")
    with server_process(root, port, *serve) as server:
        wait_ready(url)
        started = cycleml("experiment", "start", "shapes-ab", "shapes", f"db_url={db_url}",
                          "arms.control=shapes@champion", "arms.treatment=shapes/2",
                          cwd=tmp_path)  # fmt: skip
        assert started.returncode == 0, started.stderr[-2000:]
        # the server polls the store: wait until answers name an arm
        deadline = time.monotonic() + 60
        pixels = np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        body, headers = binary_body(pixels)
        while True:
            probe = httpx.post(f"{url}/v2/models/shapes/infer", content=body,
                               headers={**headers, "X-User-Id": "probe"})  # fmt: skip
            if "x-experiment-arm" in probe.headers or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert "x-experiment-arm" in probe.headers, probe.headers

        draws = np.random.default_rng(2026).random(UNITS)
        began = time.monotonic()
        shares = [range(i, UNITS, THREADS) for i in range(THREADS)]
        with ThreadPoolExecutor(THREADS) as pool:
            results = list(pool.map(lambda units: _send(url, units, draws), shares))
        requests_s = time.monotonic() - began
        arms: dict[str, int] = {}
        outcomes = []
        for counted, sent in results:
            outcomes += sent
            for arm, count in counted.items():
                arms[arm] = arms.get(arm, 0) + count
        with httpx.Client(base_url=url, timeout=60) as http:
            attached = 0
            for start in range(0, len(outcomes), FEEDBACK_BATCH):
                reply = http.post("/v1/feedback", json=outcomes[start : start + FEEDBACK_BATCH])
                assert reply.status_code == 200, reply.text
                assert reply.json()["unknown"] == 0, reply.text
                attached += reply.json()["attached"]
        assert attached == len(outcomes)
        server.terminate()
        server.wait(timeout=60)  # the assignment writer flushes on shutdown

    report = cycleml("experiment", "report", "shapes-ab", f"db_url={db_url}", "format=json",
                     f"out={tmp_path / 'report'}", cwd=tmp_path)  # fmt: skip
    assert report.returncode == 0, report.stderr[-2000:]
    shown = json.loads(report.stdout)
    per_arm = shown["arms"]
    print(
        f"{UNITS} units in {requests_s:.0f} s; arms {arms}; conversions {len(outcomes)}; "
        f"rates {per_arm['control']['rate']:.4f} vs {per_arm['treatment']['rate']:.4f}; "
        f"verdict: {shown['verdict']['text']}"
    )
    # every request was logged (the probe too: one more unit in its arm)
    assert per_arm["control"]["units"] + per_arm["treatment"]["units"] == UNITS + 1
    assert per_arm["control"]["successes"] + per_arm["treatment"]["successes"] == len(outcomes)
    assert per_arm["treatment"]["versions"] == ["2"] and per_arm["control"]["versions"] == ["1"]
    assert not shown["srm"]["mismatch"] and shown["guardrails"]["arms"]["treatment"]["errors"] == 0
    assert shown["verdict"]["code"] == "treatment_wins", shown["verdict"]
    assert (tmp_path / "report" / "report.html").is_file()
