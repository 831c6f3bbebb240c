"""GPU training with mixed precision; skipped where no CUDA device is present."""

from __future__ import annotations

import pytest
import torch

from cycleml.training.train import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_gpu_mixed_precision_training(make_cfg):
    precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    cfg = make_cfg("train", "trainer=gpu", f"trainer.precision={precision}")
    metrics = train(cfg)
    assert metrics["train/loss"] > 0
    assert 0 <= metrics["test/acc"] <= 1
