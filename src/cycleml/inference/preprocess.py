"""Preprocessing in numpy (no torch): decode + resize images, tokenize texts.

This is the one image path: training data (``cycleml.data``), serving and offline
prediction all decode and resize with :class:`ImagePreprocessor` (grey or RGB; the whole
image stretched to the size, or its centre cut out and resized, with PIL's bilinear or
bicubic filter), and training normalises and the exported graph scales pixels with
the constants of :func:`normalisation`. Scaling, normalisation, layout and softmax of
a bundle live inside the ONNX graph, so decoding and resizing is all a client must
reproduce.
"""

from __future__ import annotations

import io
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError
from tokenizers import Encoding, Tokenizer

from cycleml.errors import BundleError, DataError

if TYPE_CHECKING:
    from cycleml.inference.bundle import ImagePreprocess as ImagePreprocessSettings

ImageInput = bytes | bytearray | memoryview | np.ndarray | Image.Image | Path

_DECODE_ERRORS = (
    UnidentifiedImageError,
    OSError,
    ValueError,
    SyntaxError,
    Image.DecompressionBombError,
)

# an object's address in an error's text (``<_io.BytesIO object at 0x7f...>``): it differs
# from run to run and tells the user nothing
_OBJECT_ADDRESS = re.compile(r" ?<[\w.]+ object at 0x[0-9a-fA-F]+>")


# how an image is brought to the model's size: the whole image, its aspect ratio not
# kept, or the centre of it (``crop_fraction`` of it), its aspect ratio kept
RESIZE_MODES = ("stretch", "shorter_side_crop")
# the resampling filters (bundle.json's ``resize``)
RESIZE_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def check_resize(resize_mode: str, crop_fraction: float, interpolation: str) -> list[str]:
    """What is wrong with these resize settings (empty when nothing is)."""
    problems = []
    if resize_mode not in RESIZE_MODES:
        problems.append(f"resize mode {resize_mode!r} is not one of {', '.join(RESIZE_MODES)}")
    if (
        isinstance(crop_fraction, bool)
        or not isinstance(crop_fraction, (int, float))
        or not 0.0 < crop_fraction <= 1.0
    ):
        problems.append(f"crop fraction must be a number in (0, 1], got {crop_fraction!r}")
    if interpolation not in RESIZE_FILTERS:
        problems.append(
            f"resize filter {interpolation!r} is not one of {', '.join(RESIZE_FILTERS)}"
        )
    return problems


class ImagePreprocessor:
    """Turn one image (encoded bytes, a file path, an array or a PIL image) into
    ``uint8 (H, W, C)`` at the model's size.

    ``resize_mode``: ``stretch`` resizes the whole image to (H, W), whatever its aspect
    ratio. ``shorter_side_crop`` keeps the aspect ratio: the centred box of the model's
    aspect ratio that spans ``crop_fraction`` of the image (of its shorter side, for a
    square size) is resized to (H, W) in one resampling. That is timm's evaluation
    transform (resize the shorter side to ``size / crop_pct``, then cut out the centre
    ``size``) without resampling the parts it throws away; it applies to images already
    at the model's size too. ``interpolation``: PIL's ``bilinear`` or ``bicubic`` filter.
    """

    def __init__(
        self,
        image_size: Sequence[int],
        channels: int,
        resize_mode: str = "stretch",
        crop_fraction: float = 1.0,
        interpolation: str = "bilinear",
    ) -> None:
        problems = check_resize(resize_mode, crop_fraction, interpolation)
        if problems:
            raise DataError("; ".join(problems))
        self.height, self.width = int(image_size[0]), int(image_size[1])
        self.channels = int(channels)
        self.mode = "L" if self.channels == 1 else "RGB"
        self.resize_mode = resize_mode
        self.crop_fraction = float(crop_fraction)
        self.interpolation = interpolation
        self._filter = RESIZE_FILTERS[interpolation]
        # an image already at the model's size is used as it is
        self._identity_at_size = resize_mode == "stretch" or self.crop_fraction == 1.0

    @classmethod
    def from_bundle(cls, pre: ImagePreprocessSettings) -> ImagePreprocessor:
        """The preprocessor a bundle's ``preprocess`` entry describes."""
        return cls(pre.image_size, pre.channels, pre.resize_mode, pre.crop_fraction, pre.resize)

    def __call__(self, item: ImageInput) -> np.ndarray:
        if isinstance(item, np.ndarray):
            return self._from_array(item)
        if isinstance(item, Image.Image):
            return self._from_pil(item)
        if isinstance(item, Path):
            return self.decode_file(item)
        if not isinstance(item, (bytes, bytearray, memoryview)):
            raise DataError(
                f"unsupported image input type {type(item).__name__}; "
                "expected bytes, a pathlib.Path, a numpy array or a PIL image"
            )
        if len(item) == 0:
            raise DataError("cannot decode image: empty data")
        try:
            with Image.open(io.BytesIO(item)) as pil:
                pil.load()
                return self._from_pil(pil)
        except UnidentifiedImageError as err:
            # Pillow's own text names an in-memory object by its address
            raise DataError(
                "cannot decode image: not an image, or in a format Pillow cannot read"
            ) from err
        except _DECODE_ERRORS as err:
            text = _OBJECT_ADDRESS.sub("", str(err))
            raise DataError(f"cannot decode image: {type(err).__name__}: {text}") from err

    def decode_file(self, path: str | os.PathLike[str]) -> np.ndarray:
        """One image file. It is read in one call and decoded from memory, which for
        small images costs less than Pillow's many small reads from the file."""
        return self(read_regular_file(path))

    def _from_pil(self, pil: Image.Image) -> np.ndarray:
        if pil.mode != self.mode:
            pil = pil.convert(self.mode)
        if self.resize_mode == "shorter_side_crop":
            if not (self._identity_at_size and pil.size == (self.width, self.height)):
                pil = pil.resize((self.width, self.height), self._filter, box=self._box(pil.size))
        elif pil.size != (self.width, self.height):
            pil = pil.resize((self.width, self.height), self._filter)
        array = np.asarray(pil, dtype=np.uint8)
        return array[..., None] if array.ndim == 2 else array

    def _box(self, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """The centred source box (left, top, right, bottom) of the model's aspect ratio
        that spans ``crop_fraction`` of the image in its limiting direction."""
        width, height = size
        scale = self.crop_fraction * min(width / self.width, height / self.height)
        box_w, box_h = self.width * scale, self.height * scale
        left, top = (width - box_w) / 2.0, (height - box_h) / 2.0
        return (left, top, left + box_w, top + box_h)

    def _from_array(self, array: np.ndarray) -> np.ndarray:
        if array.dtype != np.uint8:
            raise DataError(f"image arrays must be uint8 pixels 0..255, got {array.dtype}")
        if array.size == 0:
            raise DataError(f"image array of shape {array.shape} has no pixels")
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise DataError(
                f"image array has shape {array.shape}; expected (H, W), (H, W, 1), "
                "(H, W, 3) or (H, W, 4)"
            )
        at_size = self._identity_at_size and array.shape[:2] == (self.height, self.width)
        if at_size and array.ndim == 2 and self.channels == 1:
            return np.ascontiguousarray(array[..., None])
        if at_size and array.ndim == 3 and array.shape[-1] == 3 and self.channels == 3:
            return np.ascontiguousarray(array)
        mode = "L" if array.ndim == 2 else ("RGB" if array.shape[-1] == 3 else "RGBA")
        return self._from_pil(Image.fromarray(np.ascontiguousarray(array), mode))


def read_regular_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of the regular file at ``path``. Anything else (a FIFO, a socket, a
    device, a folder) is a :class:`DataError` without reading it: a FIFO named
    ``*.png`` would otherwise block the reader forever."""
    try:
        kind = _file_kind(os.stat(path).st_mode)
        if kind is None:
            # non-blocking: should the path become a FIFO after the check, opening it
            # does not wait for a writer, and the second check below refuses it
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
            with open(fd, "rb") as file:
                kind = _file_kind(os.fstat(fd).st_mode)
                if kind is None:
                    return file.read()
    except (OSError, ValueError) as err:  # ValueError: a NUL character in the path
        raise DataError(f"cannot read image file: {type(err).__name__}: {err}") from err
    raise DataError(f"not a regular file ({kind}): {os.fsdecode(path)!r}")


def _file_kind(mode: int) -> str | None:
    """None for a regular file, else what it is."""
    if stat.S_ISREG(mode):
        return None
    kinds = {
        stat.S_ISDIR: "a folder",
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISSOCK: "a socket",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
    }
    return next((name for test, name in kinds.items() if test(mode)), "not a file")


def normalisation(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, shift)``, float32 per channel, such that ``pixels * scale - shift`` is
    ``(pixels / 255 - mean) / std`` in one multiply-add."""
    mean_a = np.asarray(list(mean), dtype=np.float32)
    std_a = np.asarray(list(std), dtype=np.float32)
    return (1.0 / (255.0 * std_a)).astype(np.float32), (mean_a / std_a).astype(np.float32)


def normalise(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 ``(N, H, W, C)`` pixels → float32 ``(N, C, H, W)`` network input."""
    scale, shift = normalisation(mean, std)
    array = images.astype(np.float32) * scale - shift
    return np.ascontiguousarray(np.moveaxis(array, -1, -3))


class TooManyTokens(DataError):
    """A text of more tokens than the caller allows (before truncation)."""


class TextPreprocessor:
    """Tokenize texts to ``int64 (N, max_length)``: truncated, padded with ``pad_id``."""

    def __init__(self, tokenizer: Tokenizer, max_length: int, pad_id: int) -> None:
        pad_token = tokenizer.id_to_token(pad_id)
        if pad_token is None:
            raise BundleError(f"the tokenizer has no token with pad_id {pad_id}")
        tokenizer.enable_truncation(max_length=max_length)
        tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token, length=max_length)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = pad_id
        # the network's embedding has one row per token of the vocabulary
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))

    @classmethod
    def from_file(cls, path: str | Path, max_length: int, pad_id: int) -> TextPreprocessor:
        """Load a ``tokenizers`` JSON file (a bundle's ``tokenizer.json``)."""
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises plain Exception on a bad file
            raise BundleError(f"cannot load tokenizer '{path}': {err}") from err
        return cls(tokenizer, max_length, pad_id)

    @classmethod
    def from_json(cls, text: str, max_length: int, pad_id: int) -> TextPreprocessor:
        """Build from the tokenizer JSON itself (as a checkpoint's data spec holds it)."""
        try:
            tokenizer = Tokenizer.from_str(text)
        except Exception as err:  # tokenizers raises plain Exception on bad JSON
            raise BundleError(f"not a valid tokenizers JSON: {err}") from err
        return cls(tokenizer, max_length, pad_id)

    def __call__(self, texts: Sequence[str], max_tokens: int | None = None) -> np.ndarray:
        """``max_tokens``: refuse (``TooManyTokens``) a text of more tokens than this
        before truncation, instead of cutting it to ``max_length``."""
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise DataError(f"text #{i} is {type(text).__name__}, expected a string")
            if not text.strip():
                raise DataError(f"text #{i} is empty")
        if not texts:
            return np.zeros((0, self.max_length), dtype=np.int64)
        encodings = self.tokenizer.encode_batch(list(texts))
        if max_tokens is not None:
            for i, encoding in enumerate(encodings):
                count = _token_count(encoding)
                if count > max_tokens:
                    raise TooManyTokens(f"text #{i} has {count} tokens; the limit is {max_tokens}")
        return np.asarray([e.ids for e in encodings], dtype=np.int64)


def _token_count(encoding: Encoding) -> int:
    """The text's own tokens before truncation: the kept part and what truncation moved
    to ``overflowing``, without special tokens and padding."""
    return sum(
        attended and not special
        for part in (encoding, *encoding.overflowing)
        for attended, special in zip(part.attention_mask, part.special_tokens_mask, strict=True)
    )
