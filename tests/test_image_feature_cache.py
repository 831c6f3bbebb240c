"""A linear probe's frozen backbone runs once per image and run; its head learns the same."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch

pytest.importorskip(
    "timm", reason="model=efficientnet_lite0 needs timm (cycleml[pretrained-images])"
)

from cycleml.models.efficientnet_lite import EfficientNetLite0  # noqa: E402
from cycleml.models.feature_cache import enable_feature_cache, pixel_keys  # noqa: E402
from cycleml.training.train import build_datamodule, build_model, train  # noqa: E402

SMALL = ["model.net.pretrained=false", "data.image_size=32", "data.batch_size=16"]


def _fit(cfg, datamodule, cached: bool, epochs: int = 3) -> tuple[L.LightningModule, int, dict]:
    """Fit a probe from seed 0; returns it, the images its backbone saw, the last metrics."""
    L.seed_everything(0, workers=True)
    module = build_model(cfg, datamodule, "test")
    seen = []
    module.net.model.conv_stem.register_forward_hook(lambda m, args, out: seen.append(len(out)))
    if cached:
        assert enable_feature_cache(module.net)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    trainer.fit(module, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return module, sum(seen), metrics


def test_a_cached_probe_encodes_each_image_once_and_learns_the_same_head(make_cfg, demo_images):
    cfg = make_cfg("train", "experiment=image_folder_probe", f"data.path={demo_images}", *SMALL)
    datamodule = build_datamodule(cfg)
    assert datamodule.train_transform is None  # the probe recipe does not augment
    items = len(datamodule.split_ids("train")) + len(datamodule.split_ids("val"))
    plain, plain_seen, plain_metrics = _fit(cfg, datamodule, cached=False)
    cached, cached_seen, cached_metrics = _fit(cfg, datamodule, cached=True)
    assert plain_seen == 3 * items  # three epochs of training and validation images
    assert cached_seen == items  # each image once, in the first epoch
    assert cached.net.feature_cache.hits == 2 * items
    head, cached_head = plain.net.model.classifier, cached.net.model.classifier
    assert not torch.equal(
        head.weight, build_model(cfg, datamodule, "x").net.model.classifier.weight
    )
    torch.testing.assert_close(cached_head.weight, head.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cached_head.bias, head.bias, rtol=1e-4, atol=1e-5)
    for name in ("train/loss_epoch", "val/loss", "val/acc"):
        assert cached_metrics[name] == pytest.approx(plain_metrics[name], rel=1e-4, abs=1e-5)


def test_pixel_keys_tell_images_apart_whatever_the_batch() -> None:
    images = torch.randn(3, 3, 8, 8)
    keys = pixel_keys(images)
    assert len(set(keys)) == 3 and all(len(k) == 16 for k in keys)
    assert pixel_keys(images[[2, 0]]) == [keys[2], keys[0]]
    shifted = images.clone()
    shifted[1, 0, 0, 0] += 1e-3  # one pixel differs: another image
    assert pixel_keys(shifted)[1] != keys[1]


def test_an_unfrozen_backbone_drops_its_cache_and_computes_its_features() -> None:
    net = EfficientNetLite0(num_classes=3, pretrained=False, freeze_backbone=True).train()
    assert enable_feature_cache(net)
    x = torch.randn(2, 3, 32, 32)
    net(x)
    assert len(net.feature_cache) == 2
    net.set_backbone_trainable(True)
    assert net.feature_cache is None
    net(x).sum().backward()
    assert net.model.conv_stem.weight.grad is not None  # the backbone learns again


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["experiment=image_folder_probe"], "computed once per input and reused"),
        (
            ["experiment=image_folder_probe", "augment=light"],
            "not cached: augmentation changes the training inputs",
        ),
        (["experiment=image_folder_pretrained"], "not cached: the encoder trains"),
    ],
    ids=["probe", "augmented", "fine-tune"],
)
def test_a_run_says_whether_it_caches_encoder_outputs_and_why(
    make_cfg, demo_images, caplog, overrides, says
):
    cfg = make_cfg("train", *overrides, f"data.path={demo_images}", *SMALL, "test=false")
    with caplog.at_level(logging.INFO, logger="cycleml"):
        metrics = train(cfg)
    assert "val/acc" in metrics
    assert says in caplog.text
    assert caplog.text.count("encoder outputs are not cached") <= 1
