"""A tiny digits CNN trained on scikit-learn's digits and exported through the real
exporter, the held-out pools it is monitored on, and the planted shifts.

Shared by the monitoring tests (imported, holds no tests).
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from sklearn.datasets import load_digits
from torch import nn

from cycleml.export import export_bundle
from cycleml.inference import Predictor
from cycleml.models.cnn import SmallCNN
from cycleml.monitoring.log import LoggedPredictions, logged_from_records, records_from_batch

CLASSES = [str(d) for d in range(10)]
DATA_SPEC = {"kind": "image", "image_size": 8, "channels": 1, "mean": [0.5], "std": [0.5]}


@dataclass(frozen=True)
class Digits:
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]  # scans, as the bundle's reference sees them
    val_digits: tuple[np.ndarray, np.ndarray]  # the digits behind them, unscanned
    test: tuple[np.ndarray, np.ndarray]


def scans(images: np.ndarray, rng: np.random.Generator, strong: bool = False) -> np.ndarray:
    """Digits as a scanner delivers them: half clean, half turned by up to 25 degrees
    and blurred (sigma up to 1); ``strong``: every one turned by 20-25 degrees and
    blurred by 0.8-1 (the hard end of the same range)."""
    out = images.astype(np.float32)
    for i in range(len(out)):
        if not strong and rng.random() < 0.5:
            continue
        low_angle, low_sigma = (20.0, 0.8) if strong else (0.0, 0.0)
        angle = rng.uniform(low_angle, 25.0) * rng.choice([-1.0, 1.0])
        turned = ndimage.rotate(out[i, :, :, 0], angle, reshape=False)
        out[i, :, :, 0] = ndimage.gaussian_filter(turned, rng.uniform(low_sigma, 1.0))
    return np.clip(out, 0, 255).round().astype(np.uint8)


@functools.cache
def digits() -> Digits:
    """uint8 (N, 8, 8, 1) scanned digits, split 700 / 550 / 547 at random (seed 0);
    training gets four scans of each digit, validation three."""
    data = load_digits()
    images = np.rint(data.images * 255.0 / 16.0).astype(np.uint8)[..., None]
    order = np.random.default_rng(0).permutation(len(images))
    images, labels = images[order], data.target[order].astype(np.int64)
    rng = np.random.default_rng(1)
    train = np.concatenate([scans(images[:700], rng) for _ in range(4)])
    val = np.concatenate([scans(images[700:1250], rng) for _ in range(3)])
    return Digits(
        (train, np.tile(labels[:700], 4)), (val, np.tile(labels[700:1250], 3)),
        (images[700:1250], labels[700:1250]), (images[1250:], labels[1250:]),
    )  # fmt: skip


def train_digits_net() -> nn.Module:
    torch.set_num_threads(1)  # a tiny net gains nothing from more, and loses on a busy CPU
    torch.manual_seed(0)
    net = SmallCNN(in_channels=1, num_classes=10, width=8, dropout=0.1)
    images, labels = digits().train
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5
    y = torch.from_numpy(labels)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(8):
        for batch in torch.randperm(len(x), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
            optimizer.step()
    return net.eval()


_ROOT = Path(tempfile.mkdtemp(prefix="cycleml-monitoring-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


@functools.cache
def digits_bundle() -> Path:
    """The trained digits model exported once per test session (as ``digits`` 1)."""
    images, labels = digits().val
    export_bundle(
        train_digits_net(), DATA_SPEC, CLASSES, _ROOT / "digits",
        val_inputs=images, val_labels=labels, name="digits", version="1",
    )  # fmt: skip
    return _ROOT / "digits"


def bundle_before_monitoring(folder: Path) -> Path:
    """A copy of the digits bundle as an older cycleml wrote it: no embedding entry,
    calibration or reference sample (the graph keeps its extra output, which a reader
    of ``bundle.json`` never asks for)."""
    shutil.copytree(digits_bundle(), folder)
    meta = json.loads((folder / "bundle.json").read_text())
    for key in ("embedding", "calibration", "monitoring_reference"):
        meta.pop(key)
    (folder / "bundle.json").write_text(json.dumps(meta))
    (folder / "monitoring_reference.npz").unlink()
    return folder


@functools.cache
def digits_predictor() -> Predictor:
    return Predictor(digits_bundle(), providers=["CPUExecutionProvider"], intra_op_threads=1)


def logged(images: np.ndarray, prefix: str = "r") -> LoggedPredictions:
    """What the log would hold for these images, computed by the real ONNX bundle."""
    predictor = digits_predictor()
    probabilities, embeddings = predictor.run_with_embedding(images)
    records = records_from_batch(
        model="digits", version="1", kind="image", class_names=CLASSES,
        request_ids=[f"{prefix}{i}" for i in range(len(images))], inputs=images,
        probabilities=probabilities, embeddings=embeddings,
    )  # fmt: skip
    return logged_from_records(records)


# -- planted shifts ---------------------------------------------------------------------
def brighten(images: np.ndarray, factor: float = 1.15) -> np.ndarray:
    return np.clip(images.astype(np.float32) * factor, 0, 255).round().astype(np.uint8)


def one_class_half(
    labels: np.ndarray, size: int, rng: np.random.Generator, cls: int = 3
) -> np.ndarray:
    """Row indices of a window where class ``cls`` makes half the traffic."""
    own = np.flatnonzero(labels == cls)
    rest = np.flatnonzero(labels != cls)
    half = size // 2
    return np.concatenate([rng.choice(own, half), rng.choice(rest, size - half)])


@dataclass(frozen=True)
class Pool:
    """Logged predictions of many images, to resample windows from."""

    rows: LoggedPredictions
    labels: np.ndarray


@functools.cache
def pool(name: str) -> Pool:
    """``val``: fresh scans (4 per digit) of the validation digits, the validation
    distribution without its exact images; ``bright``: those brightened by 15 %;
    ``strong``: the validation digits scanned at the hard end (turned and blurred);
    ``test`` / ``test-strong``: the held-out digits scanned as usual / at the hard end
    (8 scans per digit)."""
    held_out = name.startswith("test")
    base, labels = digits().test if held_out else digits().val_digits
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    strong = name.endswith("strong")
    copies = 8 if held_out else 4
    images = np.concatenate([scans(base, rng, strong) for _ in range(copies)])
    if name == "bright":
        images = brighten(images)
    return Pool(logged(images, prefix=f"{name}-"), np.tile(labels, copies))
