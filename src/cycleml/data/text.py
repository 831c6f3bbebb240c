"""Text tables (CSV, JSONL, Parquet) as a LightningDataModule for text classification.

One row is one example: a text column, a label column (class names or class ids) and
optionally a split column (train/val/test) and an id column. Every problem with a row
(empty text, missing label, unknown label or split, a text longer than ``max_length``
when truncation is off) is reported with the file, the row and the column; such rows
stop the run (``bad_rows: error``) or are left out and listed (``bad_rows: skip``).
Rows are numbered from 1 in file order (the CSV header is not a row).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cycleml.data.splits import SPLITS, split_indices
from cycleml.data.text_augment import TextAugment
from cycleml.data.tokenizer import TextTokenizer, TokenizerSettings
from cycleml.data.versioning import content_hash, dataset_fingerprint
from cycleml.errors import ConfigError, DataError

log = logging.getLogger(__name__)

_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val",
                  "dev": "val", "test": "test"}  # fmt: skip
_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
            ".parquet": "parquet", ".pq": "parquet"}  # fmt: skip
# how many bad rows an error message or a warning lists before "... and N more"
_LISTED = 20


@dataclass(frozen=True)
class BadRow:
    """A row that cannot be used, and why."""

    file: str
    row: int
    column: str
    problem: str

    def __str__(self) -> str:
        return f"{self.file}: row {self.row}, column '{self.column}': {self.problem}"


@dataclass
class TextRows:
    """The usable rows of a table, in file order, and the rows that were not usable."""

    rows: list[int]
    ids: list[str]
    texts: list[str]
    labels: list[int]
    splits: list[str] | None
    class_names: list[str]
    bad_rows: list[BadRow]


def read_columns(path: Path, columns: Sequence[str], fmt: str | None = None) -> dict[str, list]:
    """The named columns of a CSV/TSV, JSONL or Parquet file, as Python lists.

    Missing values are ``None`` (a CSV has none: its empty cells are ``""``). A missing file, an empty file or a missing column is a
    :class:`DataError` naming the file (and the column, and the columns that exist).
    """
    if not path.is_file():
        raise DataError(
            f"text table not found: {path} (set data.path; demo data: "
            f"python scripts/make_demo_text.py)"
        )
    fmt = fmt or _FORMATS.get(path.suffix.lower())
    if fmt not in set(_FORMATS.values()):
        raise ConfigError(
            f"{path}: unknown table format {fmt or path.suffix!r}; set data.format to one of "
            f"{sorted(set(_FORMATS.values()))}"
        )
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if fmt in ("csv", "tsv"):
        table = _read_delimited(path, "\t" if fmt == "tsv" else ",")
    elif fmt == "jsonl":
        table = _read_jsonl(path)
    else:
        table = _read_parquet(path)
    if not table or not next(iter(table.values()), []):
        raise DataError(f"{path}: the file has no data rows")
    for column in columns:
        if column not in table:
            raise DataError(
                f"{path}: column '{column}' not found; the file has columns {sorted(table)}"
            )
    return {column: table[column] for column in columns}


def _read_delimited(path: Path, sep: str) -> dict[str, list]:
    import pandas as pd

    try:
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[])
    except pd.errors.EmptyDataError as err:
        raise DataError(f"{path}: the file is empty") from err
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable {sep!r}-separated table: {err}") from err
    return {str(c): frame[c].tolist() for c in frame.columns}


def _read_jsonl(path: Path) -> dict[str, list]:
    records: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: row {number}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise DataError(f"{path}: row {number}: expected a JSON object per line")
            records.append(record)
    keys: dict[str, None] = {}
    for record in records:
        keys.update(dict.fromkeys(record))
    return {key: [r.get(key) for r in records] for key in keys}


def _read_parquet(path: Path) -> dict[str, list]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several unrelated types for bad files
        raise DataError(f"{path}: not a readable Parquet file: {err}") from err
    return {name: table.column(name).to_pylist() for name in table.column_names}


def parse_rows(
    path: Path,
    text_column: str,
    label_column: str,
    split_column: str | None = None,
    id_column: str | None = None,
    class_names: Sequence[str] | None = None,
    fmt: str | None = None,
) -> TextRows:
    """Read a text table and check every row; bad rows are returned, not dropped."""
    wanted = [c for c in (text_column, label_column, split_column, id_column) if c]
    table = read_columns(path, wanted, fmt)
    name = str(path)
    count = len(table[text_column])
    bad: list[BadRow] = []
    good: list[int] = []
    for i, text in enumerate(table[text_column]):
        row = i + 1
        problems = len(bad)
        if text is None or (isinstance(text, float) and math.isnan(text)):
            bad.append(BadRow(name, row, text_column, "missing text"))
        elif not str(text).strip():
            bad.append(BadRow(name, row, text_column, "empty text"))
        if _is_missing(table[label_column][i]):
            bad.append(BadRow(name, row, label_column, "missing label"))
        if split_column and _split_of(table[split_column][i]) is None:
            value = table[split_column][i]
            bad.append(BadRow(name, row, split_column,
                              f"unknown split {value!r}; expected train, val or test"))  # fmt: skip
        if len(bad) == problems:
            good.append(i)
    ids = [str(v) if not _is_missing(v) else None for v in table[id_column]] if id_column else None
    if ids is not None:
        seen: set[str] = set()
        for i in list(good):
            if ids[i] is None or ids[i] in seen:
                problem = "missing id" if ids[i] is None else f"duplicate id {ids[i]!r}"
                bad.append(BadRow(name, i + 1, id_column or "", problem))
                good.remove(i)
            else:
                seen.add(ids[i])
    raw_labels = [table[label_column][i] for i in good]
    names, label_of = _label_mapping(raw_labels, class_names, name)
    labels: list[int] = []
    kept: list[int] = []
    for i, raw in zip(good, raw_labels, strict=True):
        label = label_of(raw)
        if label is None:
            bad.append(BadRow(name, i + 1, label_column,
                              f"unknown label {raw!r}; expected one of {names}"))  # fmt: skip
        else:
            kept.append(i)
            labels.append(label)
    bad.sort(key=lambda b: b.row)
    log.info("%s: %d rows, %d usable, %d bad", name, count, len(kept), len({b.row for b in bad}))
    return TextRows(
        rows=[i + 1 for i in kept],
        ids=[ids[i] for i in kept] if ids is not None else [str(i + 1) for i in kept],
        texts=[str(table[text_column][i]) for i in kept],
        labels=labels,
        splits=[_split_of(table[split_column][i]) for i in kept] if split_column else None,
        class_names=names,
        bad_rows=bad,
    )


def _is_missing(value: Any) -> bool:
    """No value: null, NaN, or an empty / blank cell."""
    return (
        value is None
        or (isinstance(value, float) and math.isnan(value))
        or (isinstance(value, str) and not value.strip())
    )


def _split_of(value: Any) -> str | None:
    return _SPLIT_ALIASES.get(str(value).strip().lower()) if not _is_missing(value) else None


def _as_id(value: Any) -> int | None:
    """A class id written as an int (or an integral float, or a string of digits)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _label_mapping(
    raw: list[Any], class_names: Sequence[str] | None, file: str
) -> tuple[list[str], Callable[[Any], int | None]]:
    """Class names in order, and a function from a raw label to its class id."""
    if class_names:
        names = [str(n) for n in class_names]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.class_names has duplicates: {names}")
        index = {n: i for i, n in enumerate(names)}

        def by_name_or_id(value: Any) -> int | None:
            text = str(value).strip()
            if text in index:
                return index[text]
            as_id = _as_id(value)
            return as_id if as_id is not None and 0 <= as_id < len(names) else None

        return names, by_name_or_id
    ids = [_as_id(v) for v in raw]
    if raw and all(i is not None for i in ids):
        present = sorted(set(ids))  # type: ignore[type-var]
        if present[0] < 0 or present != list(range(present[-1] + 1)):
            raise DataError(
                f"{file}: label ids must be 0..K-1 with every id present; found {present}. "
                f"Give the class names in order with data.class_names."
            )
        return [str(i) for i in present], lambda v: _as_id(v)
    names = sorted({str(v).strip() for v in raw})
    index = {n: i for i, n in enumerate(names)}
    return names, lambda v: index.get(str(v).strip())


def report_bad_rows(bad: Sequence[BadRow], policy: str, what: str) -> None:
    """Stop on bad rows (``error``) or list them in the log (``skip``)."""
    if not bad:
        return
    rows = len({(b.file, b.row) for b in bad})
    listed = "\n  ".join(str(b) for b in bad[:_LISTED])
    more = f"\n  ... and {len(bad) - _LISTED} more" if len(bad) > _LISTED else ""
    if policy == "error":
        raise DataError(
            f"{rows} bad row(s) in {what}:\n  {listed}{more}\n"
            f"Fix them, or set data.bad_rows=skip to leave them out (they are listed in the log)."
        )
    log.warning("leaving out %d bad row(s) of %s:\n  %s%s", rows, what, listed, more)


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
            self.augment.check_classes(self.class_names)
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
    """The training augmenter; an empty image pipeline (``augment=none``) means none."""
    if transform is None or isinstance(transform, TextAugment):
        return transform
    if getattr(transform, "transforms", None) is not None and len(transform.transforms) == 0:
        return None
    raise ConfigError(
        f"augment: {type(transform).__name__} is not a text augmentation; use "
        f"augment=text_light, augment=text_sentiment or augment=null with text data"
    )
