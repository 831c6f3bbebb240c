"""Does the exported graph compute what the PyTorch module computes?

Both run on the same validation samples; the bundle is accepted only when the
largest absolute difference of any probability is within the tolerance and the
predicted class agrees on every sample.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from cycleml.errors import BundleError
from cycleml.export.onnx_export import OUTPUT_NAME


class ExportVerificationError(BundleError):
    """The exported model disagrees with the PyTorch model (or a variant scores too low)."""


@dataclass(frozen=True)
class ParityReport:
    """ONNX Runtime vs PyTorch on the same samples."""

    samples: int
    max_abs_diff: float
    argmax_agreement: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.argmax_agreement == 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def torch_probabilities(module: nn.Module, inputs: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Run the PyTorch module on ``inputs`` in batches (CPU, eval mode, no grad)."""
    module = module.eval()
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(inputs[start : start + batch_size]))
            outputs.append(module(batch).float().numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)


def onnx_probabilities(
    model_path: Path, input_name: str, inputs: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """Run an ONNX file with ONNX Runtime (CPU) on ``inputs`` in batches."""
    return onnx_output(model_path, input_name, inputs, OUTPUT_NAME, batch_size)


def onnx_output(
    model_path: Path, input_name: str, inputs: np.ndarray, output: str, batch_size: int = 256
) -> np.ndarray:
    """One named output of an ONNX file run with ONNX Runtime (CPU) on ``inputs``."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    outputs = [
        session.run([output], {input_name: np.ascontiguousarray(inputs[s : s + batch_size])})[0]
        for s in range(0, len(inputs), batch_size)
    ]
    return np.concatenate(outputs).astype(np.float32)


def compare_probabilities(
    reference: np.ndarray, candidate: np.ndarray, tolerance: float
) -> ParityReport:
    """Largest absolute difference and argmax agreement of two probability arrays."""
    if reference.shape != candidate.shape:
        raise ExportVerificationError(
            f"ONNX output shape {candidate.shape} differs from PyTorch {reference.shape}"
        )
    agreement = (
        float((reference.argmax(1) == candidate.argmax(1)).mean()) if len(reference) else 1.0
    )
    return ParityReport(
        samples=int(len(reference)),
        max_abs_diff=float(np.abs(reference - candidate).max()) if reference.size else 0.0,
        argmax_agreement=agreement,
        tolerance=float(tolerance),
    )


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose argmax is the label."""
    if len(labels) == 0:
        return 0.0
    return float((probabilities.argmax(axis=1) == labels).mean())
