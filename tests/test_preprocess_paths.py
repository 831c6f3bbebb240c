"""One image path: an image file gives the same network input whether it is read for
training (the image data modules) or for serving and prediction (ImagePreprocessor and
the exported graph's normalisation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cycleml.data.images import AugmentedImages, DigitsDataModule, ImageFolderDataModule
from cycleml.export.graph import ImageInferenceNet
from cycleml.inference.preprocess import ImagePreprocessor

MEAN, STD = [0.2, 0.4, 0.6], [0.3, 0.25, 0.5]


def odd_images(folder: Path) -> list[Path]:
    """PNG files of the kinds users have: grey, RGB, with alpha, palette, odd sizes."""
    rng = np.random.default_rng(5)
    rgba = rng.integers(0, 256, (13, 9, 4), dtype=np.uint8)
    images = {
        "grey.png": Image.fromarray(rng.integers(0, 256, (7, 11), dtype=np.uint8), "L"),
        "rgb.png": Image.fromarray(rng.integers(0, 256, (23, 5, 3), dtype=np.uint8), "RGB"),
        "rgba.png": Image.fromarray(rgba, "RGBA"),
        "grey_alpha.png": Image.fromarray(rgba[..., :2], "LA"),
        "palette.png": Image.fromarray(rgba[..., :3], "RGB").quantize(17),
        "exact.png": Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8), "RGB"),
    }
    paths = []
    for name, image in images.items():
        class_dir = folder / ("a" if len(paths) % 2 else "b")
        class_dir.mkdir(parents=True, exist_ok=True)
        image.save(class_dir / name)
        paths.append(class_dir / name)
    return paths


class _Recorder(nn.Module):
    """Stands in for the network: keeps what the graph feeds it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x.clone()
        return x.flatten(1)


def serving_input(
    path: Path, size: tuple[int, int], channels: int, **resize: object
) -> torch.Tensor:
    pixels = ImagePreprocessor(size, channels, **resize).decode_file(path)
    recorder = _Recorder()
    graph = ImageInferenceNet(recorder, MEAN[:channels], STD[:channels])
    graph(torch.tensor(pixels[None]))
    return recorder.seen[0]


RESIZES = {
    "stretch": {},
    "crop": {"resize_mode": "shorter_side_crop", "crop_fraction": 0.875},
    "crop_bicubic": {
        "resize_mode": "shorter_side_crop", "crop_fraction": 0.6, "interpolation": "bicubic"
    },
}  # fmt: skip


@pytest.mark.parametrize("resize", RESIZES)
@pytest.mark.parametrize("channels", [1, 3])
def test_an_image_file_gives_the_same_tensor_for_training_and_serving(tmp_path, channels, resize):
    paths = odd_images(tmp_path / "images")
    size = (12, 10)
    module = ImageFolderDataModule(
        path=str(tmp_path / "images"), image_size=list(size), channels=channels,
        mean=MEAN[:channels], std=STD[:channels], val_fraction=0.0, test_fraction=0.0,
        **RESIZES[resize],
    )  # fmt: skip
    module.setup()
    by_id = dict(zip(module.item_ids, module.images, strict=True))
    for path in paths:
        image = by_id[str(path.relative_to(tmp_path / "images"))]
        training = AugmentedImages(image[None], np.zeros(1), MEAN[:channels], STD[:channels])
        train_tensor, _ = training[0]
        assert train_tensor.shape == (channels, *size)
        torch.testing.assert_close(
            train_tensor,
            serving_input(path, size, channels, **RESIZES[resize]),
            rtol=0,
            atol=1e-6,
            msg=path.name,
        )


def test_training_decodes_with_the_serving_preprocessor(tmp_path, monkeypatch):
    """The data modules have no resizing of their own: every image they load goes
    through ImagePreprocessor."""
    seen: list[tuple[int, ...]] = []
    original = ImagePreprocessor._from_pil

    def counting(self: ImagePreprocessor, pil: Image.Image) -> np.ndarray:
        seen.append(pil.size)
        return original(self, pil)

    monkeypatch.setattr(ImagePreprocessor, "_from_pil", counting)
    odd_images(tmp_path / "images")
    folder = ImageFolderDataModule(path=str(tmp_path / "images"), image_size=8, channels=3)
    folder.setup()
    assert len(seen) == 6
    seen.clear()
    digits = DigitsDataModule(image_size=16, channels=1)
    digits.setup()
    assert len(seen) == 1797
    # the digits are 8x8 values 0..16, scaled to pixels, then resized like any image
    from sklearn.datasets import load_digits

    raw = np.round(load_digits().images[0] * (255.0 / 16.0)).astype(np.uint8)
    np.testing.assert_array_equal(digits.images[0], ImagePreprocessor((16, 16), 1)(raw))


def _gradient(width: int, height: int) -> Image.Image:
    """An RGB image whose pixels say where they are: red = column, green = row."""
    cols = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    rows = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([cols, rows, np.full_like(cols, 128)], -1).astype(np.uint8))


@pytest.mark.parametrize("width,height", [(301, 173), (97, 255), (224, 224)])
def test_a_shorter_side_crop_is_timms_resize_then_centre_crop(width, height):
    """The centre crop_fraction of the shorter side, aspect ratio kept, equals resizing
    the shorter side to size / crop_fraction and cutting out the centre (timm's
    evaluation transform), up to the rounding of the intermediate size."""
    size, fraction = 64, 0.875
    image = _gradient(width, height)
    got = ImagePreprocessor((size, size), 3, "shorter_side_crop", fraction)(image)
    scaled = size / fraction / min(width, height)
    big = image.resize((round(width * scaled), round(height * scaled)), Image.Resampling.BILINEAR)
    left, top = (big.width - size) // 2, (big.height - size) // 2
    expected = np.asarray(big.crop((left, top, left + size, top + size)))
    assert got.shape == (size, size, 3)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 3
    # the crop keeps the aspect ratio: a stretched image would span every column
    stretched = ImagePreprocessor((size, size), 3)(image)
    span = got[..., 0].max() - got[..., 0].min()
    if width > height:
        assert span < 0.8 * (stretched[..., 0].max() - stretched[..., 0].min())
    # an image already at the model's size is still cropped (training and serving agree)
    at_size = np.asarray(image.resize((size, size)))
    assert not np.array_equal(
        ImagePreprocessor((size, size), 3, "shorter_side_crop", fraction)(at_size), at_size
    )
    assert np.array_equal(ImagePreprocessor((size, size), 3)(at_size), at_size)


def test_bad_resize_settings_are_errors_naming_them():
    from cycleml.errors import ConfigError, DataError

    with pytest.raises(DataError, match="resize mode 'squash'"):
        ImagePreprocessor((8, 8), 3, "squash")
    with pytest.raises(DataError, match=r"crop fraction must be a number in \(0, 1\], got 1.5"):
        ImagePreprocessor((8, 8), 3, "shorter_side_crop", 1.5)
    with pytest.raises(ConfigError, match="resize filter 'lanczos'"):
        DigitsDataModule(image_size=8, interpolation="lanczos")
