"""KServe v2 request parsing and response encoding, JSON and binary tensors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cycleml.serving.protocol import (
    InferRequest,
    ProtocolError,
    encode_response,
    json_loads,
    parse_binary_request,
    parse_json_request,
)


def _json(body: dict) -> bytes:
    return json.dumps(body).encode()


def test_flat_and_nested_json_data_give_the_same_tensor() -> None:
    pixels = np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3)
    flat = parse_json_request(
        _json(
            {
                "id": "r1",
                "inputs": [
                    {
                        "name": "pixels",
                        "datatype": "UINT8",
                        "shape": [2, 2, 2, 3],
                        "data": pixels.reshape(-1).tolist(),
                    }
                ],
            }
        )
    )
    nested = parse_json_request(
        _json(
            {
                "inputs": [
                    {
                        "name": "pixels",
                        "datatype": "UINT8",
                        "shape": [2, 2, 2, 3],
                        "data": pixels.tolist(),
                    }
                ]
            }
        )
    )
    for request in (flat, nested):
        (tensor,) = request.inputs
        assert tensor.array.dtype == np.uint8
        np.testing.assert_array_equal(tensor.array, pixels)
    assert flat.id == "r1" and nested.id is None


def test_binary_tensors_follow_the_json_header() -> None:
    ids = np.arange(12, dtype=np.int64).reshape(3, 4)
    pixels = np.arange(6, dtype=np.uint8).reshape(1, 6)
    header = _json(
        {
            "inputs": [
                {
                    "name": "a",
                    "datatype": "INT64",
                    "shape": [3, 4],
                    "parameters": {"binary_data_size": ids.nbytes},
                },
                {
                    "name": "b",
                    "datatype": "UINT8",
                    "shape": [1, 6],
                    "parameters": {"binary_data_size": pixels.nbytes},
                },
            ],
            "parameters": {"timeout": 2500},
        }
    )
    request = parse_binary_request(header + ids.tobytes() + pixels.tobytes(), str(len(header)))
    np.testing.assert_array_equal(request.inputs[0].array, ids)
    np.testing.assert_array_equal(request.inputs[1].array, pixels)
    assert request.timeout_us == 2500.0


@pytest.mark.parametrize(
    "data",
    [
        np.random.default_rng(0).integers(0, 256, 3072).tolist(),  # flat pixels
        [0, 255, 17, 128, 1, 2],
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # floats: read as numpy reads them
        [[1, 2, 3], [4, 5, 6]],  # nested
        [1, 2, 3, 4, 5, 2.5],
    ],
)
def test_uint8_json_data_reads_as_numpy_reads_it(data: list) -> None:
    """The flat-integer shortcut for UINT8 gives the array np.array gives, and every
    other layout still goes through np.array."""
    nested = np.array(data)
    shape = list(nested.shape) if nested.ndim > 1 else [1, nested.size]
    if nested.size == 3072:
        shape = [1, 32, 32, 3]
    body = _json({"inputs": [{"name": "x", "datatype": "UINT8", "shape": shape, "data": data}]})
    array = parse_json_request(body).inputs[0].array
    expected = np.array(data, dtype=np.uint8).reshape(shape)
    assert array.dtype == np.uint8
    assert array.shape == expected.shape
    assert np.array_equal(array, expected)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([256, 0], "cannot be read as UINT8 (Python integer 256 out of bounds"),
        ([0, -1], "cannot be read as UINT8 (Python integer -1 out of bounds"),
        ([0, "a"], "cannot be read as UINT8"),
        ([0, None], "cannot be read as UINT8"),
        ([0, True], "holds true/false"),
        ([1, 2], "has 2 elements but shape [3] needs 3"),
    ],
)
def test_bad_uint8_json_data_is_named(data: list, message: str) -> None:
    shape = [3] if data == [1, 2] else [len(data)]
    body = _json({"inputs": [{"name": "x", "datatype": "UINT8", "shape": shape, "data": data}]})
    with pytest.raises(ProtocolError) as err:
        parse_json_request(body)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (_json({"inputs": []}), "non-empty 'inputs'"),
        (
            _json({"inputs": [{"name": "x", "datatype": "FLOAT", "shape": [1], "data": [1]}]}),
            "datatype 'FLOAT'",
        ),
        (
            _json({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1, -2], "data": []}]}),
            "non-negative integers",
        ),
        (
            _json(
                {"inputs": [{"name": "x", "datatype": "UINT8", "shape": [2, 3], "data": [1, 2, 3]}]}
            ),
            "has 3 elements but shape [2, 3] needs 6",
        ),
        (
            _json({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "data": [300]}]}),
            "cannot be read as UINT8",
        ),
        (
            _json({"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": ["a"]}]}),
            "cannot be read as INT64",
        ),
        (
            _json(
                {
                    "inputs": [
                        {"name": "x", "datatype": "UINT8", "shape": [3, 1], "data": [[1, 2, 3]]}
                    ]
                }
            ),
            "nested 'data' has shape [1, 3]",
        ),
        (
            _json({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1]}]}),
            "neither 'data' nor binary_data_size",
        ),
        (
            _json(
                {
                    "inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "data": [1]}],
                    "outputs": "probabilities",
                }
            ),
            "'outputs' must be a list",
        ),
        (
            _json(
                {
                    "inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "data": [1]}],
                    "parameters": {"timeout": -5},
                }
            ),
            "parameter 'timeout'",
        ),
    ],
)
def test_malformed_json_requests_name_the_problem(body: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=None) as raised:
        request = parse_json_request(body)
        _ = request.timeout_us
    assert message in str(raised.value)


def test_binary_sizes_are_checked_against_shape_and_body() -> None:
    header = _json(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [2],
                    "parameters": {"binary_data_size": 4},
                }
            ]
        }
    )
    with pytest.raises(ProtocolError, match="does not match shape"):
        parse_binary_request(header + b"\0" * 4, str(len(header)))
    header = _json(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [2],
                    "parameters": {"binary_data_size": 8},
                }
            ]
        }
    )
    with pytest.raises(ProtocolError, match="only 4 remain"):
        parse_binary_request(header + b"\0" * 4, str(len(header)))
    with pytest.raises(ProtocolError, match="bytes after the binary tensors"):
        parse_binary_request(header + b"\0" * 12, str(len(header)))
    with pytest.raises(ProtocolError, match="outside the body"):
        parse_binary_request(header, str(len(header) + 10))
    with pytest.raises(ProtocolError, match="must be an integer"):
        parse_binary_request(header, "ten")


def test_a_known_binary_header_gives_each_body_its_own_tensors() -> None:
    """The second request with the same header bytes takes the kept layout: its tensors
    are its own body's bytes, and a body of the wrong size is still refused."""
    header = _json(
        {
            "inputs": [
                {
                    "name": "a",
                    "datatype": "INT32",
                    "shape": [1, 2],
                    "parameters": {"binary_data_size": 8},
                },
                {
                    "name": "b",
                    "datatype": "UINT8",
                    "shape": [3],
                    "parameters": {"binary_data_size": 3},
                },
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
        }
    )
    length = str(len(header))
    bodies = [
        np.array([[1, 2]], np.int32).tobytes() + bytes([7, 8, 9]),
        np.array([[-5, 6]], np.int32).tobytes() + bytes([0, 1, 255]),
    ]
    first, second = (parse_binary_request(header + body, length) for body in bodies)
    assert first.inputs[0].array.tolist() == [[1, 2]] and first.inputs[1].array.tolist() == [
        7,
        8,
        9,
    ]
    assert second.inputs[0].array.tolist() == [[-5, 6]]
    assert second.inputs[1].array.tolist() == [0, 1, 255]
    assert second.binary_outputs == {"y"} and second.outputs == ["y"]
    assert [t.name for t in second.inputs] == ["a", "b"]
    with pytest.raises(ProtocolError, match="only 2 remain"):
        parse_binary_request(header + bodies[0][:10], length)
    with pytest.raises(ProtocolError, match="bytes after the binary tensors"):
        parse_binary_request(header + bodies[0] + b"\0", length)


def test_response_as_json_or_binary_by_request() -> None:
    probabilities = np.array([[0.25, 0.75], [0.5, 0.5]], dtype=np.float32)
    as_json = encode_response(
        "m", "3", InferRequest(inputs=[], id="x"), {"probabilities": probabilities}
    )
    assert as_json.header_length is None
    document = json_loads(as_json.body)
    assert document["model_version"] == "3" and document["id"] == "x"
    (tensor,) = document["outputs"]
    assert tensor["shape"] == [2, 2] and tensor["datatype"] == "FP32"
    assert tensor["data"] == pytest.approx([0.25, 0.75, 0.5, 0.5])

    binary = encode_response(
        "m",
        "3",
        InferRequest(inputs=[], binary_outputs={"probabilities"}, outputs=["probabilities"]),
        {"probabilities": probabilities},
    )
    header = json_loads(binary.body[: binary.header_length])
    size = header["outputs"][0]["parameters"]["binary_data_size"]
    assert size == probabilities.nbytes
    np.testing.assert_array_equal(
        np.frombuffer(binary.body[binary.header_length :], np.float32).reshape(2, 2), probabilities
    )
