"""Reading a training checkpoint without running code from it.

A ``.ckpt`` is a pickle: unpickled in full, it can run any command. Checkpoints are
read with ``torch.load(weights_only=True)``, whose unpickler builds only tensors,
numbers, strings and plain containers, and refuses every other type before creating it.
Our checkpoints need nothing more: ``ClassifierModule`` stores its hyperparameters as
plain dicts and lists (``OmegaConf.to_container``), and Lightning's loop, callback,
optimizer and scheduler states are plain containers of tensors and numbers. So the
allow-list of extra types (``torch.serialization.add_safe_globals``) stays empty.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

from cycleml.errors import ConfigError


def read_checkpoint(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    """The contents of checkpoint ``path``; a :class:`ConfigError` if it holds anything but
    tensors and plain values, or is not a checkpoint at all."""
    import torch

    if not zipfile.is_zipfile(path):
        # torch.save (and so Lightning) writes a zip archive; anything else is no checkpoint
        raise ConfigError(f"checkpoint '{path}' is not a readable PyTorch checkpoint (no zip)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        asked = f"it asks for {found.group(1)}" if found else "it holds objects of other types"
        raise ConfigError(
            f"checkpoint '{path}' refused: {asked}, and a checkpoint may hold only tensors and "
            "plain values (anything else could run code when loaded); treat checkpoints from "
            "others as you would their code"
        ) from None
    except Exception as err:  # torch raises many kinds for a file that is no checkpoint
        raise ConfigError(
            f"checkpoint '{path}' is not a readable PyTorch checkpoint ({type(err).__name__})"
        ) from None
    if not isinstance(checkpoint, dict):
        raise ConfigError(f"checkpoint '{path}' holds a {type(checkpoint).__name__}, not a dict")
    return checkpoint
