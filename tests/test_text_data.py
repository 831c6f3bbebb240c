"""Text tables: every format, labels as names or ids, splits, bad rows, batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cycleml.data.text import TextTableDataModule
from cycleml.data.text_augment import NegationFlip, RandomSwap, TextAugment
from cycleml.errors import ConfigError, DataError

POSITIVE = ["great film", "I loved the food", "superb battery life", "a lovely hotel room"]
NEGATIVE = ["awful film", "I hated the food", "poor battery life", "a dirty hotel room"]


def rows(n: int = 80) -> list[dict]:
    out = []
    for i in range(n):
        positive = i % 2 == 0
        text = (POSITIVE if positive else NEGATIVE)[(i // 2) % 4] + f" number {i}"
        out.append({"id": f"x{i}", "text": text, "label": "pos" if positive else "neg"})
    return out


def write(records: list[dict], path: Path) -> Path:
    frame = pd.DataFrame.from_records(records)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        frame.to_parquet(path, index=False)
    return path


def module(path: Path, **kwargs) -> TextTableDataModule:
    kwargs.setdefault("tokenizer", {"vocab_size": 300, "min_frequency": 1})
    kwargs.setdefault("batch_size", 8)
    dm = TextTableDataModule(str(path), **kwargs)
    dm.setup()
    return dm


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_each_format_gives_the_same_data(tmp_path, suffix):
    reference = module(write(rows(), tmp_path / "ref.csv"))
    dm = module(write(rows(), tmp_path / f"reviews{suffix}"))
    assert dm.class_names == ["neg", "pos"]
    assert dm.fingerprint == reference.fingerprint
    for split in ("train", "val", "test"):
        assert dm.split_ids(split) == reference.split_ids(split)
        assert dm.split_texts(split) == reference.split_texts(split)
    ids, labels = next(iter(dm.train_dataloader()))
    assert ids.dtype == torch.int64 and labels.dtype == torch.int64
    assert ids.shape[0] == 8 and ids.shape[1] <= dm.max_length


def test_format_can_be_given_when_the_suffix_says_nothing(tmp_path):
    path = tmp_path / "reviews.txt"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    assert module(path, format="jsonl").num_classes == 2
    with pytest.raises(ConfigError, match="data.format"):
        module(path)


def test_splits_are_disjoint_stratified_and_reproducible(tmp_path):
    path = write(rows(200), tmp_path / "r.csv")
    dm = module(path)
    ids = {s: set(dm.split_ids(s)) for s in ("train", "val", "test")}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"]
    assert sum(len(v) for v in ids.values()) == 200
    assert len(ids["val"]) == len(ids["test"]) == 30
    assert (dm.split_labels("test") == 1).sum() == 15  # stratified
    assert module(path).split_ids("val") == dm.split_ids("val")
    assert module(path, split_seed=1).split_ids("val") != dm.split_ids("val")


def test_split_column_and_id_column(tmp_path):
    records = rows(30)
    for i, r in enumerate(records):
        r["part"] = ["train", "train", "validation", "test", "TRAIN", "dev"][i % 6]
    dm = module(write(records, tmp_path / "r.jsonl"), split_column="part", id_column="id")
    assert dm.split_ids("test") == [f"x{i}" for i in range(3, 30, 6)]
    assert len(dm.split_ids("val")) == 10 and len(dm.split_ids("train")) == 15


def test_labels_as_ids_and_class_names_in_given_order(tmp_path):
    records = [{**r, "label": 1 if r["label"] == "pos" else 0} for r in rows()]
    by_id = module(write(records, tmp_path / "ids.parquet"))
    assert by_id.class_names == ["0", "1"]
    named = module(write(records, tmp_path / "ids.csv"), class_names=["negative", "positive"])
    assert named.class_names == ["negative", "positive"]
    np.testing.assert_array_equal(named.split_labels("train"), by_id.split_labels("train"))
    # names in a given order: "pos" becomes class 0
    flipped = module(write(rows(), tmp_path / "names.csv"), class_names=["pos", "neg"])
    texts, labels = flipped.split_texts("train"), flipped.split_labels("train")
    assert all((lab == 0) == (t.split()[0] in {"great", "I", "superb", "a"} and
                              not any(w in t for w in ("awful", "hated", "poor", "dirty")))
               for t, lab in zip(texts, labels, strict=True))  # fmt: skip


def test_ids_with_a_gap_ask_for_class_names(tmp_path):
    records = [{**r, "label": 2 if r["label"] == "pos" else 1} for r in rows()]
    with pytest.raises(DataError, match=r"label ids must be 0..K-1.*found \[1, 2\]"):
        module(write(records, tmp_path / "r.csv"))


def test_missing_column_names_file_and_existing_columns(tmp_path):
    path = write(rows(), tmp_path / "r.csv")
    with pytest.raises(DataError, match=r"r\.csv: column 'review' not found; .*'text'"):
        module(path, text_column="review")
    with pytest.raises(DataError, match="column 'stage' not found"):
        module(path, split_column="stage")


@pytest.mark.parametrize("content", ["", "text,label\n"])
def test_empty_file_and_header_only(tmp_path, content):
    path = tmp_path / "empty.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=r"empty\.csv: the file (is empty|has no data rows)"):
        module(path)


def test_empty_jsonl_and_missing_file(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="has no data rows"):
        module(path)
    with pytest.raises(DataError, match="text table not found"):
        module(tmp_path / "nope.csv")


def test_bad_rows_are_reported_with_file_row_and_column(tmp_path):
    records = rows(40)
    records[2]["text"] = "   "
    records[5]["label"] = ""
    records[7]["label"] = "neutral"
    records[9]["text"] = None
    path = write(records, tmp_path / "r.csv")
    with pytest.raises(DataError) as err:
        module(path, class_names=["neg", "pos"])
    message = str(err.value)
    assert "4 bad row(s)" in message
    assert f"{path}: row 3, column 'text': empty text" in message
    assert f"{path}: row 6, column 'label': missing label" in message
    assert f"{path}: row 8, column 'label': unknown label 'neutral'" in message
    assert f"{path}: row 10, column 'text': empty text" in message  # a CSV cell has no null
    assert "data.bad_rows=skip" in message


def test_bad_jsonl_rows_and_unknown_split(tmp_path):
    records = rows(30)
    for i, r in enumerate(records):
        r["split"] = ["train", "val", "test"][i % 3]
    records[4]["split"] = "holdout"
    del records[6]["label"]
    path = write(records, tmp_path / "r.jsonl")
    with pytest.raises(DataError) as err:
        module(path, split_column="split")
    assert "row 5, column 'split': unknown split 'holdout'" in str(err.value)
    assert "row 7, column 'label': missing label" in str(err.value)
    path.write_text(path.read_text() + "{broken\n")
    with pytest.raises(DataError, match=r"r\.jsonl: row 31 \(line 31\): not valid JSON"):
        module(path, split_column="split")


def test_skip_leaves_bad_rows_out_counts_and_lists_them(tmp_path, caplog):
    records = rows(40)
    records[0]["text"] = ""
    records[11]["label"] = None
    path = write(records, tmp_path / "r.parquet")
    with caplog.at_level("WARNING"):
        dm = module(path, bad_rows="skip")
    assert [(b.row, b.column, b.problem) for b in dm.bad_rows] == [
        (1, "text", "empty text"),
        (12, "label", "missing label"),
    ]
    assert "leaving out 2 bad row(s)" in caplog.text and "row 12, column 'label'" in caplog.text
    kept = {i for s in ("train", "val", "test") for i in dm.split_ids(s)}
    assert len(kept) == 38 and "1" not in kept and "12" not in kept


def test_duplicate_ids_are_bad_rows(tmp_path):
    records = rows(20)
    records[3]["id"] = "x0"
    with pytest.raises(DataError, match="row 4, column 'id': duplicate id 'x0'"):
        module(write(records, tmp_path / "r.csv"), id_column="id")


def test_truncation_off_reports_long_texts(tmp_path):
    records = rows(40)
    records[5]["text"] = " ".join(["great"] * 50)
    path = write(records, tmp_path / "r.csv")
    assert module(path, max_length=16).split_texts("train")  # cut, no error
    with pytest.raises(
        DataError, match=r"row 6, column 'text': 50 tokens, more than data.max_length=16"
    ):
        module(path, max_length=16, truncation=False)


def test_padding_modes(tmp_path):
    path = write(rows(), tmp_path / "r.csv")
    fixed = module(path, max_length=24, padding="max_length")
    ids, _ = next(iter(fixed.val_dataloader()))
    assert ids.shape[1] == 24
    longest = module(path, max_length=24)
    ids, _ = next(iter(longest.val_dataloader()))
    assert ids.shape[1] < 24 and (ids[:, -1] != longest.tokenizer.pad_id).any()


def test_spec_and_net_kwargs(tmp_path):
    dm = module(write(rows(), tmp_path / "r.csv"), max_length=32)
    spec = dm.spec()
    assert spec["kind"] == "text" and spec["max_length"] == 32 and spec["pad_id"] == 0
    assert spec["fingerprint"] == dm.fingerprint and len(dm.fingerprint) == 16
    assert json.loads(spec["tokenizer_json"])["truncation"]["max_length"] == 32
    assert dm.net_kwargs() == {
        "vocab_size": dm.tokenizer.vocab_size, "num_classes": 2, "pad_id": 0, "max_length": 32,
    }  # fmt: skip


def test_a_given_tokenizer_is_used_as_is(tmp_path):
    first = module(write(rows(), tmp_path / "a.csv"))
    other = module(write(rows(60)[::-1], tmp_path / "b.csv"),
                   tokenizer_json=first.spec()["tokenizer_json"])  # fmt: skip
    assert other.spec()["tokenizer_json"] == first.spec()["tokenizer_json"]
    saved = first.tokenizer.save(tmp_path / "tok" / "tokenizer.json")
    from_file = module(write(rows(), tmp_path / "c.csv"), tokenizer={"path": str(saved.parent)})
    np.testing.assert_array_equal(
        from_file.tokenizer.encode(["great film"]), first.tokenizer.encode(["great film"])
    )


def test_fingerprint_follows_content_not_order(tmp_path):
    base = module(write(rows(), tmp_path / "a.csv")).fingerprint
    assert module(write(rows()[::-1], tmp_path / "b.csv")).fingerprint != "" and base
    relabelled = rows()
    relabelled[0]["label"] = "neg"
    assert module(write(relabelled, tmp_path / "c.csv")).fingerprint != base


def test_augmentation_only_on_train_and_reproducible(tmp_path):
    path = write(rows(), tmp_path / "r.csv")
    augment = TextAugment([RandomSwap(p=1.0, n_swaps=3)])

    def first_batches(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        dm = module(path, train_transform=augment, augment_seed=seed)
        torch.manual_seed(0)
        train_ids, _ = next(iter(dm.train_dataloader()))
        val_ids, _ = next(iter(dm.val_dataloader()))
        return train_ids, val_ids

    plain = module(path)
    plain_val, _ = next(iter(plain.val_dataloader()))
    train_a, val_a = first_batches(3)
    train_b, _ = first_batches(3)
    train_c, _ = first_batches(4)
    torch.manual_seed(0)
    plain_train, _ = next(iter(plain.train_dataloader()))
    assert torch.equal(val_a, plain_val)  # val untouched
    assert torch.equal(train_a, train_b)  # same seed, same draws
    assert not torch.equal(train_a, train_c)
    assert not torch.equal(train_a, plain_train)


def test_augmenter_checked_against_the_data(tmp_path):
    three = [{**r, "label": ["a", "b", "c"][i % 3]} for i, r in enumerate(rows(60))]
    only_flip = module(
        write(three, tmp_path / "r.csv"), train_transform=TextAugment([NegationFlip()])
    )
    assert only_flip.augment is None  # the label flip skipped, nothing else to apply
    import albumentations as A

    with pytest.raises(ConfigError, match="not a text augmentation"):
        TextTableDataModule(
            str(tmp_path / "r.csv"), train_transform=A.Compose([A.HorizontalFlip()])
        )
    empty = TextTableDataModule(str(tmp_path / "r.csv"), train_transform=A.Compose([]))
    assert empty.augment is None  # augment=none means no augmentation
