"""API-key authentication: ``Authorization: Bearer <key>``, compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Iterable


class ApiKeyAuth:
    """Accepts a request whose bearer token equals one of the configured keys.

    Every key is compared (no early exit), each with :func:`hmac.compare_digest`, so the
    time taken says nothing about which key or how much of it matched. Keys are held as
    bytes and never logged or shown in errors.
    """

    def __init__(self, keys: Iterable[str], public_paths: Iterable[str] = ()) -> None:
        self._keys = [key.encode() for key in keys if key]
        if not self._keys:
            raise ValueError("API-key authentication needs at least one key")
        self.public_paths = frozenset(public_paths)

    def __repr__(self) -> str:
        return f"ApiKeyAuth({len(self._keys)} key(s), public={sorted(self.public_paths)})"

    def allows(self, authorization: bytes | None) -> bool:
        """Whether an ``Authorization`` header value carries a valid key."""
        if not authorization:
            return False
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(token, key)
        return matched
