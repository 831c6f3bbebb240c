"""What decoding an image file tells: whether it is readable, its size, its perceptual hash.

:func:`inspect_images` decodes every pixel of each file (a truncated file fails there,
not later in training) and computes a 64-bit pHash; :func:`near_links` finds the hashes
within a few bits of each other without comparing every pair. ``cycleml data clean``
runs :func:`inspect_images` in worker processes over chunks of paths.
"""

from __future__ import annotations

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
