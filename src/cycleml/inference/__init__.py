"""Inference side: load a model bundle and run it with ONNX Runtime. Never imports torch."""

from cycleml.inference.bundle import (
    FORMAT_VERSION,
    BundleMeta,
    ImagePreprocess,
    ModelBundle,
    TensorSpec,
    TextPreprocess,
    Variant,
    load_bundle,
)
from cycleml.inference.predictor import Prediction, Predictor, default_providers

__all__ = [
    "FORMAT_VERSION",
    "BundleMeta",
    "ImagePreprocess",
    "ModelBundle",
    "Prediction",
    "Predictor",
    "TensorSpec",
    "TextPreprocess",
    "Variant",
    "default_providers",
    "load_bundle",
]
