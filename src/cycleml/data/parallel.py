"""Running a function over many files in worker processes, in chunks, with a progress bar."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from tqdm import tqdm

Item = TypeVar("Item")
Result = TypeVar("Result")

# chunks per worker: enough to balance uneven files, few enough to keep hand-offs cheap
CHUNKS_PER_WORKER = 8
MIN_CHUNK = 16
MAX_CHUNK = 512


def worker_count(workers: int | None) -> int:
    """``workers`` as a process count: None means one per CPU, 0 or less means 1."""
    return (os.cpu_count() or 1) if workers is None else max(int(workers), 1)


def chunk_size(items: int, workers: int) -> int:
    """Items per chunk for ``items`` spread over ``workers`` processes."""
    return min(max(math.ceil(items / (workers * CHUNKS_PER_WORKER)), MIN_CHUNK), MAX_CHUNK)


def map_in_chunks(
    work: Callable[[list[Item]], list[Result]],
    items: Sequence[Item],
    workers: int | None,
    desc: str,
    progress: bool = True,
) -> list[Result]:
    """``work`` over ``items`` in chunks, in ``workers`` processes, results in input order.

    ``workers`` None means one per CPU; 0 or 1 runs in this process, as does a single
    chunk (starting a process would cost more than it saves). ``work`` takes a list of
    items and returns one result per item; it must be a module-level function, and items
    and results should be small (paths, hashes), since they are pickled to the workers.
    """
    if not items:
        return []
    workers = worker_count(workers)
    size = chunk_size(len(items), workers)
    chunks = [list(items[i : i + size]) for i in range(0, len(items), size)]
    results: list[Result] = []
    with tqdm(total=len(items), desc=desc, unit="item", disable=not progress, leave=False) as bar:
        if workers == 1 or len(chunks) == 1:
            for chunk in chunks:
                results.extend(work(chunk))
                bar.update(len(chunk))
            return results
        with ProcessPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
            for chunk, done in zip(chunks, pool.map(work, chunks), strict=True):
                results.extend(done)
                bar.update(len(chunk))
    return results
