"""``augment=auto``: the training augmentation is chosen from the images and logged."""

from __future__ import annotations

import logging
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
from PIL import Image

from cycleml.data.augment_choice import AutoAugment, choose_augmentation, is_grey
from cycleml.training.train import build_datamodule


def image_folder(root: Path, side: int, grey: bool, per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (side, side, 1 if grey else 3), dtype=np.uint8)
            Image.fromarray(pixels.squeeze(-1) if grey else pixels).save(root / name / f"{i}.png")
    return root


def kinds(pipeline: A.Compose) -> list[str]:
    return [type(t).__name__ for t in pipeline.transforms]


@pytest.mark.parametrize(
    "side, grey, chosen, transforms",
    [
        (16, True, "digits", ["Affine"]),
        (48, False, "light", ["HorizontalFlip", "Affine"]),
        (24, False, "light", ["HorizontalFlip", "Affine"]),  # small, but colour: not a digit
        (96, False, "photo", ["RandomResizedCrop", "HorizontalFlip", "ColorJitter"]),
        (96, True, "photo", ["RandomResizedCrop", "HorizontalFlip", "RandomBrightnessContrast"]),
    ],
)
def test_an_image_folder_gets_the_augmentation_its_images_call_for(
    make_cfg, tmp_path, caplog, side, grey, chosen, transforms
):
    folder = image_folder(tmp_path / "images", side, grey)
    cfg = make_cfg("train", "data=image_folder", f"data.path={folder}")
    assert cfg.augment._target_.endswith("AutoAugment")  # the default
    with caplog.at_level(logging.INFO, logger="cycleml"):
        datamodule = build_datamodule(cfg)
    assert datamodule.image_size == (max(32, side // 16 * 16),) * 2
    assert kinds(datamodule.train_transform) == transforms
    size = datamodule.image_size
    assert f"augmentation: {chosen} (" in caplog.text
    assert f"{'grey' if grey else 'colour'} images at {size[0]}x{size[1]} px" in caplog.text
    batch, _ = datamodule.train_dataloader().dataset.__getitems__([0, 1])
    assert tuple(batch.shape[2:]) == size  # a crop is resized back to the data's size


def test_the_bundled_digits_keep_their_digit_augmentation_by_default(make_cfg, caplog):
    with caplog.at_level(logging.INFO, logger="cycleml"):
        datamodule = build_datamodule(make_cfg("train"))
    (affine,) = datamodule.train_transform.transforms
    assert isinstance(affine, A.Affine) and affine.p == 0.8
    assert "augmentation: digits (" in caplog.text and "grey images at 16x16 px" in caplog.text


def test_an_explicit_augmentation_always_wins(make_cfg, tmp_path, caplog):
    folder = image_folder(tmp_path / "images", 96, grey=False)
    for name, expected in (("light", ["HorizontalFlip", "Affine"]), ("digits", ["Affine"])):
        cfg = make_cfg("train", "data=image_folder", f"data.path={folder}", f"augment={name}")
        with caplog.at_level(logging.INFO, logger="cycleml"):
            datamodule = build_datamodule(cfg)
        assert kinds(datamodule.train_transform) == expected
    assert "augmentation:" not in caplog.text
    none = build_datamodule(
        make_cfg("train", "data=image_folder", f"data.path={folder}", "augment=none")
    )
    assert none.train_transform is None


def test_grey_photos_stored_as_rgb_count_as_grey() -> None:
    grey = np.repeat(np.arange(48, dtype=np.uint8).reshape(3, 4, 4, 1), 3, axis=-1)
    assert is_grey(grey) and is_grey(grey[..., :1])
    colour = grey.copy()
    colour[1, 0, 0, 2] += 1
    assert not is_grey(colour)


@pytest.mark.parametrize("side", [64, 256])
def test_the_photo_augmentation_is_relative_to_the_image_size(side: int) -> None:
    """A crop keeps the same share of the image at any size, then returns to the size."""
    images = np.zeros((2, side, side, 3), dtype=np.uint8)
    images[1, ..., 0] = 255  # colour
    name, pipeline, _ = choose_augmentation(images, (side, side))
    crop = pipeline.transforms[0]
    assert name == "photo" and crop.size == (side, side)
    assert crop.scale == ((0.7, 1.0) if side < 128 else (0.5, 1.0))
    pipeline.set_random_seed(0)
    # a square in the middle covering a quarter of the image stays about a quarter
    image = np.zeros((side, side, 3), dtype=np.uint8)
    image[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 255
    shares = [(pipeline(image=image)["image"][..., 0] > 127).mean() for _ in range(20)]
    assert 0.2 < np.mean(shares) < 0.6


def test_text_data_gets_no_augmentation_from_auto(make_cfg, tmp_path, caplog):
    table = tmp_path / "t.csv"
    rows = [f"{w} text {i},{w}" for i in range(20) for w in ("good", "bad")]
    table.write_text("text,label\n" + "\n".join(rows) + "\n")
    cfg = make_cfg("train", "data=text", f"data.path={table}")
    with caplog.at_level(logging.INFO, logger="cycleml"):
        datamodule = build_datamodule(cfg)
    assert datamodule.augment is None
    assert "augmentation: none for text (augment=auto)" in caplog.text
    assert repr(AutoAugment()) == "AutoAugment()"
