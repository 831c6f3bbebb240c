"""The default name of a bundle: what the model was trained on, in words a user chose.

A data config with a ``path`` names the bundle after it (``data/demo_text/reviews.csv``
→ ``reviews``, ``data/gathered-clean`` → ``gathered-clean``); data without a path after
the data config it was chosen by (``data=digits`` → ``digits``, read from the run's
``.hydra/hydra.yaml``), else after the data module (``DigitsDataModule`` → ``digits``).
The name is a folder and a URL segment, so any character other
than letters, digits, ``.``, ``_`` and ``-`` becomes ``-``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
FALLBACK_NAME = "model"


def bundle_name(data_config: Mapping[str, Any], run_dir: Path | None = None) -> str:
    """The bundle name for a model trained on ``data_config`` in ``run_dir``."""
    path = data_config.get("path")
    if path:
        candidate = Path(str(path)).expanduser()
        name = candidate.stem if candidate.suffix else candidate.name
    else:
        name = _data_choice(run_dir) or _module_name(data_config)
    safe = _UNSAFE.sub("-", name).strip("-.") or FALLBACK_NAME
    log.debug("bundle name %s (data path %s, run %s)", safe, path, run_dir)
    return safe


def _data_choice(run_dir: Path | None) -> str | None:
    """The ``data`` config group option the run was composed with, if recorded."""
    if run_dir is None:
        return None
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if not hydra_file.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        choice = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.choices.data")
    except Exception as err:  # a damaged file only loses the name
        log.debug("cannot read %s: %s", hydra_file, err)
        return None
    return str(choice) if choice else None


def _module_name(data_config: Mapping[str, Any]) -> str:
    """``cycleml.data.images.DigitsDataModule`` → ``digits`` (a run without its
    ``.hydra`` folder)."""
    target = str(data_config.get("_target_", FALLBACK_NAME)).rsplit(".", 1)[-1]
    stem = target.removesuffix("DataModule") or FALLBACK_NAME
    return "".join(f"-{c.lower()}" if c.isupper() else c for c in stem).lstrip("-")
