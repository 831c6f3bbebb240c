"""Predictor: ONNX Runtime on a bundle, preprocessing, thread safety, no torch needed."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from cycleml.errors import DataError
from cycleml.inference import Predictor, default_providers, load_bundle
from test_export_support import (
    IMAGE_CLASSES,
    TEXT_CLASSES,
    cached_bundle,
    synthetic_images,
    synthetic_texts,
)


@pytest.fixture(scope="module")
def image_predictor() -> Predictor:
    return Predictor(load_bundle(cached_bundle("image")), intra_op_threads=1)


@pytest.fixture(scope="module")
def text_predictor() -> Predictor:
    return Predictor(cached_bundle("text"), intra_op_threads=1)


def png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.squeeze()).save(buffer, format=fmt)
    return buffer.getvalue()


def test_run_gives_probabilities_and_correct_labels(image_predictor):
    images, labels = synthetic_images(40, seed=11)
    probabilities = image_predictor.run(images)
    assert probabilities.dtype == np.float32 and probabilities.shape == (40, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    direct = ort.InferenceSession(str(image_predictor.bundle.model_path)).run(
        None, {"pixels": images}
    )[0]
    np.testing.assert_allclose(probabilities, direct, atol=1e-6)
    predictions = image_predictor.predict(images, top_k=2)
    assert [p.label_id for p in predictions] == labels.tolist()
    first = predictions[0]
    assert first.label == IMAGE_CLASSES[first.label_id]
    assert len(first.top_k) == 2 and first.top_k[0] == (first.label, first.confidence)
    assert first.top_k[0][1] >= first.top_k[1][1]
    # top_k larger than the number of classes is capped
    assert len(image_predictor.predict(images[:1], top_k=10)[0].top_k) == 3


def test_interface_attributes(image_predictor):
    assert image_predictor.input_name == "pixels"
    assert image_predictor.input_dtype == np.uint8
    assert image_predictor.input_shape == (-1, 12, 10, 3)
    assert image_predictor.output_name == "probabilities"
    assert image_predictor.class_names == IMAGE_CLASSES
    assert default_providers()[-1] == "CPUExecutionProvider"
    assert image_predictor.providers == ["CPUExecutionProvider"]


def test_run_rejects_wrong_dtype_and_shape(image_predictor):
    images, _ = synthetic_images(2)
    with pytest.raises(ValueError, match="'pixels' must be uint8, got float32"):
        image_predictor.run(images.astype(np.float32))
    with pytest.raises(ValueError, match=r"'pixels' must have shape \('N', 12, 10, 3\)"):
        image_predictor.run(images[:, :, :5])
    with pytest.raises(ValueError, match="must be a numpy array"):
        image_predictor.run(images.tolist())
    assert image_predictor.run(images[:0]).shape == (0, 3)


def test_run_is_thread_safe(image_predictor):
    batches = [synthetic_images(n, seed=n)[0] for n in range(1, 25)]
    serial = [image_predictor.run(b) for b in batches]
    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(image_predictor.run, batches))
    for expected, got in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(expected, got)


def test_preprocess_image_accepts_bytes_arrays_and_pil(image_predictor):
    images, labels = synthetic_images(6, seed=3)
    from_bytes = [image_predictor.preprocess_image(png(i)) for i in images]
    np.testing.assert_array_equal(np.stack(from_bytes), images)  # PNG is lossless
    from_pil = image_predictor.preprocess_image(Image.fromarray(images[0]))
    np.testing.assert_array_equal(from_pil, images[0])
    from_array = image_predictor.preprocess_image(images[0])
    np.testing.assert_array_equal(from_array, images[0])
    # a larger grey image is converted to RGB and resized with PIL's bilinear filter
    grey = np.random.default_rng(0).integers(0, 255, (48, 40), dtype=np.uint8)
    out = image_predictor.preprocess_image(grey)
    expected = np.asarray(
        Image.fromarray(grey).convert("RGB").resize((10, 12), Image.Resampling.BILINEAR)
    )
    assert out.shape == (12, 10, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    rgba = np.dstack([images[0], np.full((12, 10), 255, np.uint8)])
    np.testing.assert_array_equal(image_predictor.preprocess_image(rgba), images[0])
    jpeg = image_predictor.preprocess_image(png(images[0], "JPEG"))
    assert jpeg.shape == (12, 10, 3)
    results = image_predictor.predict_images([png(i) for i in images])
    assert [r.label_id for r in results] == labels.tolist()


def test_image_files_are_read_and_decoded(image_predictor, tmp_path):
    images, _ = synthetic_images(2, seed=4)
    Image.fromarray(images[0]).save(tmp_path / "a.png")
    np.testing.assert_array_equal(image_predictor.preprocess_image(tmp_path / "a.png"), images[0])
    with pytest.raises(DataError, match="cannot read image file: FileNotFoundError"):
        image_predictor.preprocess_image(tmp_path / "missing.png")
    with pytest.raises(DataError, match=r"not a regular file \(a folder\)"):
        image_predictor.preprocess_image(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match="empty data"):
        image_predictor.preprocess_image(tmp_path / "empty.png")


def test_top_k_ranks_best_first_lower_id_on_ties():
    probabilities = np.array([[0.2, 0.5, 0.3], [0.4, 0.2, 0.4]], dtype=np.float32)
    ids, probs = Predictor.top_k(probabilities, 2)
    assert ids.tolist() == [[1, 2], [0, 2]]
    np.testing.assert_array_equal(probs, probabilities[[[0], [1]], ids])
    assert Predictor.top_k(probabilities, 10)[0].shape == (2, 3)
    assert Predictor.top_k(probabilities, 0)[0].tolist() == [[1], [0]]


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="PNG")
    return buffer.getvalue()


def test_undecodable_images_raise_data_error(image_predictor):
    with pytest.raises(DataError, match="cannot decode image") as err:
        image_predictor.preprocess_image(b"definitely not an image")
    # the same text on every run: no in-memory object's address in it
    assert str(err.value) == "cannot decode image: not an image, or in a format Pillow cannot read"
    truncated = _png_bytes()[:400]
    with pytest.raises(DataError, match="cannot decode image") as err:
        image_predictor.preprocess_image(truncated)
    assert " at 0x" not in str(err.value)
    with pytest.raises(DataError, match="empty data"):
        image_predictor.preprocess_image(b"")
    with pytest.raises(DataError, match="must be uint8"):
        image_predictor.preprocess_image(np.zeros((12, 10, 3), np.float32))
    with pytest.raises(DataError, match="unsupported image input type"):
        image_predictor.preprocess_image(12)


def test_text_predictor(text_predictor):
    texts, labels = synthetic_texts(30, seed=5)
    ids = text_predictor.preprocess_texts(texts)
    assert ids.dtype == np.int64 and ids.shape == (30, 12)
    assert (ids[:, -1] == 0).any()  # short texts are padded with pad_id 0
    long_text = " ".join(["apple"] * 50)
    assert text_predictor.preprocess_texts([long_text]).shape == (1, 12)
    results = text_predictor.predict_texts(texts, top_k=3)
    assert [r.label for r in results] == [TEXT_CLASSES[i] for i in labels]
    with pytest.raises(DataError, match="text #1 is empty"):
        text_predictor.preprocess_texts(["apple", "   "])
    with pytest.raises(ValueError, match="text model, not image"):
        text_predictor.preprocess_image(b"x")


def test_precision_variants_load_and_agree(image_predictor):
    images, labels = synthetic_images(40, seed=12)
    for precision in ("int8", "fp16"):
        variant = Predictor(image_predictor.bundle, precision=precision, intra_op_threads=1)
        assert variant.precision == precision
        agreement = (variant.run(images).argmax(1) == labels).mean()
        assert agreement >= 0.95


def test_inference_runs_without_torch(tmp_path):
    """The inference side and `cycleml predict` (API and CLI) import and run where the
    training-only packages (torch, onnx, lightning, optuna, scikit-learn) cannot."""
    images, labels = synthetic_images(5, seed=21)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")
    (tmp_path / "t.jsonl").write_text('{"text": "cloud rain"}\n{"text": "fern moss"}\n')
    script = textwrap.dedent(
        f"""
        import importlib.abc, json, sys

        BLOCKED = ("torch", "onnx", "onnxscript", "onnx_ir", "lightning", "optuna", "sklearn")

        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{{name}} is not installed here")
                return None

        sys.meta_path.insert(0, NoTorch())
        try:
            import torch  # noqa: F401
            raise SystemExit("torch import was not blocked")
        except ImportError:
            pass

        from cycleml.inference import Predictor, load_bundle
        from cycleml.batch.runner import PredictSettings, predict_to_database

        image = Predictor(load_bundle({str(cached_bundle("image"))!r}))
        text = Predictor(load_bundle({str(cached_bundle("text"))!r}))
        summary = predict_to_database(
            {str(cached_bundle("image"))!r}, {str(folder)!r},
            "sqlite:///{tmp_path / "p.db"}", PredictSettings(progress=False),
        )
        from cycleml.cli import main
        main(["predict", "bundle={str(cached_bundle("text"))}", "input={tmp_path / "t.jsonl"}",
              "db_url=sqlite:///{tmp_path / "cli.db"}", "hydra.run.dir={tmp_path / "run"}",
              "progress=false"])
        print(json.dumps({{
            "image": [p.label_id for p in image.predict_images(
                [open({str(folder)!r} + f"/{{i}}.png", "rb").read() for i in range(5)])],
            "text": text.predict_texts(["apple cherry plum"])[0].label,
            "written": summary.written,
            "torch_loaded": any(m.split(".")[0] in BLOCKED for m in sys.modules),
        }}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out == {
        "image": labels.tolist(),
        "text": "fruit",
        "written": 5,
        "torch_loaded": False,
    }
    assert Path(tmp_path / "p.db").is_file()
    cli_summary = json.loads((tmp_path / "run" / "predict_summary.json").read_text())
    assert cli_summary["written"] == 2 and cli_summary["model_name"] == "tiny-text"


def test_session_config_entries_reach_onnx_runtime():
    images, _ = synthetic_images(8, seed=13)
    sleeping = Predictor(
        cached_bundle("image"),
        intra_op_threads=2,
        session_config={"session.intra_op.allow_spinning": "0"},
    )
    spinning = Predictor(cached_bundle("image"), intra_op_threads=2)
    options = sleeping.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    np.testing.assert_array_equal(sleeping.run(images), spinning.run(images))


def test_token_limit_counts_the_text_before_truncation_without_special_tokens() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from cycleml.inference.preprocess import TextPreprocessor, TooManyTokens

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "a": 4, "b": 5}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    text = TextPreprocessor(tokenizer, max_length=6, pad_id=0)
    eleven = "a b a b a b a b a b a"
    assert text([eleven]).tolist() == [[2, 4, 5, 4, 5, 3]]  # cut to max_length
    assert text([eleven, "a b"], max_tokens=11).shape == (2, 6)
    with pytest.raises(TooManyTokens, match="text #0 has 11 tokens; the limit is 10"):
        text([eleven], max_tokens=10)


def test_the_bundles_resize_mode_prepares_images(tmp_path):
    """bundle.json's resize_mode/crop_fraction/resize decide how the Predictor prepares
    an image; a bundle written before them stretches the whole image (bilinear)."""
    from cycleml.inference.preprocess import ImagePreprocessor
    from test_export_support import copy_bundle, rewrite_meta

    photo = np.random.default_rng(1).integers(0, 255, (41, 67, 3), dtype=np.uint8)
    old = copy_bundle("image", tmp_path / "old")
    meta = json.loads((old / "bundle.json").read_text())
    for key in ("resize", "resize_mode", "crop_fraction"):
        meta["preprocess"].pop(key, None)
    rewrite_meta(old, **meta)
    stretched = Predictor(old, warmup=False).preprocess_image(photo)
    expected = np.asarray(Image.fromarray(photo).resize((10, 12), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(stretched, expected)

    crop = copy_bundle("image", tmp_path / "crop")
    meta["preprocess"].update(resize="bicubic", resize_mode="shorter_side_crop", crop_fraction=0.5)
    rewrite_meta(crop, **meta)
    predictor = Predictor(crop, warmup=False)
    cropped = predictor.preprocess_image(png(photo))
    # the centre half of the shorter side (41 px), at the model's 10:12 aspect ratio
    box = (33.5 - 8.54166, 20.5 - 10.25, 33.5 + 8.54166, 20.5 + 10.25)
    expected = np.asarray(
        Image.fromarray(photo).resize((10, 12), Image.Resampling.BICUBIC, box=box)
    )
    assert np.abs(cropped.astype(int) - expected.astype(int)).max() <= 1
    same = ImagePreprocessor.from_bundle(predictor.bundle.meta.preprocess)(photo)
    np.testing.assert_array_equal(cropped, same)
    assert not np.array_equal(cropped, stretched)
