"""Image decoding for batch prediction, in worker processes.

Decoding a small image is mostly Python work in PIL, which would hold the GIL that
the model and database stages need; worker processes each take a slice of a batch
and send back one stacked array, so the cost of crossing processes is paid per
slice, not per image.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from cycleml.errors import DataError
from cycleml.inference.preprocess import ImagePreprocessor

DecodedSlice = tuple[np.ndarray, list[int], list[tuple[int, str]]]
# an image file's path (text is cheaper to send to a worker than a Path) or its bytes
ImageSource = str | bytes


def decode_images(
    preprocessor: ImagePreprocessor, values: Sequence[ImageSource], offset: int = 0
) -> DecodedSlice:
    """Decode ``values``: ``(stacked uint8 images, their positions, [(position, reason)])``
    with positions counted from ``offset``."""
    arrays: list[np.ndarray] = []
    positions: list[int] = []
    failures: list[tuple[int, str]] = []
    for i, value in enumerate(values, start=offset):
        try:
            arrays.append(
                preprocessor.decode_file(value) if isinstance(value, str) else preprocessor(value)
            )
            positions.append(i)
        except DataError as err:
            failures.append((i, str(err)))
    shape = (0, preprocessor.height, preprocessor.width, preprocessor.channels)
    stacked = np.stack(arrays) if arrays else np.zeros(shape, np.uint8)
    return stacked, positions, failures


def _exit_with_parent(parent_pid: int) -> None:
    """In a worker: exit as soon as the parent is gone (e.g. killed with SIGKILL), which
    the pool itself would not notice while the worker waits for work."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class ImageDecoder:
    """Decodes batches of images on ``workers`` processes, or in the calling thread
    when 0.

    On Linux the workers are forked, all at once, when the decoder is made: create
    it before ONNX Runtime sessions and threads exist, so the children start from a
    single-threaded parent. Elsewhere they are spawned (which re-imports ``__main__``;
    scripts need the usual ``if __name__ == "__main__":`` guard).
    """

    def __init__(self, preprocessor: ImagePreprocessor, workers: int) -> None:
        self.preprocessor = preprocessor
        self.workers = max(0, int(workers))
        self._pool: ProcessPoolExecutor | None = None
        if self.workers:
            method = "fork" if sys.platform == "linux" else "spawn"
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context(method),
                initializer=_exit_with_parent,
                initargs=(os.getpid(),),
            )
            # start every worker now (a fork pool launches them all on first use)
            self._pool.submit(int).result()

    def __call__(self, values: Sequence[ImageSource]) -> DecodedSlice:
        if self._pool is None or len(values) < 2:
            return decode_images(self.preprocessor, values)
        step = -(-len(values) // self.workers)
        futures = [
            self._pool.submit(decode_images, self.preprocessor, values[start : start + step], start)
            for start in range(0, len(values), step)
        ]
        parts = [future.result() for future in futures]
        stacked = np.concatenate([p[0] for p in parts])
        positions = [i for p in parts for i in p[1]]
        failures = [f for p in parts for f in p[2]]
        return stacked, positions, failures

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ImageDecoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
