"""``data=image_folder``: the <class>/ and the <split>/<class>/ layouts, detected and logged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cycleml.data.images import ImageFolderDataModule
from cycleml.errors import ConfigError, DataError


def photos(folder: Path, n: int, shade: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(shade)
    for i in range(n):
        pixels = np.clip(rng.normal(shade, 20, (10, 14, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"p{i}.png")


def split_folder(root: Path, splits: dict[str, int]) -> Path:
    for split, n in splits.items():
        photos(root / split / "cats", n, 60)
        photos(root / split / "dogs", n, 190)
    return root


def module(root: Path, **kwargs) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(path=str(root), image_size=8, **kwargs)
    dm.setup()
    return dm


def test_given_train_val_test_folders_are_the_split(tmp_path, caplog):
    root = split_folder(tmp_path / "photos", {"train": 6, "val": 3, "test": 2})
    with caplog.at_level("INFO", logger="cycleml.data.images"):
        dm = module(root)
    assert dm.class_names == ["cats", "dogs"]  # not ["test", "train", "val"]
    assert "layout <path>/<split>/<class>/" in caplog.text
    for split, n in {"train": 12, "val": 6, "test": 4}.items():
        ids = dm.split_ids(split)
        assert len(ids) == n and all(i.startswith(f"{split}/") for i in ids), ids
    images, labels = dm.split_arrays("val")
    assert images.shape == (6, 8, 8, 3)
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    labels_by_id = dict(zip(dm.split_ids("train"), dm.split_arrays("train")[1], strict=True))
    assert labels_by_id["train/dogs/p0.png"] == 1


def test_a_missing_test_folder_is_carved_from_train(tmp_path, caplog):
    root = split_folder(tmp_path / "photos", {"train": 10, "validation": 3})
    with caplog.at_level("INFO", logger="cycleml.data.images"):
        dm = module(root, test_fraction=0.2)
    assert "test carved from train" in caplog.text
    assert len(dm.split_ids("val")) == 6
    assert all(i.startswith("validation/") for i in dm.split_ids("val"))
    test, train = dm.split_ids("test"), dm.split_ids("train")
    assert len(test) == 4 and len(train) == 16
    assert all(i.startswith("train/") for i in test) and not set(test) & set(train)


def test_the_class_layout_is_still_split_by_the_seed(tmp_path, caplog):
    photos(tmp_path / "photos" / "cats", 10, 60)
    photos(tmp_path / "photos" / "dogs", 10, 190)
    with caplog.at_level("INFO", logger="cycleml.data.images"):
        dm = module(tmp_path / "photos", val_fraction=0.2, test_fraction=0.2)
    assert "layout <path>/<class>/" in caplog.text
    assert [len(dm.split_ids(s)) for s in ("train", "val", "test")] == [12, 4, 4]


def test_split_folders_mixed_with_class_folders_are_refused_unless_told(tmp_path):
    root = tmp_path / "photos"
    photos(root / "train", 4, 60)
    photos(root / "val", 4, 120)
    photos(root / "other", 4, 190)
    with pytest.raises(DataError, match=r"split folders \['train', 'val'\] next to \['other'\]"):
        module(root)
    dm = module(root, layout="class_folders", val_fraction=0.25, test_fraction=0.25)
    assert dm.class_names == ["other", "train", "val"]
    with pytest.raises(DataError, match=r"needs a train folder and only split folders"):
        module(root, layout="split_class_folders")
    with pytest.raises(ConfigError, match="data.layout must be one of"):
        ImageFolderDataModule(path=str(root), layout="flat")


def test_image_folder_with_a_given_split_trains(make_cfg, tmp_path):
    from cycleml.training.train import train

    root = split_folder(tmp_path / "photos", {"train": 8, "val": 3, "test": 3})
    cfg = make_cfg("train", "experiment=image_folder", f"data.path={root}", "data.image_size=8")
    metrics = train(cfg)
    assert {"val/acc", "test/acc"} <= set(metrics)


def test_the_image_size_is_chosen_from_the_images_when_not_given(tmp_path, caplog):
    for name, side in (("small", 40), ("large", 300)):
        folder = tmp_path / name / "a"
        folder.mkdir(parents=True)
        (tmp_path / name / "b").mkdir()
        for i, size in enumerate((side, side + 5, side * 2)):
            Image.new("RGB", (size + 7, size)).save(folder / f"{i}.png")
            Image.new("RGB", (size, size)).save(tmp_path / name / "b" / f"{i}.png")
    with caplog.at_level("INFO", logger="cycleml.data.images"):
        small = ImageFolderDataModule(path=str(tmp_path / "small"), image_size=None)
        small.setup()
    assert small.image_size == (32, 32)  # median shorter side 45 px, rounded down to 32
    assert small.images.shape[1:3] == (32, 32) and small.spec()["image_size"] == [32, 32]
    assert "image size: 32 px, from the images' median shorter side 45 px" in caplog.text
    large = ImageFolderDataModule(path=str(tmp_path / "large"), image_size=None)
    large.setup()
    assert large.image_size == (128, 128)  # 305 px, kept to the 128 px bound
    given = ImageFolderDataModule(path=str(tmp_path / "large"), image_size=24)
    given.setup()
    assert given.image_size == (24, 24)


def test_the_image_folder_config_leaves_the_size_to_the_images(make_cfg):
    assert make_cfg("train", "data=image_folder").data.image_size is None
    assert make_cfg("train", "experiment=image_folder").data.image_size is None
    with pytest.raises(ConfigError, match="data.image_size: null"):
        from cycleml.data.images import DigitsDataModule

        DigitsDataModule(image_size=None)
