"""Outputs of a frozen encoder, computed once per input and reused for the rest of a run.

A frozen encoder maps the same input to the same features every epoch, so recomputing
them is most of a frozen model's training time. The cache is keyed by each item's content
(text: its token ids without padding; image: its pixels), so an augmented input is simply
a new key and fine-tuned encoders never use it. A net takes part by having
``frozen_encoder`` (true when its encoder is frozen), ``encode(inputs)`` (features) and a
``feature_cache`` attribute that :func:`enable_feature_cache` sets for a run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


class FeatureCache:
    """Features by item key; at most ``max_items`` are kept (later items are computed)."""

    def __init__(self, max_items: int = 100_000) -> None:
        self.max_items = max_items
        self._features: dict[bytes, Tensor] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._features)

    def features(
        self, inputs: Tensor, keys: Sequence[bytes], encode: Callable[[Tensor], Tensor]
    ) -> Tensor:
        """The features of each row of ``inputs``: cached ones reused, the others encoded
        (in one call) and kept."""
        first: dict[bytes, int] = {}  # each new key once, even when a batch repeats it
        for i, key in enumerate(keys):
            if key not in self._features and key not in first:
                first[key] = i
        self.misses += len(first)
        self.hits += len(keys) - len(first)
        fresh: dict[bytes, Tensor] = {}
        if first:
            with torch.no_grad():
                computed = encode(inputs[list(first.values())])
            for key, row in zip(first, computed, strict=True):
                fresh[key] = row
                if len(self._features) < self.max_items:
                    self._features[key] = row
        rows = [fresh[key] if key in fresh else self._features[key] for key in keys]
        return torch.stack(rows).to(inputs.device)


def in_use(cache: FeatureCache | None) -> bool:
    """Whether to use ``cache`` now: never while a graph is traced, compiled or exported."""
    return cache is not None and not (
        torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()
    )


def enable_feature_cache(net: nn.Module) -> bool:
    """Give ``net`` a feature cache for this run if its encoder is frozen; logs the choice."""
    if not getattr(net, "frozen_encoder", False):
        return False
    net.feature_cache = FeatureCache()
    log.info("frozen encoder: its outputs are computed once per input and reused")
    return True
