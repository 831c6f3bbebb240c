"""Inference side: load a model bundle and run it with ONNX Runtime. Never imports torch.

The names below are imported on first use, so that reading a bundle's metadata (serve
settings, `--help`) does not load ONNX Runtime.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    **dict.fromkeys(
        (
            "FORMAT_VERSION",
            "BundleMeta",
            "ImagePreprocess",
            "ModelBundle",
            "TensorSpec",
            "TextPreprocess",
            "Variant",
            "load_bundle",
        ),
        "cycleml.inference.bundle",
    ),
    **dict.fromkeys(
        ("Prediction", "Predictor", "default_providers"), "cycleml.inference.predictor"
    ),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cycleml.inference' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
