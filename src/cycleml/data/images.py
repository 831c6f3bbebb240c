"""Image classification data: the bundled digits and image folders.

Images are decoded and resized once into a uint8 array (N, H, W, C) by the same
:class:`~cycleml.inference.preprocess.ImagePreprocessor` that serving and offline
prediction use, and normalised with the same constants as the exported graph, so
training and serving cannot drift apart; training applies an albumentations pipeline
per sample, evaluation only normalises. The
pipeline is re-seeded from (seed, epoch, index) for every sample, so augmentation
is reproducible whatever the number of loader workers.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cycleml.data.augment_choice import resolve_augmentation
from cycleml.data.splits import SPLITS, split_indices
from cycleml.data.versioning import content_hash, dataset_fingerprint
from cycleml.errors import ConfigError, DataError
from cycleml.inference.preprocess import ImagePreprocessor, normalise

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class AugmentedImages(Dataset):
    """(image, label) pairs from a uint8 NHWC array, normalised to float32 CHW."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        mean: Sequence[float],
        std: Sequence[float],
        transform: Callable[..., dict[str, Any]] | None = None,
        seed: int = 0,
    ) -> None:
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.mean, self.std = list(mean), list(std)
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        # without augmentation every epoch sees the same tensors: normalise once
        self._cache = None if transform is not None else self._normalise(images)

    def _normalise(self, images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(normalise(images, self.mean, self.std))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.__getitems__([index])
        return images[0], labels[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch at once: one seed, one normalisation, one tensor (no collate).

        The pipeline is seeded from (seed, epoch, batch indices), so a batch is the same
        whatever the number of loader workers.
        """
        index = torch.as_tensor(indices, dtype=torch.long)
        if self._cache is not None:
            return self._cache[index], self.labels[index]
        self.transform.set_random_seed(hash((self.seed, self.epoch, *indices)) & 0x7FFFFFFF)
        batch = np.stack([self.transform(image=self.images[i])["image"] for i in indices])
        if batch.ndim == 3:  # OpenCV drops a single channel
            batch = batch[..., None]
        return self._normalise(batch), self.labels[index]


def _batch_as_is(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The collate step of datasets that build whole batches themselves."""
    return batch


class _EpochSeeder(L.Callback):
    """Tells the training dataset which epoch it is, so augmentations differ per epoch."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dataset = getattr(trainer.datamodule, "_train_set", None)
        if isinstance(dataset, AugmentedImages):
            dataset.set_epoch(trainer.current_epoch)


class ImageDataModule(L.LightningDataModule, ABC):
    """Base for in-memory image data: subclasses provide ``_load() -> (images, labels, names)``."""

    kind = "image"
    # whether data.image_size may be null: chosen from the images when they are loaded
    chooses_image_size = False

    def __init__(
        self,
        image_size: int | Sequence[int] | None = 32,
        channels: int = 3,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
        train_transform: Callable[..., dict[str, Any]] | None = None,
        augment_seed: int = 0,
    ) -> None:
        super().__init__()
        if image_size is None and not self.chooses_image_size:
            raise ConfigError(
                f"data.image_size: null (chosen from the images) works with data=image_folder; "
                f"{type(self).__name__} needs a size"
            )
        size = (
            [image_size, image_size] if isinstance(image_size, int) else list(image_size or [1, 1])
        )
        if len(size) != 2 or min(size) < 1:
            raise ConfigError(f"data.image_size must be a positive int or [H, W], got {image_size}")
        if channels not in (1, 3):
            raise ConfigError(f"data.channels must be 1 or 3, got {channels}")
        mean, std = list(mean), list(std)
        if len(mean) == 1 and channels == 3:
            mean, std = mean * 3, std * 3
        if len(mean) != channels or len(std) != channels:
            raise ConfigError(
                f"data.mean/data.std need {channels} values (one per channel), got {mean} / {std}"
            )
        # None until the images are looked at (data.image_size: null, image folders)
        self.image_size: tuple[int, int] | None = (
            None if image_size is None else (int(size[0]), int(size[1]))
        )
        self.channels = channels
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.mean, self.std = mean, std
        transforms = getattr(train_transform, "transforms", None)
        self.train_transform = (
            None if transforms is not None and len(transforms) == 0 else train_transform
        )
        self.augment_seed = augment_seed
        self.images: np.ndarray | None = None
        self.labels: np.ndarray | None = None
        self.item_ids: list[str] = []
        self.class_names: list[str] = []
        self.splits: dict[str, np.ndarray] = {}
        self.fingerprint = ""
        self._train_set: AugmentedImages | None = None

    @abstractmethod
    def _load(self) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
        """Return images (N,H,W,C uint8, already resized), labels, class names, item ids."""

    # -- LightningDataModule ------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.images is not None:
            return
        images, labels, class_names, item_ids = self._load()
        self.images, self.labels = images, labels.astype(np.int64)
        self.class_names, self.item_ids = class_names, item_ids
        # augment=auto: chosen now that the images' size and colour are known
        self.train_transform = resolve_augmentation(self.train_transform, images, self.image_size)
        self.splits = self._assign_splits(self.labels)
        self.fingerprint = self._fingerprint()
        log.info(
            "%s: %d images %s, %d classes, split %s, fingerprint %s",
            type(self).__name__,
            len(labels),
            images.shape[1:],
            len(class_names),
            {k: len(v) for k, v in self.splits.items()},
            self.fingerprint,
        )

    def _assign_splits(self, labels: np.ndarray) -> dict[str, np.ndarray]:
        """Item indices of each split; by default stratified and seeded."""
        return split_indices(labels, self.val_fraction, self.test_fraction, seed=self.split_seed)

    def _fingerprint(self) -> str:
        """Hash of every item's pixels, label and split (the data actually used)."""
        split_of = np.empty(len(self.labels), dtype=object)
        for name, idx in self.splits.items():
            split_of[idx] = name
        return dataset_fingerprint(
            (content_hash(img.tobytes()), str(lab), str(split))
            for img, lab, split in zip(self.images, self.labels, split_of, strict=True)
        )

    def _dataset(self, split: str, augment: bool) -> AugmentedImages:
        images, labels = self.split_arrays(split)
        return AugmentedImages(
            images,
            labels,
            self.mean,
            self.std,
            transform=self.train_transform if augment else None,
            seed=self.augment_seed,
        )

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
            collate_fn=_batch_as_is,
        )

    def train_dataloader(self) -> DataLoader:
        self._train_set = self._dataset("train", augment=True)
        return self._loader(self._train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("val", augment=False), self.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test", augment=False), self.eval_batch_size, False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    # -- the data-module contract (docs/architecture.md) --------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The uint8 (N, H, W, C) images and int64 labels of one split, in loader order."""
        self._require_setup()
        if split not in SPLITS:
            raise ConfigError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
        idx = self.splits[split]
        return self.images[idx], self.labels[idx]

    def split_ids(self, split: str) -> list[str]:
        self._require_setup()
        return [self.item_ids[i] for i in self.splits[split]]

    def net_kwargs(self) -> dict[str, int]:
        """What a network needs to know about this data."""
        self._require_setup()
        return {"in_channels": self.channels, "num_classes": self.num_classes}

    def spec(self) -> dict[str, Any]:
        self._require_setup()
        return {
            "kind": self.kind,
            "image_size": list(self.image_size),
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
            "class_names": list(self.class_names),
            "fingerprint": self.fingerprint,
        }

    def callbacks(self) -> list[L.Callback]:
        return [_EpochSeeder()] if self.train_transform is not None else []

    def _require_setup(self) -> None:
        if self.images is None:
            self.setup()

    @property
    def preprocessor(self) -> ImagePreprocessor:
        """Decodes and resizes images to this data's size and channels (the serving path)."""
        return ImagePreprocessor(self.image_size, self.channels)

    def _decode_file(self, path: str | Path) -> np.ndarray | str:
        """One image file at this data's size, or why it cannot be read."""
        try:
            return self.preprocessor.decode_file(path)
        except DataError as err:
            return str(err)


class DigitsDataModule(ImageDataModule):
    """The scikit-learn digits (1,797 real 8x8 handwritten digits), bundled with scikit-learn."""

    def __init__(self, image_size: int | Sequence[int] = 16, channels: int = 1, **kwargs: Any):
        super().__init__(image_size=image_size, channels=channels, **kwargs)

    def _load(self) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        raw = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        preprocessor = self.preprocessor
        images = np.stack([preprocessor(img) for img in raw])
        ids = [f"digits/{i}" for i in range(len(raw))]
        return images, digits.target.astype(np.int64), [str(n) for n in digits.target_names], ids


# Folder names that mean a split, not a class, at the top of an image folder.
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test"}  # fmt: skip
# the same names as the image_folder source of `cycleml data gather`
LAYOUTS = ("auto", "class_folders", "split_class_folders")


class ImageFolderDataModule(ImageDataModule):
    """An image folder, any size, RGB or grey, in one of two layouts:

    * ``<path>/<class name>/<image file>``: split by ``split_seed`` and the fractions;
    * ``<path>/<split>/<class name>/<image file>`` (``train``, ``val``/``valid``/
      ``validation``, ``test``): the given split is used; a missing ``val`` or ``test``
      is carved from ``train`` by the fractions.

    ``layout="auto"`` detects which one the folder has (and logs it); a folder mixing
    split folders with other folders is refused unless ``layout`` says which it is.
    Unreadable files are skipped with one warning listing every path; a missing folder,
    a folder without class sub-folders or an empty class folder is an error.
    """

    chooses_image_size = True

    def __init__(
        self, path: str, decode_workers: int = 2, layout: str = "auto", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if layout not in LAYOUTS:
            raise ConfigError(f"data.layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        self.path = Path(path)
        self.decode_workers = max(1, decode_workers)
        self.layout = layout
        self.unreadable: list[tuple[str, str]] = []
        # the split of each file / readable item in the <split>/<class>/ layout (None:
        # the <class>/ layout, split by the seed)
        self._given_splits: list[str] | None = None
        self._item_splits: list[str] | None = None

    def _subfolders(self, folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))

    def _detect_layout(self, top: list[Path]) -> str:
        split_named = [d.name for d in top if d.name.lower() in SPLIT_FOLDERS]
        if self.layout != "auto" or not split_named:
            return "class_folders" if self.layout == "auto" else self.layout
        others = [d.name for d in top if d.name.lower() not in SPLIT_FOLDERS]
        if others or "train" not in {n.lower() for n in split_named}:
            raise DataError(
                f"image folder '{self.path}' has split folders {split_named} next to "
                f"{others or 'no train folder'}; set data.layout=split_class_folders "
                f"(<path>/<split>/<class>/) or data.layout=class_folders (they are classes)"
            )
        return "split_class_folders"

    def _scan(self) -> tuple[list[str], list[tuple[Path, int]]]:
        root = self.path
        if not root.exists():
            raise DataError(f"image folder '{root}' does not exist (data.path)")
        if not root.is_dir():
            raise DataError(f"data.path '{root}' is a file, expected a folder of class folders")
        top = self._subfolders(root)
        if not top:
            raise DataError(
                f"image folder '{root}' has no class sub-folders; expected <path>/<class>/<image>"
            )
        layout = self._detect_layout(top)
        if layout == "class_folders":
            log.info("image folder '%s': layout <path>/<class>/, classes %s", root,
                     [d.name for d in top])  # fmt: skip
            self._given_splits = None
            return [d.name for d in top], self._class_files({d.name: d for d in top}, None)
        not_splits = [d.name for d in top if d.name.lower() not in SPLIT_FOLDERS]
        if not_splits or not any(d.name.lower() == "train" for d in top):
            raise DataError(
                f"image folder '{root}': data.layout=split_class_folders needs a train folder "
                f"and only split folders ({', '.join(SPLIT_FOLDERS)}); found {[d.name for d in top]}"
            )
        split_dirs = {
            SPLIT_FOLDERS[d.name.lower()]: d for d in top if d.name.lower() in SPLIT_FOLDERS
        }
        class_names = sorted({c.name for d in split_dirs.values() for c in self._subfolders(d)})
        if not class_names:
            raise DataError(f"image folder '{root}': its split folders hold no class folders")
        files: list[tuple[Path, int]] = []
        self._given_splits = []
        for split, folder in sorted(split_dirs.items()):
            classes = {c.name: c for c in self._subfolders(folder)}
            unknown = sorted(set(classes) - set(class_names))
            if unknown:
                raise DataError(f"{folder}: class folders {unknown} are not classes {class_names}")
            found = self._class_files(classes, class_names)
            files.extend(found)
            self._given_splits.extend([split] * len(found))
        log.info(
            "image folder '%s': layout <path>/<split>/<class>/, given splits %s, classes %s%s",
            root, sorted(split_dirs), class_names,
            "".join(f"; {s} carved from train" for s in ("val", "test") if s not in split_dirs),
        )  # fmt: skip
        return class_names, files

    def _class_files(
        self, class_dirs: dict[str, Path], class_names: list[str] | None
    ) -> list[tuple[Path, int]]:
        """(image file, label) of each class folder; ``class_names`` gives the label ids."""
        names = class_names or list(class_dirs)
        files: list[tuple[Path, int]] = []
        empty: list[str] = []
        for name, class_dir in class_dirs.items():
            images = sorted(
                p
                for p in class_dir.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not images:
                empty.append(str(class_dir))
            files.extend((p, names.index(name)) for p in images)
        if empty:
            raise DataError(
                "empty class folder(s) with no images "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}): {', '.join(empty)}"
            )
        return files

    def _assign_splits(self, labels: np.ndarray) -> dict[str, np.ndarray]:
        if self._item_splits is None:
            return super()._assign_splits(labels)
        split_of = np.asarray(self._item_splits)
        parts = {name: np.flatnonzero(split_of == name) for name in SPLITS}
        missing = {s for s in ("val", "test") if not len(parts[s])}
        if missing:
            train = parts["train"]
            carved = split_indices(
                labels[train],
                self.val_fraction if "val" in missing else 0.0,
                self.test_fraction if "test" in missing else 0.0,
                seed=self.split_seed,
            )
            for name in missing:
                parts[name] = np.sort(train[carved[name]])
            parts["train"] = np.sort(train[carved["train"]])
        return parts

    def _load(self) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
        class_names, files = self._scan()
        if self.image_size is None:
            side = chosen_image_size([p for p, _ in files])
            self.image_size = (side, side)
        with ThreadPoolExecutor(self.decode_workers) as pool:
            decoded = list(pool.map(self._decode_file, (p for p, _ in files)))
        images, labels, ids, splits = [], [], [], []
        self.unreadable = []
        given = self._given_splits or [None] * len(files)
        for (path, label), result, split in zip(files, decoded, given, strict=True):
            if isinstance(result, str):
                self.unreadable.append((str(path), result))
                continue
            images.append(result)
            splits.append(split)
            labels.append(label)
            ids.append(str(path.relative_to(self.path)))
        if self.unreadable:
            log.warning(
                "skipped %d unreadable image(s) in '%s':\n%s",
                len(self.unreadable),
                self.path,
                "\n".join(f"  {p}: {why}" for p, why in self.unreadable),
            )
        if not images:
            raise DataError(f"no readable images in '{self.path}'")
        self._item_splits = splits if self._given_splits is not None else None
        counts = np.bincount(np.asarray(labels), minlength=len(class_names))
        unreadable_only = [class_names[i] for i, c in enumerate(counts) if c == 0]
        if unreadable_only:
            raise DataError(
                f"class folder(s) with no readable images in '{self.path}': {unreadable_only}"
            )
        return np.stack(images), np.asarray(labels, dtype=np.int64), class_names, ids


# Bounds of a chosen image size: below 32 px a CNN has little to see, above 128 px a
# from-scratch model on a CPU trains slowly for little gain on a few hundred images.
CHOSEN_SIZE_RANGE = (32, 128)


def chosen_image_size(files: Sequence[Path]) -> int:
    """A square size for images of these files: their median shorter side, rounded down to
    a multiple of 16 and kept within :data:`CHOSEN_SIZE_RANGE` (headers only are read)."""
    from PIL import Image

    sides = []
    for path in files:
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
        except (OSError, ValueError):
            continue  # unreadable files are reported when they are decoded
    if not sides:
        return CHOSEN_SIZE_RANGE[0]
    median = int(np.median(sides))
    low, high = CHOSEN_SIZE_RANGE
    side = min(high, max(low, median // 16 * 16))
    log.info(
        "image size: %d px, from the images' median shorter side %d px (within %d-%d px); "
        "data.image_size sets it",
        side, median, low, high,
    )  # fmt: skip
    return side
