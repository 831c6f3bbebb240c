"""Lower-precision variants of an exported model: int8 (ONNX Runtime quantization)
and fp16 (for GPUs). Inputs and outputs keep their types, so a variant is a drop-in
replacement for ``model.onnx``.

Static int8 keeps the stem and the first depthwise-separable block of a MobileNet-like
network (EfficientNet-Lite0) in float: there, per-tensor int8 activations lose the
small channels that the next pointwise convolution weighs heavily, and the error grows
through every later block (ImageNet top-1 agreement with fp32 of 27 % with them
quantized, 66 % without, on photo crops; see docs/transfer_learning.md). Networks
without depthwise convolutions are quantized whole, as before."""

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


def leading_separable_block(model: onnx.ModelProto) -> list[str]:
    """Names of the convolutions up to and including the pointwise one after the first
    depthwise convolution (a grouped Conv whose groups equal its input channels), in
    graph order; empty when the graph has no depthwise convolution."""
    weights = {init.name: list(init.dims) for init in model.graph.initializer}
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    for index, node in enumerate(convs):
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        shape = weights.get(node.input[1]) if len(node.input) > 1 else None
        if groups > 1 and shape is not None and shape[1] == 1:  # one input channel per group
            return [conv.name for conv in convs[: index + 2]]
    return []


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
            keep_float = leading_separable_block(onnx.load(str(prepared)))
            if keep_float:
                log.info("int8: keeping the stem and first separable block in float: %s",
                         ", ".join(keep_float))  # fmt: skip
            quantize_static(
                str(prepared),
                str(out_path),
                _ArrayCalibration(input_name, calibration),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=_WEIGHT_OPS,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=keep_float,
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
