"""Frozen EfficientNet-Lite0 ImageNet features as a scikit-learn transformer.

The image counterpart of a frozen text encoder: uint8 ``(N, H, W, C)`` images become the
network's pooled 1280-d features, which a linear classifier (``model=logreg_pretrained``)
then fits in seconds. Pixels are scaled to [-1, 1] here, as the weights expect, whatever
``data.mean``/``data.std`` say; grey images are repeated to three channels.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin

from cycleml.errors import DataError


class PretrainedImageFeatures(TransformerMixin, BaseEstimator):
    """``transform(images)`` → float32 ``(N, 1280)``; ``fit`` learns nothing."""

    def __init__(self, weights_path: str | None = None, batch_size: int = 64) -> None:
        self.weights_path = weights_path
        self.batch_size = batch_size

    def fit(self, images: np.ndarray, labels: np.ndarray | None = None) -> PretrainedImageFeatures:
        self._network()
        return self

    def _network(self) -> torch.nn.Module:
        if getattr(self, "net_", None) is None:
            from cycleml.models.efficientnet_lite import EfficientNetLite0

            # the ImageNet head is not needed: any class count, it is never used
            self.net_ = EfficientNetLite0(
                num_classes=1, pretrained=True, weights_path=self.weights_path
            ).eval()
        return self.net_

    def transform(self, images: np.ndarray) -> np.ndarray:
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise DataError(
                f"pretrained image features need uint8 (N, H, W, 1 or 3) images, "
                f"got shape {images.shape}"
            )
        net = self._network()
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = torch.from_numpy(
                    np.ascontiguousarray(images[start : start + self.batch_size])
                )
                x = batch.permute(0, 3, 1, 2).float() / 127.5 - 1.0
                if x.shape[1] == 1:
                    x = x.expand(-1, 3, -1, -1)
                chunks.append(net.features(x).numpy())
        return np.concatenate(chunks).astype(np.float32)
