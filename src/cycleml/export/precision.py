"""Lower-precision variants of an exported model: int8 (ONNX Runtime quantization)
and fp16 (for GPUs). Inputs and outputs keep their types, so a variant is a drop-in
replacement for ``model.onnx``."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16

from cycleml.errors import ConfigError

log = logging.getLogger(__name__)

INT8_METHODS = ("auto", "static", "dynamic")
# Ops whose weights are quantized; the rest (preprocessing, softmax) stays in float.
_WEIGHT_OPS = ["Conv", "Gemm", "MatMul"]


class _ArrayCalibration(CalibrationDataReader):
    """Feeds calibration batches of a numpy array to the static quantizer."""

    def __init__(self, input_name: str, inputs: np.ndarray, batch_size: int = 64) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            {input_name: np.ascontiguousarray(inputs[s : s + batch_size])}
            for s in range(0, len(inputs), batch_size)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def resolve_int8_method(method: str, kind: str) -> str:
    """``auto``: static (calibrated activations) for image CNNs, dynamic for text."""
    if method not in INT8_METHODS:
        raise ConfigError(f"export.int8_method={method!r}: expected one of {INT8_METHODS}")
    if method == "auto":
        return "static" if kind == "image" else "dynamic"
    return method


def quantize_int8(
    model_path: Path,
    out_path: Path,
    method: str,
    input_name: str,
    calibration: np.ndarray,
) -> None:
    """Write an int8 version of ``model_path``: ``static`` QDQ with activations
    calibrated on ``calibration`` inputs, or ``dynamic`` (weights only)."""
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(model_path), str(prepared), skip_symbolic_shape=True)
        if method == "static":
            quantize_static(
                str(prepared),
                str(out_path),
                _ArrayCalibration(input_name, calibration),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=_WEIGHT_OPS,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
        else:
            quantize_dynamic(
                str(prepared),
                str(out_path),
                op_types_to_quantize=["MatMul", "Gemm"],
                weight_type=QuantType.QInt8,
            )
    log.info("wrote int8 (%s) variant %s", method, out_path.name)


def convert_fp16(model_path: Path, out_path: Path) -> None:
    """Write an fp16 version of ``model_path`` keeping uint8/int64 inputs and a
    float32 output, so clients need no change."""
    model = onnx.load(str(model_path))
    converted = convert_float_to_float16(model, keep_io_types=True)
    onnx.save(converted, str(out_path))
    log.info("wrote fp16 variant %s", out_path.name)
