"""Where the shipped Hydra configs live: inside the wheel, or at the repository root."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

# `${cwd:}`: the directory cycleml was started from. Unlike `${hydra:runtime.cwd}` it
# resolves before Hydra's job config exists (multirun sweep folders need it then).
if not OmegaConf.has_resolver("cwd"):
    OmegaConf.register_new_resolver("cwd", os.getcwd)


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
