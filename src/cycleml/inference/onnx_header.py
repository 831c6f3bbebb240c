"""Read an ONNX file's opsets and graph inputs/outputs without the ``onnx`` package.

The inference side installs ONNX Runtime but not ``onnx``; validating a bundle only
needs a few fields of the ``ModelProto`` message, so they are decoded here straight
from the protobuf wire format (field numbers from ``onnx/onnx.proto``). Large parts
of the file, such as weights, are skipped by length and never read.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# TensorProto.DataType values we map to numpy names.
ELEM_TYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
}

# ModelProto / GraphProto / ValueInfoProto / TypeProto field numbers.
_MODEL_GRAPH, _MODEL_OPSET = 7, 8
_OPSET_DOMAIN, _OPSET_VERSION = 1, 2
_GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT = 5, 11, 12
_TENSOR_NAME = 8
_VALUE_NAME, _VALUE_TYPE = 1, 2
_TYPE_TENSOR = 1
_TENSOR_ELEM, _TENSOR_SHAPE = 1, 2
_SHAPE_DIM = 1
_DIM_VALUE = 1


class OnnxFormatError(ValueError):
    """The bytes are not a well-formed ONNX protobuf message."""


@dataclass(frozen=True)
class GraphTensor:
    """A graph input or output: name, numpy dtype name, shape (``-1`` = symbolic)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class OnnxHeader:
    """What a bundle check needs from ``model.onnx``."""

    opsets: dict[str, int]
    inputs: tuple[GraphTensor, ...]
    outputs: tuple[GraphTensor, ...]

    @property
    def default_opset(self) -> int | None:
        """Version of the default (``ai.onnx``) operator set."""
        return self.opsets.get("", self.opsets.get("ai.onnx"))


def read_onnx_header(path: str | Path) -> OnnxHeader:
    """Decode opsets and the graph's (non-initializer) inputs and outputs of ``path``.

    The file is mapped, not read: only the pages holding the fields walked over are
    loaded, so a large model costs no more memory to check than a small one.
    """
    with open(path, "rb") as file:
        if os.fstat(file.fileno()).st_size == 0:
            raise OnnxFormatError("the file is empty")
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            try:
                return _parse_model(memoryview(mapped))
            except (OnnxFormatError, UnicodeDecodeError) as err:
                # raised again below, once this error's traceback (which holds views
                # of the mapping) is gone and the mapping can close
                problem = str(err)
    raise OnnxFormatError(problem)


def _parse_model(data: memoryview) -> OnnxHeader:
    opsets: dict[str, int] = {}
    graph: memoryview | None = None
    for field, value in _fields(data):
        if field == _MODEL_OPSET and isinstance(value, memoryview):
            domain, version = "", 0
            for sub, sub_value in _fields(value):
                if sub == _OPSET_DOMAIN and isinstance(sub_value, memoryview):
                    domain = bytes(sub_value).decode("utf-8")
                elif sub == _OPSET_VERSION and isinstance(sub_value, int):
                    version = sub_value
            opsets[domain] = version
        elif field == _MODEL_GRAPH and isinstance(value, memoryview):
            graph = value
    if graph is None:
        raise OnnxFormatError("no graph in the model")
    initializers: set[str] = set()
    inputs: list[GraphTensor] = []
    outputs: list[GraphTensor] = []
    for field, value in _fields(graph):
        if not isinstance(value, memoryview):
            continue
        if field == _GRAPH_INITIALIZER:
            for sub, sub_value in _fields(value):
                if sub == _TENSOR_NAME and isinstance(sub_value, memoryview):
                    initializers.add(bytes(sub_value).decode("utf-8"))
        elif field == _GRAPH_INPUT:
            inputs.append(_value_info(value))
        elif field == _GRAPH_OUTPUT:
            outputs.append(_value_info(value))
    return OnnxHeader(
        opsets=opsets,
        inputs=tuple(t for t in inputs if t.name not in initializers),
        outputs=tuple(outputs),
    )


def _value_info(data: memoryview) -> GraphTensor:
    name, dtype, shape = "", "unknown", ()
    for field, value in _fields(data):
        if field == _VALUE_NAME and isinstance(value, memoryview):
            name = bytes(value).decode("utf-8")
        elif field == _VALUE_TYPE and isinstance(value, memoryview):
            for sub, tensor in _fields(value):
                if sub == _TYPE_TENSOR and isinstance(tensor, memoryview):
                    dtype, shape = _tensor_type(tensor)
    return GraphTensor(name=name, dtype=dtype, shape=shape)


def _tensor_type(data: memoryview) -> tuple[str, tuple[int, ...]]:
    dtype, dims = "unknown", []
    for field, value in _fields(data):
        if field == _TENSOR_ELEM and isinstance(value, int):
            dtype = ELEM_TYPES.get(value, f"onnx-type-{value}")
        elif field == _TENSOR_SHAPE and isinstance(value, memoryview):
            for sub, dim in _fields(value):
                if sub == _SHAPE_DIM and isinstance(dim, memoryview):
                    size = -1
                    for dim_field, dim_value in _fields(dim):
                        if dim_field == _DIM_VALUE and isinstance(dim_value, int):
                            size = dim_value
                    dims.append(size)
    return dtype, tuple(dims)


def _fields(data: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """Yield ``(field number, value)``: ints for varint/fixed fields, views for bytes."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            yield field, value
        elif wire == 1:
            yield field, int.from_bytes(data[pos : pos + 8], "little")
            pos += 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > end:
                raise OnnxFormatError("a length-delimited field runs past the end of the data")
            yield field, data[pos : pos + length]
            pos += length
        elif wire == 5:
            yield field, int.from_bytes(data[pos : pos + 4], "little")
            pos += 4
        else:
            raise OnnxFormatError(f"unsupported protobuf wire type {wire} at byte {pos}")
    if pos != end:
        raise OnnxFormatError("truncated protobuf message")


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(data):
            raise OnnxFormatError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise OnnxFormatError("varint longer than 64 bits")
