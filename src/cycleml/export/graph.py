"""The modules that are exported: the trained network plus what runs around it.

Image models take raw ``uint8 (N, H, W, C)`` pixels and do the scaling,
normalisation and NCHW layout inside the graph; text models take ``int64 (N, L)``
token ids. Both end in a softmax, so the graph's output is ``probabilities``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cycleml.inference.preprocess import normalisation


class ImageInferenceNet(nn.Module):
    """``uint8 NHWC`` pixels → ``(pixels / 255 - mean) / std`` in NCHW → net → softmax."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        # the constants training normalises with: one multiply-add
        scale, shift = normalisation(mean, std)
        self.register_buffer("scale", torch.from_numpy(scale).view(1, -1, 1, 1))
        self.register_buffer("shift", torch.from_numpy(shift).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).to(torch.float32) * self.scale - self.shift
        return torch.softmax(self.net(x), dim=-1)


class TextInferenceNet(nn.Module):
    """``int64 (N, L)`` token ids → net → softmax."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(input_ids), dim=-1)
