"""The second output of an exported graph: an embedding of each input, for monitoring.

The embedding is the network's penultimate features (the input of its final
``nn.Linear``, the classification head of every cycleml network) projected by a PCA
fitted on the validation split, baked into the graph as a second output
``embedding``. The calibration (``cycleml.monitoring.calibration``) is fitted next to it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.decomposition import PCA
from torch import nn

log = logging.getLogger(__name__)

EMBEDDING_OUTPUT = "embedding"
MAX_EMBEDDING_DIM = 32


class PixelScaling(nn.Module):
    """``uint8 NHWC`` pixels → ``(pixels / 255 - mean) / std`` in NCHW (as the image graph)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", mean_t / std_t)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.permute(0, 3, 1, 2).to(torch.float32) * self.scale - self.shift


class MonitoredInferenceNet(nn.Module):
    """Input → (``probabilities``, ``embedding``): the head on the penultimate features,
    and the same features centred and projected to the PCA components."""

    def __init__(
        self,
        prepare: nn.Module,
        body: nn.Module,
        head: nn.Linear,
        center: np.ndarray,
        components: np.ndarray,
    ) -> None:
        super().__init__()
        self.prepare = prepare
        self.body = body
        self.head = head
        self.register_buffer("center", torch.as_tensor(center, dtype=torch.float32))
        self.register_buffer("components", torch.as_tensor(components.T, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(self.prepare(x))
        probabilities = torch.softmax(self.head(features), dim=-1)
        return probabilities, (features - self.center) @ self.components


@dataclass(frozen=True)
class SplitNetwork:
    """A network cut before its final linear layer."""

    prepare: nn.Module
    body: nn.Module
    head: nn.Linear

    def features(self, inputs: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Penultimate features ``float32 (N, D)`` (CPU, eval mode, no grad)."""
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(inputs), batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(inputs[start : start + batch_size]))
                outputs.append(self.body(self.prepare(batch)).float().numpy())
        return np.concatenate(outputs)


def split_network(
    kind: str, net: nn.Module, data_spec: Mapping[str, Any], example: np.ndarray
) -> SplitNetwork | None:
    """``net`` as body + final ``nn.Linear``, or None (with a warning) when the head is
    not the network's last operation, checked on ``example``: then the bundle has no
    embedding and monitoring skips embedding drift."""
    last = None
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if not last:  # no linear layer, or the network is one
        log.warning("the network has no nn.Linear head: the bundle gets no embedding output")
        return None
    body = copy.deepcopy(net).cpu().eval()
    head = copy.deepcopy(body.get_submodule(last))
    parent_name, _, child = last.rpartition(".")
    parent = body.get_submodule(parent_name) if parent_name else body
    setattr(parent, child, nn.Identity())
    prepare: nn.Module = (
        PixelScaling(data_spec["mean"], data_spec["std"]) if kind == "image" else nn.Identity()
    )
    split = SplitNetwork(prepare, body, head)
    with torch.inference_mode():
        x = prepare(torch.from_numpy(np.ascontiguousarray(example)))
        whole = net.cpu().eval()(x)
        cut = head(body(x))
    if whole.shape != cut.shape or not torch.allclose(whole, cut, atol=1e-5, rtol=1e-4):
        log.warning(
            "the network's last nn.Linear (%s) is not its final operation: the bundle gets "
            "no embedding output",
            last,
        )
        return None
    return split


def fit_projection(features: np.ndarray, max_dim: int = MAX_EMBEDDING_DIM) -> PCA:
    """PCA of the validation split's penultimate features to at most ``max_dim`` dims."""
    dim = max(1, min(max_dim, features.shape[1], len(features) - 1))
    return PCA(n_components=dim, svd_solver="full", random_state=0).fit(features)


def monitored_module(split: SplitNetwork, projection: PCA) -> MonitoredInferenceNet:
    return MonitoredInferenceNet(
        split.prepare, split.body, split.head, projection.mean_, projection.components_
    ).eval()


def torch_outputs(
    module: MonitoredInferenceNet, inputs: np.ndarray, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and embeddings of the PyTorch module (CPU, eval mode, no grad)."""
    probabilities, embeddings = [], []
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(inputs[start : start + batch_size]))
            p, e = module(batch)
            probabilities.append(p.float().numpy())
            embeddings.append(e.float().numpy())
    return np.concatenate(probabilities), np.concatenate(embeddings)


def embedding_parity(reference: np.ndarray, candidate: np.ndarray, tolerance: float) -> dict:
    """Largest absolute difference of two embedding arrays, relative to their scale
    (an embedding is not bounded as probabilities are)."""
    scale = max(1.0, float(np.abs(reference).max())) if reference.size else 1.0
    diff = float(np.abs(reference - candidate).max()) if reference.size else 0.0
    return {
        "samples": int(len(reference)),
        "max_abs_diff": diff,
        "scale": scale,
        "tolerance": float(tolerance),
        "passed": diff <= tolerance * scale,
    }
