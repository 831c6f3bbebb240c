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


def serving_input(path: Path, size: tuple[int, int], channels: int) -> torch.Tensor:
    pixels = ImagePreprocessor(size, channels).decode_file(path)
    recorder = _Recorder()
    graph = ImageInferenceNet(recorder, MEAN[:channels], STD[:channels])
    graph(torch.tensor(pixels[None]))
    return recorder.seen[0]


@pytest.mark.parametrize("channels", [1, 3])
def test_an_image_file_gives_the_same_tensor_for_training_and_serving(tmp_path, channels):
    paths = odd_images(tmp_path / "images")
    size = (12, 10)
    module = ImageFolderDataModule(
        path=str(tmp_path / "images"), image_size=list(size), channels=channels,
        mean=MEAN[:channels], std=STD[:channels], val_fraction=0.0, test_fraction=0.0,
    )  # fmt: skip
    module.setup()
    by_id = dict(zip(module.item_ids, module.images, strict=True))
    for path in paths:
        image = by_id[str(path.relative_to(tmp_path / "images"))]
        training = AugmentedImages(image[None], np.zeros(1), MEAN[:channels], STD[:channels])
        train_tensor, _ = training[0]
        assert train_tensor.shape == (channels, *size)
        torch.testing.assert_close(
            train_tensor, serving_input(path, size, channels), rtol=0, atol=1e-6, msg=path.name
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
