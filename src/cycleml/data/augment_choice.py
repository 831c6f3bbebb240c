"""``augment=auto``: a training augmentation chosen from the images themselves.

The data module replaces :class:`AutoAugment` with a pipeline once its images are loaded
(their size and whether they are grey are known then) and logs what it chose:

* ``digits``: small grey images (32 px or less): small shifts, scaling and rotations,
  no flips (a mirrored digit or glyph is another symbol);
* ``light``: other images under 64 px: a horizontal flip and a small affine jitter;
* ``photo``: 64 px and more: a random resized crop (keeping at least 70 % of the area
  under 128 px, 50 % from 128 px), a horizontal flip, and brightness/contrast jitter
  (colour and saturation too for colour images).

Every parameter is relative to the image (shares of its side and area, degrees, factors),
never in pixels, so the same choice means the same change at any size. An explicit
``augment=<name>`` always wins; text data gets no augmentation from ``auto``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# images whose shorter side is at most this are digit-like when grey
SMALL_SIDE = 32
# from this shorter side on, images are photo-like: cropped and colour-jittered
PHOTO_SIDE = 64
# images checked for equal colour channels (grey content stored as RGB)
_GREY_SAMPLE = 64


class AutoAugment:
    """What ``augment=auto`` instantiates: a placeholder the data module resolves."""

    def __repr__(self) -> str:
        return "AutoAugment()"


def is_grey(images: np.ndarray) -> bool:
    """Whether uint8 ``(N, H, W, C)`` images are grey: one channel, or three equal ones
    in (a sample of) every image."""
    if images.shape[-1] == 1:
        return True
    step = max(1, len(images) // _GREY_SAMPLE)
    sample = images[::step]
    return bool(
        np.array_equal(sample[..., 0], sample[..., 1])
        and np.array_equal(sample[..., 1], sample[..., 2])
    )


def choose_augmentation(images: np.ndarray, image_size: tuple[int, int]) -> tuple[str, Any, str]:
    """``(name, albumentations pipeline, what it does)`` for images at ``image_size``."""
    import albumentations as A

    side = min(image_size)
    grey = is_grey(images)
    if side <= SMALL_SIDE and grey:
        return (
            "digits",
            A.Compose([A.Affine(translate_percent=(-0.08, 0.08), scale=(0.9, 1.1),
                                rotate=(-10, 10), border_mode=0, p=0.8)]),
            "shifts up to 8 % of the side, scale 0.9-1.1, rotations up to 10 degrees, no flips",
        )  # fmt: skip
    if side < PHOTO_SIDE:
        return (
            "light",
            A.Compose([A.HorizontalFlip(p=0.5),
                       A.Affine(translate_percent=(-0.06, 0.06), scale=(0.9, 1.1),
                                rotate=(-10, 10), border_mode=0, p=0.7)]),
            "horizontal flips, shifts up to 6 % of the side, scale 0.9-1.1, rotations up "
            "to 10 degrees",
        )  # fmt: skip
    min_area = 0.7 if side < 2 * PHOTO_SIDE else 0.5
    colour = (
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5)
        if grey
        else A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5)
    )
    return (
        "photo",
        A.Compose([A.RandomResizedCrop(size=tuple(image_size), scale=(min_area, 1.0), p=1.0),
                   A.HorizontalFlip(p=0.5), colour]),
        f"random resized crops of {min_area * 100:.0f}-100 % of the area back to "
        f"{image_size[0]}x{image_size[1]}, horizontal flips, "
        f"{'brightness/contrast' if grey else 'colour'} jitter of 20 %",
    )  # fmt: skip


def resolve_augmentation(transform: Any, images: np.ndarray, image_size: tuple[int, int]) -> Any:
    """``transform`` itself, or for ``augment=auto`` the pipeline chosen from ``images``
    (logged with what was chosen and why)."""
    if not isinstance(transform, AutoAugment):
        return transform
    name, pipeline, what = choose_augmentation(images, image_size)
    log.info(
        "augmentation: %s (%s), chosen for %s images at %dx%d px; augment=<name> sets it",
        name, what, "grey" if is_grey(images) else "colour", image_size[0], image_size[1],
    )  # fmt: skip
    return pipeline
