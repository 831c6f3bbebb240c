"""What decoding an image file tells: whether it is readable, its size, its perceptual hash.

:func:`inspect_images` decodes every pixel of each file (a truncated file fails there,
not later in training) and computes a 64-bit pHash; :func:`near_links` finds the hashes
within a few bits of each other without comparing every pair. ``cycleml data clean``
runs :func:`inspect_images` in worker processes over chunks of paths.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ImageFacts:
    """What decoding one file taught us; ``error`` is None when it decoded fully."""

    error: str | None
    width: int = 0
    height: int = 0
    phash: int = 0


def _dct_matrix(size: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: ``m @ x`` transforms the columns of ``x``."""
    k = np.arange(size)[:, None]
    i = np.arange(size)[None, :]
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * size)) * np.sqrt(2.0 / size)
    matrix[0] /= np.sqrt(2.0)
    return matrix


_DCT32 = _dct_matrix(32)


def perceptual_hash(image: Any) -> int:
    """64-bit pHash: signs of the 8×8 lowest DCT frequencies of a 32×32 grey image.

    Each bit says whether a frequency is above the median of the 63 non-constant ones, so
    brightness, contrast, mild noise, re-encoding and resizing change few bits while
    different pictures differ in about half of them.
    """
    from PIL import Image

    grey = np.asarray(
        image.convert("L").resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float64
    )
    low = (_DCT32 @ grey @ _DCT32.T)[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int(np.packbits(bits).view(">u8")[0])


def inspect_images(paths: list[str]) -> list[ImageFacts]:
    """Worker: fully decode each file; report size and pHash, or why it failed."""
    from PIL import Image, UnidentifiedImageError

    facts = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            facts.append(ImageFacts(f"cannot read file: {err.strerror or err}"))
            continue
        try:
            with Image.open(BytesIO(data)) as image:
                image.load()  # decodes every pixel: truncated files fail here
                facts.append(ImageFacts(None, image.width, image.height, perceptual_hash(image)))
        except UnidentifiedImageError:
            facts.append(ImageFacts("not an image format Pillow can read"))
        except (OSError, ValueError, SyntaxError) as err:
            facts.append(ImageFacts(f"not a readable image: {err}"))
    return facts


def near_links(hashes: Iterable[int], threshold: int) -> dict[int, set[int]]:
    """For each distinct 64-bit hash, the other distinct hashes within ``threshold`` bits.

    Pigeonhole: split the 64 bits into ``threshold + 1`` bands; two hashes that close
    agree exactly on at least one band, so only hashes sharing a band value are compared.
    """
    unique = np.unique(np.fromiter(hashes, dtype=np.uint64))
    links: dict[int, set[int]] = defaultdict(set)
    bands = threshold + 1
    edges = [round(i * 64 / bands) for i in range(bands + 1)]
    for start, stop in zip(edges[:-1], edges[1:], strict=True):
        keys = (unique >> np.uint64(start)) & np.uint64((1 << (stop - start)) - 1)
        order = np.argsort(keys, kind="stable")
        bounds = np.flatnonzero(np.diff(keys[order])) + 1
        for group in np.split(order, bounds):
            if len(group) < 2:
                continue
            values = unique[group]
            close = np.bitwise_count(values[:, None] ^ values[None, :]) <= threshold
            for a, b in zip(*np.nonzero(np.triu(close, k=1)), strict=True):
                links[int(values[a])].add(int(values[b]))
                links[int(values[b])].add(int(values[a]))
    return dict(links)


# the most bits auto calibration allows (natural pictures: near copies differ in a few
# bits, different pictures in about half of the 64)
MAX_AUTO_HAMMING = 6
# the chance neighbours auto calibration allows per item: unrelated pictures flagged
# as near-duplicates of each other in at most about 1 % of the items
CHANCE_NEIGHBOURS = 0.01
_CALIBRATION_PAIRS = 2_000_000
_UPPER_QUANTILE, _LOWER_QUANTILE = 1e-2, 1e-3


@dataclass(frozen=True)
class HammingCalibration:
    """How the near-duplicate threshold was chosen from the dataset's own hashes.

    ``pairs`` random pairs of distinct images (all pairs of a small dataset) give the
    distance reached by 1 % and 0.1 % of them; the tail below is extrapolated as one
    decade of pairs per ``bits_per_decade`` bits (a straight line in log scale, which
    overestimates the chance pairs of a binomial-like tail, so errs towards fewer
    flags) down to the rate at which an item expects ``CHANCE_NEIGHBOURS`` chance
    neighbours among the others. Real duplicates are too few to move these quantiles.
    """

    threshold: int
    images: int
    pairs: int
    distance_1pct: float
    distance_01pct: float
    bits_per_decade: float

    def describe(self) -> str:
        return (
            f"{self.threshold} bits (auto: random pairs of {self.images} images are "
            f"{self.distance_1pct:g} bits apart at the 1st percentile, {self.distance_01pct:g} "
            f"at the 0.1th; at most {CHANCE_NEIGHBOURS:.0%} of items may match by chance)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "mode": "auto",
            "images": self.images,
            "random_pairs": self.pairs,
            "distance_1pct": self.distance_1pct,
            "distance_01pct": self.distance_01pct,
            "bits_per_decade": self.bits_per_decade,
            "chance_neighbours_per_item": CHANCE_NEIGHBOURS,
            "max_bits": MAX_AUTO_HAMMING,
        }


def calibrate_hamming(
    hashes: Iterable[int], max_bits: int = MAX_AUTO_HAMMING, seed: int = 0
) -> HammingCalibration:
    """The near-duplicate threshold for these (distinct images') hashes; see
    :class:`HammingCalibration`. Fewer than 2 images: ``max_bits``."""
    values = np.fromiter(hashes, dtype=np.uint64)
    n = len(values)
    if n < 2:
        return HammingCalibration(max_bits, n, 0, 64.0, 64.0, 0.0)
    if n * (n - 1) // 2 <= _CALIBRATION_PAIRS:
        first, second = np.triu_indices(n, k=1)
    else:
        rng = np.random.default_rng(seed)
        first = rng.integers(0, n, _CALIBRATION_PAIRS)
        second = (first + rng.integers(1, n, _CALIBRATION_PAIRS)) % n  # never the same
    distances = np.bitwise_count(values[first] ^ values[second])
    upper = float(np.quantile(distances, _UPPER_QUANTILE))
    lower = float(np.quantile(distances, _LOWER_QUANTILE))
    per_decade = max(upper - lower, 1.0)
    target = CHANCE_NEIGHBOURS / (n - 1)
    decades = max(0.0, math.log10(_LOWER_QUANTILE / target))
    threshold = int(min(max_bits, max(0.0, math.floor(lower - decades * per_decade))))
    return HammingCalibration(threshold, n, len(distances), upper, lower, per_decade)
