"""Content hashes and dataset fingerprints.

A dataset's fingerprint is the hash of its items' content hashes and labels (and
split, where one is assigned), independent of file names and order, so the same
data gathered twice gives the same fingerprint and changing one label changes it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def content_hash(data: bytes | str) -> str:
    """SHA-256 hex digest of raw bytes (files, pixel buffers) or UTF-8 text."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def dataset_fingerprint(entries: Iterable[tuple[str, ...]]) -> str:
    """Fingerprint of ``(content_hash, label[, split])`` tuples, order-independent.

    Returns the first 16 hex digits of a SHA-256 over the sorted entries.
    """
    digest = hashlib.sha256()
    for entry in sorted("\x1f".join(str(part) for part in e) for e in entries):
        digest.update(entry.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()[:16]
