"""Input keys as the database can store them, with the original kept recoverable.

A key comes from a file name or a table cell and may hold what a text column cannot:
bytes that are not UTF-8 (file names, which Python decodes with ``surrogateescape``),
a NUL character (PostgreSQL refuses it in text) or more characters than the
``input_key`` column. Such an input is not predicted: it becomes an error row whose
``input_key`` is a readable, escaped form of the key and whose ``original_key`` holds
the exact key as bytes (a file name's own bytes; ``os.fsdecode`` gives the Python
name back). Escaping: every byte that is not UTF-8 becomes ``\\xNN`` and NUL becomes
``\\x00``; a key still too long keeps its start and ends in ``#`` and the first 16 hex
digits of the SHA-256 of its bytes, so two long keys stay apart.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

# the length of the input_key columns (characters)
MAX_KEY_CHARS = 1024
_HASH_CHARS = 16


@dataclass(frozen=True)
class StorableKey:
    """``text`` goes into ``input_key``; when it differs from the key, ``original``
    holds the key's exact bytes and ``problem`` says why it was changed."""

    text: str
    original: bytes | None = None
    problem: str | None = None


def key_bytes(key: str) -> bytes:
    """The exact bytes of a key (a file name's undecodable bytes included)."""
    return key.encode("utf-8", "surrogateescape")


def storable_text(text: str) -> str:
    """``text`` with undecodable bytes as ``\\xNN`` and NUL as ``\\x00``: text that
    every database stores (used for reasons that quote a path, too)."""
    if text.isascii() and "\x00" not in text:
        return text
    escaped = key_bytes(text).decode("utf-8", "backslashreplace")
    return escaped.replace("\x00", "\\x00")


def storable_key(key: str) -> StorableKey:
    """``key`` as it can be stored; see the module's description."""
    problems = []
    if "\x00" in key:
        problems.append("contains a NUL character")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        problems.append("is not valid UTF-8")
    text = storable_text(key) if problems else key
    if len(text) > MAX_KEY_CHARS:
        problems.append(f"is longer than {MAX_KEY_CHARS} characters ({len(key)})")
        digest = hashlib.sha256(key_bytes(key)).hexdigest()[:_HASH_CHARS]
        text = f"{text[: MAX_KEY_CHARS - _HASH_CHARS - 1]}#{digest}"
    if not problems:
        return StorableKey(key)
    problem = (
        f"input key {' and '.join(problems)}; stored escaped, the exact key is in original_key"
    )
    return StorableKey(text, key_bytes(key), problem)
