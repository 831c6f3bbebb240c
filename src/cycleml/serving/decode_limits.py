"""Bounds on the decoding work one request may ask for, checked before any of it starts:
pixels per image and per request (read from the image headers, which Pillow parses
without decoding the pixels) and characters per text."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from cycleml.inference.preprocess import TooManyTokens
from cycleml.serving.settings import LimitSettings


class DecodeLimitExceeded(Exception):
    """An image or text larger than a ``limits.*`` setting allows (HTTP 413)."""


def image_pixels(image: bytes | np.ndarray) -> int:
    """The pixel count of an encoded image from its header (nothing is decoded), or of
    a pixel array; 0 when the header cannot be read (decoding will then say why)."""
    if isinstance(image, np.ndarray):
        return int(image.shape[0] * image.shape[1]) if image.ndim >= 2 else int(image.size)
    try:
        with Image.open(io.BytesIO(image)) as pil:
            width, height = pil.size
    except Image.DecompressionBombError as err:
        raise DecodeLimitExceeded(f"image refused before decoding: {err}") from None
    except Exception:  # not an image: the decoder gives the one-line reason
        return 0
    return width * height


def check_images(images: Sequence[bytes | np.ndarray], limits: LimitSettings) -> None:
    """Refuse a request whose images hold more pixels than ``limits.max_image_pixels``
    each or ``limits.max_request_pixels`` together."""
    total = 0
    for index, image in enumerate(images):
        pixels = image_pixels(image)
        if pixels > limits.max_image_pixels:
            raise DecodeLimitExceeded(
                f"image #{index} has {pixels} pixels; the limit is {limits.max_image_pixels} "
                "per image (limits.max_image_pixels)"
            )
        total += pixels
    if total > limits.max_request_pixels:
        raise DecodeLimitExceeded(
            f"the request's {len(images)} images have {total} pixels; the limit is "
            f"{limits.max_request_pixels} per request (limits.max_request_pixels)"
        )


def check_texts(texts: Sequence[object], limits: LimitSettings) -> None:
    """Refuse a text longer than ``limits.max_text_chars`` before it is tokenized (what
    reaches the model is cut to the bundle's ``max_length`` tokens anyway; the
    characters bound the tokenizer's work and memory)."""
    for index, text in enumerate(texts):
        if isinstance(text, str) and len(text) > limits.max_text_chars:
            raise DecodeLimitExceeded(
                f"text #{index} has {len(text)} characters; the limit is "
                f"{limits.max_text_chars} (limits.max_text_chars)"
            )


def tokenize_within_limits(
    texts: list[str], tokenize: Callable[[list[str], int | None], np.ndarray], limits: LimitSettings
) -> np.ndarray:
    """Token ids of ``texts`` by ``tokenize`` (a model's ``preprocess_texts``), refusing a
    text over ``limits.max_text_chars`` before tokenizing and, when set, one over
    ``limits.max_text_tokens``."""
    check_texts(texts, limits)
    try:
        return tokenize(texts, limits.max_text_tokens)
    except TooManyTokens as err:
        raise DecodeLimitExceeded(f"{err} (limits.max_text_tokens)") from None
