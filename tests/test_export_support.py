"""Tiny trained image and text models and the bundles exported from them.

Shared by the export, inference and predict tests (imported, holds no tests).
The models train in well under a second on synthetic data that they learn to
100 %, so accuracy checks and quantization refusals are deterministic.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn

from cycleml.export import ExportSettings, export_bundle
from cycleml.inference import ModelBundle

IMAGE_SIZE = (12, 10)
IMAGE_CLASSES = ["dark", "left", "right"]
TEXT_CLASSES = ["fruit", "sky", "plant"]
TEXT_WORDS = {
    "fruit": ["apple", "cherry", "plum", "pear", "fig"],
    "sky": ["cloud", "blue", "sun", "rain", "wind"],
    "plant": ["grass", "leaf", "tree", "moss", "fern"],
}
NOISE_WORDS = ["the", "a", "and", "of", "very"]
SPECIALS = ["[PAD]", "[UNK]"]
MAX_LENGTH = 12


class TinyImageNet(nn.Module):
    def __init__(self, channels: int = 3, num_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d((2, 2)),
            nn.Flatten(),
        )
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TinyTextNet(nn.Module):
    def __init__(self, vocab_size: int, num_classes: int = 3, pad_id: int = 0) -> None:
        super().__init__()
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, 16, padding_idx=pad_id)
        self.head = nn.Linear(16, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != self.pad_id).unsqueeze(-1).float()
        pooled = (self.embed(ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled)


def synthetic_images(n: int, seed: int = 0, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, H, W, C): class 0 dark, 1 bright left half, 2 bright right half."""
    rng = np.random.default_rng(seed)
    height, width = IMAGE_SIZE
    labels = rng.integers(0, 3, size=n)
    images = rng.integers(0, 60, size=(n, height, width, channels))
    half = width // 2
    images[labels == 1, :, :half] += 150
    images[labels == 2, :, half:] += 150
    return images.astype(np.uint8), labels.astype(np.int64)


def synthetic_texts(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n)
    texts = []
    for label in labels:
        words = TEXT_WORDS[TEXT_CLASSES[label]]
        picked = [words[i] for i in rng.integers(0, len(words), size=rng.integers(2, 6))]
        picked += [NOISE_WORDS[i] for i in rng.integers(0, len(NOISE_WORDS), size=2)]
        rng.shuffle(picked)
        texts.append(" ".join(picked))
    return texts, labels.astype(np.int64)


def text_tokenizer() -> Tokenizer:
    words = SPECIALS + NOISE_WORDS + [w for ws in TEXT_WORDS.values() for w in ws]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def encode(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    tokenizer = Tokenizer.from_str(tokenizer.to_str())
    tokenizer.enable_truncation(MAX_LENGTH)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", length=MAX_LENGTH)
    return np.asarray([e.ids for e in tokenizer.encode_batch(texts)], dtype=np.int64)


def _fit(net: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, steps: int) -> nn.Module:
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    net.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest on a busy machine
    try:
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(inputs), labels).backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return net.eval()


def train_image_net(channels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    images, labels = synthetic_images(150, seed=1, channels=channels)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    return _fit(TinyImageNet(channels), x, torch.from_numpy(labels), steps=40)


def train_text_net() -> tuple[nn.Module, Tokenizer]:
    torch.manual_seed(0)
    tokenizer = text_tokenizer()
    texts, labels = synthetic_texts(300, seed=1)
    ids = torch.from_numpy(encode(tokenizer, texts))
    net = TinyTextNet(tokenizer.get_vocab_size())
    return _fit(net, ids, torch.from_numpy(labels), steps=80), tokenizer


def image_spec(channels: int = 3) -> dict:
    return {
        "kind": "image",
        "image_size": list(IMAGE_SIZE),
        "channels": channels,
        "mean": [0.5] * channels,
        "std": [0.5] * channels,
        "fingerprint": "synthetic-images",
    }


def text_spec(tokenizer: Tokenizer) -> dict:
    return {
        "kind": "text",
        "tokenizer_json": tokenizer.to_str(),
        "max_length": MAX_LENGTH,
        "pad_id": 0,
        "fingerprint": "synthetic-texts",
    }


def build_image_bundle(out_dir: Path, **settings: object) -> ModelBundle:
    images, labels = synthetic_images(120, seed=2)
    return export_bundle(
        train_image_net(),
        image_spec(),
        IMAGE_CLASSES,
        out_dir,
        val_inputs=images,
        val_labels=labels,
        name="tiny-image",
        version="1",
        run_id="run-image",
        metrics={"val/acc": 1.0},
        settings=ExportSettings(**settings),  # type: ignore[arg-type]
    )


def build_text_bundle(out_dir: Path, **settings: object) -> ModelBundle:
    net, tokenizer = train_text_net()
    texts, labels = synthetic_texts(120, seed=2)
    return export_bundle(
        net,
        text_spec(tokenizer),
        TEXT_CLASSES,
        out_dir,
        val_inputs=encode(tokenizer, texts),
        val_labels=labels,
        name="tiny-text",
        version="1",
        run_id="run-text",
        settings=ExportSettings(**settings),  # type: ignore[arg-type]
    )


def rewrite_meta(bundle_dir: Path, **changes: object) -> None:
    """Edit ``bundle.json`` in place (to build broken bundles)."""
    path = bundle_dir / "bundle.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


_CACHE_DIR = Path(tempfile.mkdtemp(prefix="cycleml-bundles-"))
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
_BUILT: dict[str, Path] = {}


def cached_bundle(kind: str) -> Path:
    """The image or text bundle, with its int8 and fp16 variants, exported once per
    test session (an export takes seconds); copy it before changing it."""
    if kind not in _BUILT:
        build = build_image_bundle if kind == "image" else build_text_bundle
        _BUILT[kind] = build(_CACHE_DIR / kind, quantize="int8", fp16=True).path
    return _BUILT[kind]


def copy_bundle(kind: str, destination: Path) -> Path:
    """A private copy of a cached bundle that a test may break."""
    return Path(shutil.copytree(cached_bundle(kind), destination))
