"""`data=gathered`: training reads a dataset directory and records its fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cycleml.data.gather import gather
from cycleml.data.gathered import (
    GatheredImageDataModule,
    GatheredTextDataModule,
    gathered_data_module,
)
from cycleml.data.manifest import read_dataset
from cycleml.errors import DataError


def _image_folder(root: Path) -> Path:
    """``<root>/<split>/<class>/<n>.png``: 3 classes, every split filled."""
    rng = np.random.default_rng(0)
    for split, count in [("train", 6), ("val", 2), ("test", 2)]:
        for label in ("red", "green", "blue"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_image_module_keeps_manifest_splits_and_fingerprint(tmp_path: Path) -> None:
    sources = {"shots": {"kind": "image_folder", "path": str(_image_folder(tmp_path / "raw")),
                         "layout": "split_class_folders"}}  # fmt: skip
    gather(sources, tmp_path / "ds", progress=False)
    manifest = read_dataset(tmp_path / "ds").manifest
    module = GatheredImageDataModule(str(tmp_path / "ds"), image_size=8, channels=3)
    module.setup()

    assert module.fingerprint == read_dataset(tmp_path / "ds").fingerprint
    assert module.spec()["fingerprint"] == module.fingerprint
    assert module.class_names == ["blue", "green", "red"]
    for split in ("train", "val", "test"):
        expected = manifest.loc[manifest["split"] == split, "item_id"]
        assert sorted(module.split_ids(split)) == sorted(expected)
    images, labels = module.split_arrays("val")
    assert images.shape == (6, 8, 8, 3) and images.dtype == np.uint8
    first = manifest.set_index("item_id").loc[module.split_ids("val")[0]]
    assert module.class_names[labels[0]] == first["label"]
    batch, targets = next(iter(module.val_dataloader()))
    assert tuple(batch.shape) == (6, 3, 8, 8) and targets.dtype.is_floating_point is False


def test_items_without_a_split_are_split_by_seed(tmp_path: Path) -> None:
    gather({"digits": {"kind": "digits", "limit": 100}, "extra": {"kind": "digits", "limit": 10,
            "split": "test"}}, tmp_path / "ds", workers=1, progress=False)  # fmt: skip
    module = GatheredImageDataModule(
        str(tmp_path / "ds"), image_size=8, channels=1, mean=[0.5], std=[0.5],
        val_fraction=0.2, test_fraction=0.2, split_seed=3,
    )  # fmt: skip
    module.setup()
    test_ids = module.split_ids("test")
    assert {f"extra:{i:04d}" for i in range(10)} <= set(test_ids)
    assert len(module.split_ids("val")) == 20 and len(test_ids) == 30
    again = GatheredImageDataModule(
        str(tmp_path / "ds"), image_size=8, channels=1, mean=[0.5], std=[0.5],
        val_fraction=0.2, test_fraction=0.2, split_seed=3,
    )  # fmt: skip
    again.setup()
    assert again.split_ids("val") == module.split_ids("val")


def test_text_module_reads_the_manifest(tmp_path: Path) -> None:
    rows = [
        (f"item {i} {'good' if i % 2 else 'poor'} value {i * 7}", ("neg", "pos")[i % 2])
        for i in range(40)
    ]
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(tmp_path / "t.csv", index=False)
    gather({"t": {"kind": "table", "path": str(tmp_path / "t.csv"), "text_column": "text"}},
           tmp_path / "ds", progress=False)  # fmt: skip
    module = gathered_data_module(
        str(tmp_path / "ds"), text={"max_length": 16, "tokenizer": {"vocab_size": 200, "min_frequency": 1}},
        image_size=99, val_fraction=0.25, test_fraction=0.25,
    )  # fmt: skip
    assert isinstance(module, GatheredTextDataModule)
    module.setup()
    assert module.fingerprint == read_dataset(tmp_path / "ds").fingerprint
    assert module.class_names == ["neg", "pos"]
    assert sorted(sum((module.split_ids(s) for s in ("train", "val", "test")), [])) == sorted(
        f"t:{i}" for i in range(1, 41)
    )
    ids, labels = next(iter(module.train_dataloader()))
    assert ids.dtype.is_floating_point is False and ids.shape[1] <= 16


def test_unlabelled_or_broken_items_ask_for_cleaning(tmp_path: Path) -> None:
    pd.DataFrame({"text": ["a b", "c d"], "label": ["x", None]}).to_csv(
        tmp_path / "t.csv", index=False
    )
    gather({"t": {"kind": "table", "path": str(tmp_path / "t.csv"), "text_column": "text"}},
           tmp_path / "ds", progress=False)  # fmt: skip
    with pytest.raises(
        DataError, match=r"1 item\(s\) have no label \(first: t:2\); run `cycleml data clean`"
    ):
        gathered_data_module(str(tmp_path / "ds"))
    folder = _image_folder(tmp_path / "raw")
    (folder / "train" / "red" / "0.png").write_bytes(b"\x89PNG broken")
    gather({"s": {"kind": "image_folder", "path": str(folder), "layout": "split_class_folders"}},
           tmp_path / "img", progress=False)  # fmt: skip
    module = gathered_data_module(str(tmp_path / "img"), image_size=8, channels=3)
    with pytest.raises(DataError, match=r"1 unreadable image\(s\) \(first: s:train/red/0.png"):
        module.setup()


def test_training_on_a_gathered_dataset_records_its_fingerprint(make_cfg, tmp_path: Path) -> None:
    from cycleml.training.train import train

    result = gather(
        {"digits": {"kind": "digits", "limit": 200}}, tmp_path / "ds", workers=1, progress=False
    )
    cfg = make_cfg(
        "train", "data=gathered", f"data.path={tmp_path / 'ds'}", "data.channels=1",
        "data.image_size=8", "data.mean=[0.5]", "data.std=[0.5]", "debug=fdr",
        fast=False,
    )  # fmt: skip
    metrics = train(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dataset_fingerprint"] == result.fingerprint


def test_training_a_text_model_on_a_gathered_dataset(make_cfg, tmp_path: Path) -> None:
    from cycleml.training.train import build_datamodule, train

    words = ["great", "awful", "fine", "broken", "lovely", "slow"]
    rows = [
        (f"the {words[i % 6]} thing number {i}", "pos" if i % 6 in (0, 2, 4) else "neg")
        for i in range(60)
    ]
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(tmp_path / "t.csv", index=False)
    result = gather({"t": {"kind": "table", "path": str(tmp_path / "t.csv"), "text_column": "text"}},
                    tmp_path / "ds", progress=False)  # fmt: skip
    cfg = make_cfg("train", "data=gathered", f"data.path={tmp_path / 'ds'}", "augment=none",
                   "model=textcnn", "debug=fdr", fast=False)  # fmt: skip
    # the shipped tokenizer settings give the same ids every time the data is read
    tokenizers = {build_datamodule(cfg).spec()["tokenizer_json"] for _ in range(2)}
    assert len(tokenizers) == 1
    assert 0.0 <= train(cfg)["test/acc"] <= 1.0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dataset_fingerprint"] == result.fingerprint


def test_image_options_share_one_spelling_and_the_former_one_still_applies(
    make_cfg, tmp_path: Path, caplog
) -> None:
    from cycleml.training.train import build_datamodule

    gather({"digits": {"kind": "digits", "limit": 60}}, tmp_path / "ds", workers=1, progress=False)
    overrides = ("data=gathered", f"data.path={tmp_path / 'ds'}", "data.channels=1")
    module = build_datamodule(
        make_cfg("train", *overrides, "data.image_size=8", "data.mean=[0.5]", "data.std=[0.5]")
    )
    assert module.image_size == (8, 8) and module.channels == 1
    with caplog.at_level("WARNING", logger="cycleml.data.gathered"):
        module = build_datamodule(
            make_cfg(
                "train", *overrides, "data.image.image_size=12", "data.mean=[0.5]", "data.std=[0.5]"
            )
        )
    assert module.image_size == (12, 12)
    assert "data.image.image_size is deprecated: use data.image_size" in caplog.text
