"""Text tables as a LightningDataModule for text classification.

Rows are read and checked by :mod:`cycleml.data.text_table`: bad rows stop the run
(``bad_rows: error``) or are left out and listed (``bad_rows: skip``). The tokenizer is
trained on the training split; batches are int64 token ids ``(N, L)`` and int64 labels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cycleml.data.augment_choice import AutoAugment
from cycleml.data.splits import SPLITS, split_indices
from cycleml.data.text_augment import TextAugment
from cycleml.data.text_table import BadRow, TextRows, parse_rows, report_bad_rows
from cycleml.data.tokenizer import TextTokenizer, TokenizerSettings
from cycleml.data.versioning import content_hash, dataset_fingerprint
from cycleml.errors import ConfigError, DataError

log = logging.getLogger(__name__)


class _TextSplit(Dataset):
    """``(text, label)`` examples of one split; training examples pass through the augmenter."""

    def __init__(
        self,
        texts: list[str],
        labels: np.ndarray,
        augment: TextAugment | None = None,
        seed: int = 0,
    ) -> None:
        self.texts = texts
        self.labels = labels
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.visits = np.zeros(len(texts), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> tuple[str, int]:
        text, label = self.texts[index], int(self.labels[index])
        if self.augment is None:
            return text, label
        # The epoch reaches fresh loader workers; the visit count also advances inside
        # persistent ones. Either way: new draws each epoch, the same draws each run.
        key = (self.seed, self.epoch, index, int(self.visits[index]))
        self.visits[index] += 1
        return self.augment(text, label, key)


class _EpochSeeder(L.Callback):
    """Tells the training texts which epoch it is, so augmentations differ per epoch."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dataset = getattr(trainer.datamodule, "_train_set", None)
        if isinstance(dataset, _TextSplit):
            dataset.epoch = trainer.current_epoch


class _TokenizeBatch:
    """Collate ``(text, label)`` pairs into int64 ``(N, L)`` ids and int64 labels."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, batch: list[tuple[str, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        texts, labels = zip(*batch, strict=True)
        ids = torch.from_numpy(self.tokenizer.encode(texts))
        return ids, torch.tensor(labels, dtype=torch.int64)


class TextTableDataModule(L.LightningDataModule):
    """Text classification from one CSV/TSV, JSONL or Parquet file (see ``configs/data/text.yaml``)."""

    def __init__(
        self,
        path: str,
        text_column: str = "text",
        label_column: str = "label",
        split_column: str | None = None,
        id_column: str | None = None,
        format: str | None = None,
        class_names: Sequence[str] | None = None,
        bad_rows: str = "error",
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        tokenizer: Mapping[str, Any] | None = None,
        tokenizer_json: str | None = None,
        max_length: int = 64,
        padding: str = "longest",
        truncation: bool = True,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        train_transform: Callable | None = None,
        augment_seed: int = 0,
    ) -> None:
        super().__init__()
        if bad_rows not in ("error", "skip"):
            raise ConfigError(f"data.bad_rows={bad_rows!r}: expected 'error' or 'skip'")
        self.path = Path(path)
        self.columns = dict(text=text_column, label=label_column, split=split_column, id=id_column)
        self.format = format
        self.given_class_names = list(class_names) if class_names else None
        self.bad_rows_policy = bad_rows
        self.val_fraction, self.test_fraction, self.split_seed = (
            val_fraction, test_fraction, split_seed)  # fmt: skip
        self.tokenizer_settings = TokenizerSettings.from_mapping(tokenizer)
        self.tokenizer_json = tokenizer_json
        self.max_length, self.padding, self.truncation = max_length, padding, truncation
        self.batch_size, self.eval_batch_size, self.num_workers = (
            batch_size, eval_batch_size, num_workers)  # fmt: skip
        self.augment = _text_augment(train_transform)
        self.augment_seed = augment_seed
        self._train_set: _TextSplit | None = None
        self.bad_rows: list[BadRow] = []
        self._splits: dict[str, dict[str, Any]] = {}

    # -- setup -----------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        if not self.path.is_file():
            raise DataError(
                f"text table not found: {self.path} (set data.path; demo data: "
                f"python scripts/make_demo_text.py)"
            )
        c = self.columns
        parsed = parse_rows(self.path, c["text"], c["label"], c["split"], c["id"],
                            self.given_class_names, self.format)  # fmt: skip
        report_bad_rows(parsed.bad_rows, self.bad_rows_policy, str(self.path))
        self.bad_rows = list(parsed.bad_rows)
        self.class_names = parsed.class_names
        splits = parsed.splits or self._random_splits(parsed.labels)
        train_texts = [t for t, s in zip(parsed.texts, splits, strict=True) if s == "train"]
        self.tokenizer = self._make_tokenizer(train_texts)
        keep = self._check_lengths(parsed)
        for split in SPLITS:
            members = [i for i, s in enumerate(splits) if s == split and keep[i]]
            if not members:
                raise DataError(f"{self.path}: the {split} split is empty; add rows or "
                                f"change data.val_fraction / data.test_fraction")  # fmt: skip
            self._splits[split] = {
                "ids": [parsed.ids[i] for i in members],
                "texts": [parsed.texts[i] for i in members],
                "labels": np.asarray([parsed.labels[i] for i in members], dtype=np.int64),
            }
        if self.augment is not None:
            self.augment.fit_classes(self.class_names)
            if not self.augment.ops:
                self.augment = None
        self.fingerprint = dataset_fingerprint(
            (content_hash(t), self.class_names[y], s)
            for s in SPLITS
            for t, y in zip(self._splits[s]["texts"], self._splits[s]["labels"], strict=True)
        )
        log.info(
            "text data %s: %d classes %s, train/val/test = %s, vocabulary %d, fingerprint %s",
            self.path, self.num_classes, self.class_names,
            "/".join(str(len(self._splits[s]["ids"])) for s in SPLITS),
            self.tokenizer.vocab_size, self.fingerprint,
        )  # fmt: skip

    def _random_splits(self, labels: list[int]) -> list[str]:
        """A split name per row: stratified by label, reproducible from ``split_seed``."""
        split_of = [""] * len(labels)
        parts = split_indices(np.asarray(labels), self.val_fraction, self.test_fraction,
                              seed=self.split_seed)  # fmt: skip
        for name, indices in parts.items():
            for i in indices:
                split_of[i] = name
        return split_of

    def _make_tokenizer(self, train_texts: list[str]) -> TextTokenizer:
        if self.tokenizer_json:
            return TextTokenizer.from_json(self.tokenizer_json, self.max_length, self.padding)
        if self.tokenizer_settings.path:
            return TextTokenizer.load(self.tokenizer_settings.path, self.max_length, self.padding)
        return TextTokenizer.train(
            train_texts, self.tokenizer_settings, self.max_length, self.padding
        )

    def _check_lengths(self, parsed: TextRows) -> list[bool]:
        """With truncation off, a text longer than ``max_length`` tokens is a bad row."""
        if self.truncation:
            return [True] * len(parsed.texts)
        counts = self.tokenizer.token_counts(parsed.texts)
        too_long = [
            BadRow(str(self.path), row, self.columns["text"],
                   f"{n} tokens, more than data.max_length={self.max_length} "
                   f"(raise it, or set data.truncation=true)")
            for row, n in zip(parsed.rows, counts, strict=True) if n > self.max_length
        ]  # fmt: skip
        report_bad_rows(too_long, self.bad_rows_policy, str(self.path))
        self.bad_rows = sorted(self.bad_rows + too_long, key=lambda b: b.row)
        return [n <= self.max_length for n in counts]

    # -- what the rest of cycleml reads ----------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def spec(self) -> dict[str, Any]:
        """The ``data_spec`` of the checkpoint (without ``data_config``)."""
        return {
            "kind": "text",
            "tokenizer_json": self.tokenizer.to_json(),
            "max_length": self.max_length,
            "pad_id": self.tokenizer.pad_id,
            "class_names": list(self.class_names),
            "fingerprint": self.fingerprint,
        }

    def net_kwargs(self) -> dict[str, int]:
        """Constructor arguments every text network takes from the data."""
        return {
            "vocab_size": self.tokenizer.vocab_size,
            "num_classes": self.num_classes,
            "pad_id": self.tokenizer.pad_id,
            "max_length": self.max_length,
        }

    def split_ids(self, split: str) -> list[str]:
        """Row ids of a split (the id column, else the row number), in dataloader order."""
        return list(self._split(split)["ids"])

    def split_texts(self, split: str) -> list[str]:
        """Texts of a split, in dataloader order (val and test are not shuffled)."""
        return list(self._split(split)["texts"])

    def split_labels(self, split: str) -> np.ndarray:
        """Class ids (int64) of a split, in dataloader order."""
        return self._split(split)["labels"].copy()

    def _split(self, split: str) -> dict[str, Any]:
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; expected one of {SPLITS}")
        if not self._splits:
            self.setup()
        return self._splits[split]

    # -- dataloaders -----------------------------------------------------------------
    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        part = self._split(split)
        augment = self.augment if split == "train" else None
        dataset = _TextSplit(part["texts"], part["labels"], augment, self.augment_seed)
        if split == "train":
            self._train_set = dataset
        return DataLoader(
            dataset,
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=_TokenizeBatch(self.tokenizer),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def callbacks(self) -> list[L.Callback]:
        return [_EpochSeeder()] if self.augment is not None else []


def _text_augment(transform: Callable | None) -> TextAugment | None:
    """The training augmenter; an empty image pipeline (``augment=none``) or
    ``augment=auto`` means none."""
    if transform is None or isinstance(transform, TextAugment):
        return transform
    if isinstance(transform, AutoAugment):
        log.info("augmentation: none for text (augment=auto); augment=text_light sets one")
        return None
    if getattr(transform, "transforms", None) is not None and len(transform.transforms) == 0:
        return None
    raise ConfigError(
        f"augment: {type(transform).__name__} is not a text augmentation; use "
        f"augment=text_light, augment=text_sentiment or augment=null with text data"
    )
