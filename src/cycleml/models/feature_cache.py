"""Outputs of a frozen encoder, computed once per input and reused for the rest of a run.

A frozen encoder maps the same input to the same features every epoch, so recomputing
them is most of a frozen model's training time. The cache is keyed by each item's content
(text: its token ids without padding; image: its pixels), so an augmented input is simply
a new key and fine-tuned encoders never use it. A net takes part by having
``frozen_encoder`` (true when its encoder is frozen for the whole run), ``encode(inputs)``
(features) and a ``feature_cache`` attribute that :func:`enable_feature_cache` sets for a
run. The cache lives in memory for one run only, so new weights, new preprocessing or
new data never meet old features.

Augmented training inputs are new keys every epoch: an image pipeline changes nearly
every image, so caching would only fill memory, and such runs go without a cache; a
text augmenter edits a share of the texts, and a net that says
``cache_augmented_inputs = True`` (the text encoders) still gains from the others.
"""

from __future__ import annotations

import hashlib
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


def pixel_keys(images: Tensor) -> list[bytes]:
    """One key per image of a batch: a digest of its (normalised) pixels, so a key is
    small whatever the image size, and equal pixels in any batch give equal keys."""
    rows = images.detach().cpu().contiguous().numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]


def enable_feature_cache(net: nn.Module, augmented: bool = False) -> bool:
    """Give ``net`` a feature cache for this run if its encoder is frozen and its training
    inputs repeat (no augmentation, unless the net caches augmented inputs); logs why a
    net with an encoder gets none."""
    if not hasattr(net, "frozen_encoder"):
        return False  # no pretrained encoder: nothing to cache
    if not net.frozen_encoder:
        log.info(
            "encoder outputs are not cached: the encoder trains in this run "
            "(fine-tuning, or a warm-up that unfreezes it)"
        )
        return False
    if augmented and not getattr(net, "cache_augmented_inputs", False):
        log.info(
            "frozen encoder outputs are not cached: augmentation changes the training "
            "inputs every epoch (augment=none caches them, each epoch after the first "
            "then trains the head only)"
        )
        return False
    net.feature_cache = FeatureCache()
    log.info("frozen encoder: its outputs are computed once per input and reused")
    return True
