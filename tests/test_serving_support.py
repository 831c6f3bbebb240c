"""Shared pieces of the serving tests: small exported bundles and a real server on
loopback. (No tests here; the test_serving_* modules import it.)"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn

from cycleml.serving.app import create_app
from cycleml.serving.server import uvicorn_options
from cycleml.serving.settings import ServeSettings

IMAGE_SIZE = 8
IMAGE_CLASSES = ["cat", "dog", "bird"]
TEXT_CLASSES = ["sports", "politics"]
TEXT_WORDS = ["goal", "match", "team", "vote", "law", "party", "the", "a"]


def _torch_nets() -> Any:
    import torch
    from torch import nn

    class TinyTextNet(nn.Module):
        def __init__(self, vocab: int, classes: int) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, 8)
            self.head = nn.Linear(8, classes)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(ids).mean(dim=1))

    def conv_net(channels: int, depth: int, classes: int) -> nn.Module:
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 3, padding=1), nn.ReLU()]
        for _ in range(depth):
            layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()]
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)]
        return nn.Sequential(*layers)

    return torch, conv_net, TinyTextNet


def export_image_bundle(
    out: Path,
    name: str = "shapes",
    version: str = "1",
    image_size: int = IMAGE_SIZE,
    channels: int = 4,
    depth: int = 0,
    seed: int = 0,
) -> Path:
    """A real exported image bundle: a small conv net on ``image_size`` RGB pixels.
    ``depth`` extra conv layers make it slower (for load tests)."""
    from cycleml.export import export_bundle

    torch, conv_net, _ = _torch_nets()
    torch.manual_seed(seed)
    net = conv_net(channels, depth, len(IMAGE_CLASSES)).eval()
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (16, image_size, image_size, 3), dtype=np.uint8)
    spec = {
        "kind": "image",
        "image_size": [image_size, image_size],
        "channels": 3,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
    }
    export_bundle(
        net,
        spec,
        IMAGE_CLASSES,
        out,
        val_inputs=pixels,
        val_labels=rng.integers(0, len(IMAGE_CLASSES), 16),
        name=name,
        version=version,
    )
    return out


def export_text_bundle(
    out: Path, name: str = "topics", version: str = "1", max_length: int = 6
) -> Path:
    """A real exported text bundle with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from cycleml.export import export_bundle

    torch, _, text_net = _torch_nets()
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(TEXT_WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    net = text_net(len(vocab), len(TEXT_CLASSES)).eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, len(vocab), (8, max_length)).astype(np.int64)
    spec = {
        "kind": "text",
        "tokenizer_json": tokenizer.to_str(),
        "max_length": max_length,
        "pad_id": 0,
    }
    export_bundle(
        net,
        spec,
        TEXT_CLASSES,
        out,
        val_inputs=ids,
        val_labels=rng.integers(0, len(TEXT_CLASSES), 8),
        name=name,
        version=version,
    )
    return out


def copy_version(bundle: Path, repository: Path, model: str, version: str) -> Path:
    """Place a bundle as ``<repository>/<model>/<version>/``, atomically (a rename)."""
    target = repository / model / version
    staging = repository / model / f".{version}.tmp"
    shutil.copytree(bundle, staging)
    staging.rename(target)
    return target


def settings(path: Path, **overrides: Any) -> ServeSettings:
    values: dict[str, Any] = {"path": str(path), "reload": {"watch": False}, "access_log": False}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return ServeSettings.from_dict(values)


class RunningServer:
    """A real uvicorn server on a loopback port, in a thread of the test process."""

    def __init__(self, serve_settings: ServeSettings) -> None:
        self.app = create_app(serve_settings)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # as `cycleml serve` runs it (protocol, proxy headers, ...), on this socket
        options = {**uvicorn_options(serve_settings), "timeout_graceful_shutdown": 10}
        config = uvicorn.Config(self.app, **options)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    @property
    def state(self) -> Any:
        return self.app.state.serving

    def __enter__(self) -> RunningServer:
        self.thread.start()
        wait_ready(self.url)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()


def wait_ready(url: str, timeout_s: float = 60.0, headers: dict | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/v2/health/ready", timeout=2, headers=headers).status_code == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"server at {url} not ready after {timeout_s} s")


@contextlib.contextmanager
def server_process(path: Path, port: int, *overrides: str) -> Iterator[subprocess.Popen]:
    """``cycleml serve`` as its own process (for signals); killed if the test fails."""
    command = [
        sys.executable,
        "-m",
        "cycleml.serving.cli",
        f"path={path}",
        f"port={port}",
        "reload.watch=false",
        f"hydra.run.dir={path.parent / 'serve-run'}",
        *overrides,
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def v2_body(pixels: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "pixels",
                "datatype": "UINT8",
                "shape": list(pixels.shape),
                "data": pixels.reshape(-1).tolist(),
            }
        ],
        **extra,
    }


def binary_body(
    array: np.ndarray, name: str = "pixels", datatype: str = "UINT8"
) -> tuple[bytes, dict[str, str]]:
    """A binary-tensor request body and its headers."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "datatype": datatype,
                    "shape": list(array.shape),
                    "parameters": {"binary_data_size": array.nbytes},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return header + array.tobytes(), {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }


def _cached(tmp_path_factory: pytest.TempPathFactory, key: str, export: Any) -> Path:
    """Export a bundle once per test session; every serving test module shares it."""
    out = tmp_path_factory.getbasetemp() / "serving-bundles" / key
    if not (out / "bundle.json").is_file():
        export(out)
    return out


@pytest.fixture(scope="session", name="image_bundle")
def image_bundle_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8x8 RGB, 3 classes, a few microseconds per row."""
    return _cached(tmp_path_factory, "shapes-1", lambda out: export_image_bundle(out))


@pytest.fixture(scope="session", name="image_bundle_v2")
def image_bundle_v2_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model retrained (other weights), as version 2."""
    return _cached(
        tmp_path_factory, "shapes-2", lambda out: export_image_bundle(out, version="2", seed=1)
    )


@pytest.fixture(scope="session", name="text_bundle")
def text_bundle_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _cached(tmp_path_factory, "topics-1", lambda out: export_text_bundle(out))


@pytest.fixture(scope="session", name="slow_bundle")
def slow_bundle_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32x32 RGB through five 32-channel convolutions: about 75 MFLOPs per row, so a
    single-threaded instance serves a few hundred rows per second (for load tests)."""
    return _cached(
        tmp_path_factory,
        "slow-1",
        lambda out: export_image_bundle(out, name="slow", image_size=32, channels=32, depth=4),
    )
