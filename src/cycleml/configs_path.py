"""Where the shipped Hydra configs live: inside the wheel, or at the repository root."""

from __future__ import annotations

from pathlib import Path


def config_dir() -> str:
    """Absolute path of the primary config directory.

    A wheel install carries the configs as ``cycleml/configs``; an editable install
    reads the top-level ``configs/`` of the source tree.
    """
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parents[1] / "configs"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(
        f"cycleml configs not found next to {here}; reinstall the package (pip install .)"
    )
