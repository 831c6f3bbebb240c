"""load_bundle: the schema of bundle.json and the checks against model.onnx."""

from __future__ import annotations

import json

import onnx
import pytest

from cycleml.errors import BundleError
from cycleml.inference import ImagePreprocess, TextPreprocess, load_bundle
from cycleml.inference.onnx_header import read_onnx_header
from test_export_support import IMAGE_CLASSES, cached_bundle, copy_bundle, rewrite_meta


def test_image_bundle_meta_is_complete():
    bundle = load_bundle(cached_bundle("image"))
    meta = bundle.meta
    assert (meta.format_version, meta.kind, meta.name, meta.version) == (
        1,
        "image",
        "tiny-image",
        "1",
    )
    assert meta.class_names == IMAGE_CLASSES
    assert (meta.input.name, meta.input.dtype, meta.input.shape) == (
        "pixels",
        "uint8",
        [-1, 12, 10, 3],
    )
    assert (meta.output.name, meta.output.shape) == ("probabilities", [-1, 3])
    assert isinstance(meta.preprocess, ImagePreprocess)
    assert meta.preprocess.image_size == [12, 10] and meta.preprocess.channels == 3
    assert meta.opset >= 17 and meta.run_id == "run-image"
    assert meta.fingerprint == "synthetic-images"
    assert meta.verification["parity"]["passed"] is True
    assert set(meta.reference["features"]) == {"brightness", "contrast", "confidence"}
    # loading through the bundle.json path gives the same bundle
    assert load_bundle(bundle.path / "bundle.json").meta == meta


def test_text_bundle_points_at_its_tokenizer():
    bundle = load_bundle(cached_bundle("text"))
    assert isinstance(bundle.meta.preprocess, TextPreprocess)
    assert bundle.tokenizer_path is not None and bundle.tokenizer_path.is_file()
    assert bundle.meta.input.dtype == "int64" and bundle.meta.input.shape == [-1, 12]


def test_header_reader_agrees_with_onnx():
    bundle = load_bundle(cached_bundle("image"))
    assert set(bundle.meta.variants) == {"int8", "fp16"}
    for precision in ["fp32", *bundle.meta.variants]:
        path = bundle.variant_path(precision)
        model = onnx.load(str(path))
        header = read_onnx_header(path)
        assert header.opsets == {o.domain: o.version for o in model.opset_import}
        initializers = {i.name for i in model.graph.initializer}
        expected_inputs = [i.name for i in model.graph.input if i.name not in initializers]
        assert [t.name for t in header.inputs] == expected_inputs
        assert [t.name for t in header.outputs] == [o.name for o in model.graph.output]
        assert header.inputs[0].shape == (-1, 12, 10, 3)


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="is a file"):
        load_bundle(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="has no bundle.json"):
        load_bundle(tmp_path / "empty")


def test_invalid_json_and_missing_keys(tmp_path):
    path = copy_bundle("image", tmp_path / "b")
    (path / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(path)
    (path / "bundle.json").write_text(json.dumps({"format_version": 1, "kind": "image"}))
    with pytest.raises(BundleError, match="missing required key 'class_names'"):
        load_bundle(path)


def test_unknown_format_version(tmp_path):
    path = copy_bundle("image", tmp_path / "b")
    rewrite_meta(path, format_version=99)
    with pytest.raises(BundleError, match="unsupported format_version 99"):
        load_bundle(path)


def test_mismatched_opset(tmp_path):
    path = copy_bundle("image", tmp_path / "b")
    opset = json.loads((path / "bundle.json").read_text())["opset"]
    rewrite_meta(path, opset=opset - 1)
    with pytest.raises(BundleError, match=f"uses opset {opset} but bundle.json says {opset - 1}"):
        load_bundle(path)


def test_mismatched_input_shape(tmp_path):
    path = copy_bundle("image", tmp_path / "b")
    meta = json.loads((path / "bundle.json").read_text())
    meta["input"]["shape"] = [-1, 16, 10, 3]
    meta["preprocess"]["image_size"] = [16, 10]
    rewrite_meta(path, **meta)
    with pytest.raises(
        BundleError, match=r"has shape \[-1, 12, 10, 3\], bundle.json says \[-1, 16"
    ):
        load_bundle(path)


def test_inconsistent_meta(tmp_path):
    path = copy_bundle("image", tmp_path / "b")
    rewrite_meta(path, class_names=[*IMAGE_CLASSES, "extra"])
    with pytest.raises(BundleError, match="output shape .* does not match 4 class names"):
        load_bundle(path)
    path = copy_bundle("image", tmp_path / "c")
    meta = json.loads((path / "bundle.json").read_text())
    meta["preprocess"]["image_size"] = [16, 16]
    rewrite_meta(path, **meta)
    with pytest.raises(BundleError, match="does not match the preprocessing"):
        load_bundle(path)
    path = copy_bundle("image", tmp_path / "d")
    meta = json.loads((path / "bundle.json").read_text())
    meta["input"]["dtype"] = "float32"
    rewrite_meta(path, **meta)
    with pytest.raises(BundleError, match="input dtype 'float32' does not fit a image model"):
        load_bundle(path)


@pytest.mark.parametrize(
    ("entry", "value", "message"),
    [
        ("input", {"name": "pixels", "dtype": "uint8", "shape": [-1, "12", 10, 3]},
         r"input shape must be a list of integers, got \[-1, '12', 10, 3\]"),
        ("preprocess", {"image_size": 12, "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3},
         "preprocess image_size must be \\[H, W\\], got 12"),
        ("preprocess", {"image_size": [12, 10], "channels": 3, "mean": None, "std": [0.5] * 3},
         "preprocess channels must be an integer, mean and std lists"),
        ("preprocess", {"image_size": [12, 10], "channels": 3, "mean": [0.5] * 3,
                        "std": [0.5] * 3, "resize_mode": "squash", "crop_fraction": 0},
         "preprocess resize mode 'squash' is not one of stretch, shorter_side_crop; "
         "preprocess crop fraction must be a number in \\(0, 1\\], got 0"),
        ("preprocess", {"image_size": [12, 10], "channels": 3, "mean": [0.5] * 3,
                        "std": [0.5] * 3, "resize": "lanczos"},
         "preprocess resize filter 'lanczos' is not one of bilinear, bicubic"),
        ("variants", ["int8"], "'variants' has the wrong type \\(list\\)"),
        ("metrics", [1.0], "'metrics' has the wrong type \\(list\\)"),
        ("model_file", "../model.onnx",
         "model_file must name a file in the bundle folder, got '../model.onnx'"),
    ],
)  # fmt: skip
def test_malformed_entries_are_named(tmp_path, entry, value, message):
    path = copy_bundle("image", tmp_path / "b")
    rewrite_meta(path, **{entry: value})
    with pytest.raises(BundleError, match=message):
        load_bundle(path)


def test_missing_or_broken_model_files(tmp_path):
    path = copy_bundle("image", tmp_path / "b")
    (path / "model.onnx").unlink()
    with pytest.raises(BundleError, match="missing its fp32 model file"):
        load_bundle(path)
    path = copy_bundle("image", tmp_path / "c")
    data = (path / "model.onnx").read_bytes()
    (path / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="not a valid ONNX model: a length-delimited field"):
        load_bundle(path)
    (path / "model.onnx").write_bytes(b"")
    with pytest.raises(BundleError, match="not a valid ONNX model: the file is empty"):
        load_bundle(path)
    path = copy_bundle("image", tmp_path / "d")
    (path / "model.int8.onnx").unlink()
    with pytest.raises(BundleError, match="missing its int8 model file"):
        load_bundle(path)


def test_missing_tokenizer(tmp_path):
    path = copy_bundle("text", tmp_path / "b")
    (path / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="missing its tokenizer file tokenizer.json"):
        load_bundle(path)


def test_unknown_variant_is_named(tmp_path):
    path = copy_bundle("image", tmp_path / "b")
    rewrite_meta(path, variants={})
    bundle = load_bundle(path)
    with pytest.raises(BundleError, match="has no 'int8' variant .*export.quantize=int8"):
        bundle.variant_path("int8")
