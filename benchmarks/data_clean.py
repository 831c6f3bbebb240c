"""Cleaning throughput: images/s of `cycleml data clean`, in one process and in parallel workers.

    python benchmarks/data_clean.py                       # 5,000 images, 1 vs 2 workers
    python benchmarks/data_clean.py --images 2000 --workers 4

Generates smooth random RGB pictures as PNG files (with a few exact and near copies, so
the duplicate search has work), gathers them into a dataset directory, then cleans it
with ``workers=1`` (the baseline) and with ``--workers`` processes, in this process,
and prints images/s for each and their ratio.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cycleml.data.clean import CleanSettings, clean
from cycleml.data.gather import gather


def write_pictures(root: Path, count: int, size: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(count):
        label = f"class{i % 10}"
        (root / label).mkdir(parents=True, exist_ok=True)
        if i % 50 == 49:  # a slightly changed copy of the previous picture of its class
            source = np.asarray(Image.open(root / label / f"{i - 10:05d}.png"), dtype=np.int16)
            pixels = np.clip(source + rng.integers(-3, 4, source.shape), 0, 255).astype(np.uint8)
        else:
            grid = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            pixels = np.asarray(
                Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC)
            )
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        (root / label / f"{i:05d}.png").write_bytes(buffer.getvalue())


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the workers)."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_clean(dataset: Path, output: Path, workers: int) -> tuple[float, float, dict[str, int]]:
    """Wall and CPU seconds of one clean, and what it found."""
    settings = CleanSettings(workers=workers, progress=False)
    cpu, start = _cpu_seconds(), time.perf_counter()
    result = clean(dataset, output, settings)
    return time.perf_counter() - start, _cpu_seconds() - cpu, result.counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000, help="pictures to generate")
    parser.add_argument("--size", type=int, default=96, help="picture side in pixels")
    parser.add_argument("--workers", type=int, default=2, help="parallel worker processes")
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting; the best counts")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_pictures(root / "raw", args.images, args.size)
        sources = {"pictures": {"kind": "image_folder", "path": str(root / "raw")}}
        gather(sources, root / "dataset", workers=args.workers, progress=False)
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} before cleaning")
        wall, cpu_used = {}, {}
        for workers in (1, args.workers):
            best, best_cpu = float("inf"), float("inf")
            for repeat in range(args.repeats):
                output = root / f"clean-{workers}-{repeat}"
                seconds, cpu, counts = time_clean(root / "dataset", output, workers)
                best, best_cpu = min(best, seconds), min(best_cpu, cpu)
            wall[workers], cpu_used[workers] = best, best_cpu
            found = {k: v for k, v in counts.items() if v}
            print(
                f"workers={workers}: {args.images} images in {best:.2f} s = "
                f"{args.images / best:,.0f} images/s, {best_cpu:.2f} CPU s  (found {found})"
            )
        print(f"load average {os.getloadavg()[0]:.1f} after cleaning")
    print(f"speed-up with {args.workers} workers over 1: {wall[1] / wall[args.workers]:.2f}x")
    # CPU seconds the parallel path spends beyond the serial one (process start, pickling):
    # near 1.0x means a speed-up below the worker count comes from busy cores, not overhead
    print(f"CPU seconds with {args.workers} workers over 1: "
          f"{cpu_used[args.workers] / cpu_used[1]:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
