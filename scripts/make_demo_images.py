#!/usr/bin/env python
"""Write a deterministic image-folder dataset: <out>/<shape>/<n>.png|jpg.

Four classes of drawn shapes (circle, square, triangle, cross) with random colour,
size, position and background, in varied image sizes, RGB and grey, PNG and JPEG,
so the image-folder loader meets what real folders hold.

    python scripts/make_demo_images.py data/demo_images --per-class 60 --seed 0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "cross")


def draw_shape(shape: str, rng: np.random.Generator) -> Image.Image:
    size = int(rng.integers(32, 72))
    background = tuple(int(v) for v in rng.integers(0, 90, 3))
    colour = tuple(int(v) for v in rng.integers(140, 256, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    extent = rng.uniform(0.45, 0.8) * size
    cx, cy = rng.uniform(0.4, 0.6, 2) * size
    x0, y0, x1, y1 = cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    else:
        bar = extent / 4
        draw.rectangle((cx - bar / 2, y0, cx + bar / 2, y1), fill=colour)
        draw.rectangle((x0, cy - bar / 2, x1, cy + bar / 2), fill=colour)
    noise = rng.normal(0, 8, (size, size, 3))
    array = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def make_demo_images(out: Path, per_class: int = 60, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for shape in CLASSES:
        folder = out / shape
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = draw_shape(shape, rng)
            if rng.random() < 0.2:
                image = image.convert("L")
            if rng.random() < 0.3:
                image.save(folder / f"{i:04d}.jpg", quality=90)
            else:
                image.save(folder / f"{i:04d}.png")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, nargs="?", default=Path("data/demo_images"))
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_demo_images(args.out, args.per_class, args.seed)
    print(f"wrote {args.per_class * len(CLASSES)} images in {len(CLASSES)} classes to {args.out}")


if __name__ == "__main__":
    main()
