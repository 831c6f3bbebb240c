"""The process's umask, for files and folders made private by their creator (mkdtemp,
mkstemp) that end up as ordinary user files."""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The umask, read without changing it where the system allows (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # elsewhere: set and restore; the stricter mask in between is harmless
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def as_if_created(path: str | Path, directory: bool) -> None:
    """Give ``path`` the mode a plain ``mkdir`` / ``open`` would have: 0777 or 0666 less
    the umask (mkdtemp and mkstemp create 0700 / 0600)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())
