"""``data=gathered``: train on a dataset directory written by ``cycleml data gather``/``clean``.

The directory's kind picks the module: images become a :class:`GatheredImageDataModule`
(an :class:`~cycleml.data.images.ImageDataModule`), texts a
:class:`GatheredTextDataModule` (a :class:`~cycleml.data.text.TextTableDataModule`
over the manifest). Items keep the split the manifest gives them; items without one are
split by ``split_seed``. The module's ``fingerprint`` is the manifest's fingerprint, so
a run records exactly the dataset version it read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np

from cycleml.data.images import ImageDataModule
from cycleml.data.manifest import MANIFEST_FILE, SPLIT_COLUMN, Dataset, read_dataset
from cycleml.data.splits import SPLITS, split_indices
from cycleml.data.text import TextTableDataModule
from cycleml.errors import DataError

log = logging.getLogger(__name__)


def assign_splits(
    given: Sequence[str | None],
    labels: np.ndarray,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> list[str]:
    """A split per item: the given one, or a stratified seeded one for items without."""
    splits = list(given)
    free = np.flatnonzero([s is None for s in splits])
    if len(free):
        parts = split_indices(labels[free], val_fraction, test_fraction, seed=seed)
        for name, positions in parts.items():
            for position in positions:
                splits[free[position]] = name
    return [str(s) for s in splits]


def _class_names(dataset: Dataset, given: Sequence[str] | None) -> list[str]:
    labels = dataset.manifest["label"]
    if labels.isna().any():
        first = dataset.manifest["item_id"][labels.isna()].iloc[0]
        raise DataError(
            f"{dataset.root}: {int(labels.isna().sum())} item(s) have no label (first: {first}); "
            "run `cycleml data clean` on it first"
        )
    present = sorted({str(v) for v in labels})
    if not given:
        return present
    names = [str(n) for n in given]
    unknown = sorted(set(present) - set(names))
    if unknown:
        raise DataError(f"{dataset.root}: labels {unknown} are not in data.class_names {names}")
    return names


def _split_column(dataset: Dataset) -> list[str | None]:
    if SPLIT_COLUMN not in dataset.manifest.columns:
        return [None] * len(dataset.manifest)
    given = [None if v is None else str(v) for v in dataset.manifest[SPLIT_COLUMN]]
    unknown = sorted({s for s in given if s is not None} - set(SPLITS))
    if unknown:
        raise DataError(
            f"{dataset.root}: unknown split(s) {unknown} in the manifest; use {list(SPLITS)}"
        )
    return given


class GatheredImageDataModule(ImageDataModule):
    """The images of a dataset directory, decoded and resized once."""

    def __init__(
        self,
        path: str,
        class_names: Sequence[str] | None = None,
        decode_workers: int = 2,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.dataset = read_dataset(path)
        if self.dataset.kind != "image":
            raise DataError(f"{path} holds texts; data=gathered picks the text module for it")
        self.given_class_names = list(class_names) if class_names else None
        self.decode_workers = max(1, decode_workers)

    def _decode(self, relative: str) -> np.ndarray | str:
        return self._decode_file(self.dataset.file_path(relative))

    def _load(self) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
        frame = self.dataset.manifest
        names = _class_names(self.dataset, self.given_class_names)
        with ThreadPoolExecutor(self.decode_workers) as pool:
            decoded = list(pool.map(self._decode, frame["path"]))
        failed = [
            (i, r) for i, r in zip(frame["item_id"], decoded, strict=True) if isinstance(r, str)
        ]
        if failed:
            raise DataError(
                f"{self.dataset.root}: {len(failed)} unreadable image(s) (first: {failed[0][0]}: "
                f"{failed[0][1]}); run `cycleml data clean` on it first"
            )
        index = {n: i for i, n in enumerate(names)}
        labels = np.asarray([index[str(v)] for v in frame["label"]], dtype=np.int64)
        return np.stack(decoded), labels, names, list(frame["item_id"])

    def _assign_splits(self, labels: np.ndarray) -> dict[str, np.ndarray]:
        split_of = np.asarray(
            assign_splits(
                _split_column(self.dataset), labels, self.val_fraction,
                self.test_fraction, self.split_seed,
            )
        )  # fmt: skip
        return {name: np.flatnonzero(split_of == name) for name in SPLITS}

    def _fingerprint(self) -> str:
        # the manifest's: a run records exactly the dataset version it read
        return self.dataset.fingerprint


class GatheredTextDataModule(TextTableDataModule):
    """The texts of a dataset directory, read from its manifest."""

    def __init__(self, path: str, class_names: Sequence[str] | None = None, **kwargs: Any) -> None:
        self.dataset = read_dataset(path)
        if self.dataset.kind != "text":
            raise DataError(f"{path} holds images; data=gathered picks the image module for it")
        super().__init__(
            path=str(self.dataset.root / MANIFEST_FILE),
            text_column="text",
            label_column="label",
            id_column="item_id",
            class_names=_class_names(self.dataset, class_names),
            bad_rows="error",  # every item is used, so the fingerprint is the manifest's
            **kwargs,
        )

    def _random_splits(self, labels: list[int]) -> list[str]:
        # rows are read in manifest order and none is left out (bad_rows=error)
        return assign_splits(
            _split_column(self.dataset), np.asarray(labels), self.val_fraction,
            self.test_fraction, self.split_seed,
        )  # fmt: skip

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.fingerprint = self.dataset.fingerprint


# Image options, spelled as in data=digits and data=image_folder (``data.image_size``).
IMAGE_OPTIONS = (
    "image_size", "channels", "mean", "std", "decode_workers", "resize_mode", "crop_fraction",
    "interpolation",
)  # fmt: skip


def gathered_data_module(
    path: str,
    image: Mapping[str, Any] | None = None,
    text: Mapping[str, Any] | None = None,
    train_transform: Callable[..., Any] | None = None,
    **common: Any,
) -> L.LightningDataModule:
    """The data module for the dataset directory ``path``: image or text, by its content.

    ``common`` options (splits, batch sizes, class names, and the image options
    :data:`IMAGE_OPTIONS`) apply to the kind they fit; ``text`` holds the text options.
    ``image`` is the former spelling of the image options (``data.image.image_size``):
    what is set there still applies, with a warning naming the new spelling.
    """
    root = Path(path).expanduser()
    kind = read_dataset(root).kind
    image_options = {k: common.pop(k) for k in IMAGE_OPTIONS if k in common}
    for key, value in (image or {}).items():
        if value is None:
            continue
        log.warning("data.image.%s is deprecated: use data.%s", key, key)
        image_options[key] = value
    own = image_options if kind == "image" else dict(text or {})
    module = GatheredImageDataModule if kind == "image" else GatheredTextDataModule
    return module(path=str(root), train_transform=train_transform, **common, **own)
