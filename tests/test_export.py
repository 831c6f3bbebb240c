"""export_bundle: the exported graph, its verification and the precision variants."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from cycleml.errors import BundleError, ConfigError
from cycleml.export import ExportSettings, ExportVerificationError, export_bundle
from cycleml.export.graph import ImageInferenceNet
from cycleml.inference import load_bundle
from test_export_support import (
    IMAGE_CLASSES,
    TinyImageNet,
    build_text_bundle,
    cached_bundle,
    encode,
    image_spec,
    synthetic_images,
    synthetic_texts,
    text_tokenizer,
    train_image_net,
)


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_image_graph_takes_raw_pixels_and_does_the_preprocessing():
    bundle = load_bundle(cached_bundle("image"))
    model = onnx.load(str(bundle.model_path))
    assert model.opset_import[0].version >= 17
    (graph_input,) = model.graph.input
    assert graph_input.name == "pixels"
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in model.graph.output] == ["probabilities", "embedding"]

    # the graph's answer on raw uint8 NHWC equals the network on (x/255 - mean)/std NCHW
    net = train_image_net()
    images, _ = synthetic_images(9, seed=31)
    with torch.no_grad():
        x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5
        expected = torch.softmax(net(x), dim=-1).numpy()
    sess = session(bundle.model_path)
    np.testing.assert_allclose(sess.run(None, {"pixels": images})[0], expected, atol=1e-5)
    # dynamic batch axis: any batch size
    for n in (1, 4, 33):
        assert sess.run(None, {"pixels": synthetic_images(n)[0]})[0].shape == (n, 3)


def test_verification_and_metrics_are_recorded():
    meta = load_bundle(cached_bundle("image")).meta
    parity = meta.verification["parity"]
    assert parity["passed"] and parity["argmax_agreement"] == 1.0
    assert 0 <= parity["max_abs_diff"] <= 1e-4 and parity["samples"] == 120
    assert meta.verification["onnx_checker"] == "full"
    assert meta.metrics["val/acc"] == 1.0 and meta.metrics["bundle/val_acc"] == 1.0
    for precision in ("int8", "fp16"):
        variant = meta.variants[precision]
        assert variant.accuracy == meta.metrics[f"bundle/val_acc_{precision}"]
        assert variant.accuracy_drop <= 1.0 and not variant.forced
    assert meta.variants["int8"].method == "static"
    assert meta.source["exporter"].startswith("torch.onnx.export")


def test_reference_statistics_describe_the_validation_set():
    reference = load_bundle(cached_bundle("image")).meta.reference
    assert reference["num_samples"] == 120
    for feature in reference["features"].values():
        assert sum(feature["counts"]) == 120 and len(feature["edges"]) == 9
        assert feature["edges"] == sorted(feature["edges"])
    assert sum(reference["predicted_class"]) == pytest.approx(1.0)
    assert reference["predicted_class"] == pytest.approx(reference["label_class"])


def test_text_bundle_carries_its_tokenizer():
    bundle = load_bundle(cached_bundle("text"))
    assert (bundle.path / "tokenizer.json").read_text() == text_tokenizer().to_str()
    assert bundle.meta.variants["int8"].method == "dynamic"
    texts, labels = synthetic_texts(20, seed=8)
    probabilities = session(bundle.model_path).run(
        None, {"input_ids": encode(text_tokenizer(), texts)}
    )[0]
    assert (probabilities.argmax(1) == labels).all()
    assert set(bundle.meta.reference["features"]) == {"length", "confidence"}


class DivergesWhenExported(nn.Module):
    """Adds to one logit only while being exported: the graph disagrees with PyTorch."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        if torch.compiler.is_exporting():
            logits = logits + torch.tensor([0.0, 3.0, 0.0])
        return logits


def test_export_fails_with_the_numbers_when_onnx_disagrees(tmp_path):
    images, labels = synthetic_images(30, seed=4)
    target = tmp_path / "bundle"
    with pytest.raises(
        ExportVerificationError, match=r"max \|diff\| of probabilities 0\.\d+"
    ) as err:
        export_bundle(
            DivergesWhenExported(TinyImageNet().eval()), image_spec(), IMAGE_CLASSES, target,
            val_inputs=images, val_labels=labels,
            # the divergence is added after the head, where the embedding graph cuts the
            # network: check the probabilities-only graph
            settings=ExportSettings(embedding=False),
        )  # fmt: skip
    assert "argmax agreement" in str(err.value) and "required 100%" in str(err.value)
    # nothing is left behind: no bundle, no staging folder
    assert list(tmp_path.iterdir()) == []


def near_tie_validation_set(net: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """Random images the network scores with small margins, labelled by the network
    itself: fp32 gets all of them right and int8 rounding flips some."""
    images = np.random.default_rng(0).integers(0, 256, (3000, 12, 10, 3), dtype=np.uint8)
    with torch.no_grad():
        probabilities = ImageInferenceNet(net, [0.5] * 3, [0.5] * 3)(torch.from_numpy(images))
    top2 = torch.topk(probabilities, 2).values
    closest = torch.argsort(top2[:, 0] - top2[:, 1])[:300].numpy()
    return images[closest], probabilities[closest].argmax(1).numpy()


@pytest.fixture(scope="module")
def untrained_net() -> nn.Module:
    torch.manual_seed(3)
    net = TinyImageNet().eval()
    with torch.no_grad():
        net.head.weight.normal_(0, 3.0)
        net.head.bias.zero_()
    return net


def test_a_variant_losing_too_much_accuracy_is_refused_unless_forced(tmp_path, untrained_net):
    images, labels = near_tie_validation_set(untrained_net)
    with pytest.raises(ExportVerificationError, match=r"int8 variant loses \d+\.\d\d accuracy"):
        export_bundle(
            untrained_net, image_spec(), IMAGE_CLASSES, tmp_path / "refused",
            val_inputs=images, val_labels=labels,
            settings=ExportSettings(quantize="int8", max_accuracy_drop=1.0),
        )  # fmt: skip
    assert not (tmp_path / "refused").exists()
    bundle = export_bundle(
        untrained_net, image_spec(), IMAGE_CLASSES, tmp_path / "forced",
        val_inputs=images, val_labels=labels,
        settings=ExportSettings(quantize="int8", max_accuracy_drop=1.0, force=True),
    )  # fmt: skip
    variant = bundle.meta.variants["int8"]
    assert variant.forced and variant.accuracy_drop > 1.0
    assert bundle.meta.metrics["bundle/val_acc"] == 1.0
    assert variant.accuracy == pytest.approx(1.0 - variant.accuracy_drop / 100)
    saved = json.loads((bundle.path / "bundle.json").read_text())
    assert saved["variants"]["int8"]["forced"] is True


def test_existing_bundle_is_not_overwritten(tmp_path):
    images, labels = synthetic_images(20, seed=4)
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="already exists and is not empty"):
        export_bundle(
            TinyImageNet().eval(), image_spec(), IMAGE_CLASSES, target,
            val_inputs=images, val_labels=labels,
        )  # fmt: skip
    assert (target / "keep.txt").read_text() == "mine"


def test_bad_arguments_are_named(tmp_path):
    images, labels = synthetic_images(20, seed=4)
    net = TinyImageNet().eval()
    with pytest.raises(ConfigError, match=r"validation inputs are float32"):
        export_bundle(net, image_spec(), IMAGE_CLASSES, tmp_path / "a",
                      val_inputs=images.astype(np.float32), val_labels=labels)  # fmt: skip
    with pytest.raises(ConfigError, match="labels fall outside 0..2"):
        export_bundle(net, image_spec(), IMAGE_CLASSES, tmp_path / "b",
                      val_inputs=images, val_labels=labels + 5)  # fmt: skip
    with pytest.raises(ConfigError, match="kind='audio'"):
        export_bundle(net, {"kind": "audio"}, IMAGE_CLASSES, tmp_path / "c",
                      val_inputs=images, val_labels=labels)  # fmt: skip
    with pytest.raises(ConfigError, match="lacks 'mean'"):
        spec = {k: v for k, v in image_spec().items() if k != "mean"}
        export_bundle(net, spec, IMAGE_CLASSES, tmp_path / "d",
                      val_inputs=images, val_labels=labels)  # fmt: skip
    with pytest.raises(BundleError, match="opset 17 or newer"):
        export_bundle(net, image_spec(), IMAGE_CLASSES, tmp_path / "e",
                      val_inputs=images, val_labels=labels, settings=ExportSettings(opset=13))  # fmt: skip
    with pytest.raises(ConfigError, match="export.quantize='int4'"):
        ExportSettings(quantize="int4")


def test_a_text_model_exports_without_the_embedding_output(tmp_path):
    bundle = build_text_bundle(tmp_path / "text", embedding=False)
    assert not bundle.meta.embedding
    assert [o.name for o in ort.InferenceSession(str(bundle.model_path)).get_outputs()] == [
        "probabilities"
    ]


def _quantized_weights(path) -> dict[str, bool]:
    """Each Conv of an int8 graph: whether its weight comes through DequantizeLinear."""
    graph = onnx.load(str(path)).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name: n.input[1] in dequantized for n in graph.node if n.op_type == "Conv"}


def test_static_int8_keeps_a_mobilenet_stem_and_first_separable_block_in_float(tmp_path):
    """The stem and first depthwise-separable block of a MobileNet-like network stay in
    float (quantizing them costs EfficientNet-Lite0 most of its int8 accuracy); every
    later convolution, and every convolution of a network without depthwise ones, is
    quantized."""
    from cycleml.export.onnx_export import export_onnx
    from cycleml.export.precision import leading_separable_block, quantize_int8

    def separable(channels: int) -> list[nn.Module]:
        return [
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels),  # depthwise
            nn.ReLU6(),
            nn.Conv2d(channels, channels, 1),  # pointwise
        ]

    mobilenet = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU6(), *separable(8), *separable(8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )  # fmt: skip
    images, _ = synthetic_images(16)
    for name, net in (("mobilenet", mobilenet), ("plain", TinyImageNet())):
        fp32, int8 = tmp_path / f"{name}.onnx", tmp_path / f"{name}.int8.onnx"
        module = ImageInferenceNet(net.eval(), [0.5] * 3, [0.5] * 3)
        export_onnx(module, torch.from_numpy(images[:2]), fp32, "pixels")
        quantize_int8(fp32, int8, "static", "pixels", images)
        quantized = _quantized_weights(int8)
        kept = leading_separable_block(onnx.load(str(fp32)))
        if name == "plain":
            assert kept == [] and all(quantized.values()), quantized
        else:
            # stem, depthwise, pointwise in float; the second block quantized
            assert list(quantized.values()) == [False, False, False, True, True], quantized
            assert len(kept) == 3
        # the variant still runs and gives probabilities
        probabilities = session(int8).run(None, {"pixels": images})[0]
        np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
