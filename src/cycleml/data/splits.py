"""Reproducible train/val/test splits."""

from __future__ import annotations

import numpy as np

from cycleml.errors import ConfigError

SPLITS = ("train", "val", "test")


def split_indices(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int = 0
) -> dict[str, np.ndarray]:
    """Stratified split of item indices into train/val/test, reproducible from ``seed``.

    Every class contributes its share to each split (rounded), so small classes are
    not left out of validation or test. Indices within a split are sorted.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(
            "data.val_fraction and data.test_fraction must be in [0, 1) and sum to less than 1, "
            f"got {val_fraction} and {test_fraction}"
        )
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * test_fraction))
        n_val = int(round(len(idx) * val_fraction))
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    return {
        name: np.sort(np.concatenate(chunks)).astype(np.int64) for name, chunks in parts.items()
    }
