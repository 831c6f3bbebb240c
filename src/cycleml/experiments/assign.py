"""Stable assignment of units to arms.

A unit id (a user, a session) is hashed with the experiment's salt and name into one
of :data:`BUCKETS` buckets; the arms own consecutive ranges of buckets in proportion
to their weights, in sorted arm order. The hash is SHA-256, so the same unit gets the
same arm in every process and after every restart, and a ramp that moves weight from
one of two arms to the other only moves the units at the boundary.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Mapping

BUCKETS = 10_000
_SEPARATOR = b"\x00"


def _prefix(salt: str, experiment: str) -> bytes:
    return salt.encode() + _SEPARATOR + experiment.encode() + _SEPARATOR


def bucket(salt: str, experiment: str, unit: str) -> int:
    """The unit's bucket in ``[0, BUCKETS)``: SHA-256 of (salt, experiment, unit)."""
    digest = hashlib.sha256(_prefix(salt, experiment) + unit.encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def boundaries(weights: Mapping[str, float]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Arms in sorted order and the exclusive upper bucket of each one's range.

    Arms with weight 0 own an empty range. Raises ``ValueError`` when the weights do
    not sum to a positive finite number.
    """
    arms = tuple(sorted(weights))
    values = [float(weights[arm]) for arm in arms]
    total = math.fsum(values)
    if not arms or not math.isfinite(total) or total <= 0 or min(values) < 0:
        raise ValueError(f"weights {dict(weights)} must be ≥ 0 and sum to a positive number")
    uppers = []
    running = 0.0
    for value in values:
        running += value
        uppers.append(round(running / total * BUCKETS))
    uppers[-1] = BUCKETS
    return arms, tuple(uppers)


def pick_arm(bucket: int, weights: Mapping[str, float]) -> str:
    """The arm owning ``bucket`` under ``weights`` (see :func:`boundaries`)."""
    arms, uppers = boundaries(weights)
    return arms[bisect.bisect_right(uppers, bucket)]


class Assigner:
    """Precomputed assignment for one experiment revision: cheap enough for the event loop.

    The hash state of the (salt, experiment) prefix and the cumulative bucket ranges
    are computed once; :meth:`assign` then hashes only the unit id.
    """

    __slots__ = ("_arms", "_hasher", "_uppers")

    def __init__(self, salt: str, experiment: str, weights: Mapping[str, float]) -> None:
        self._arms, self._uppers = boundaries(weights)
        self._hasher = hashlib.sha256(_prefix(salt, experiment))

    def bucket(self, unit: str) -> int:
        hasher = self._hasher.copy()
        hasher.update(unit.encode())
        return int.from_bytes(hasher.digest()[:8], "big") % BUCKETS

    def assign(self, unit: str | None) -> str:
        """The unit's arm; ``None`` (no unit id) draws a random bucket."""
        if unit is None:
            slot = random.randrange(BUCKETS)
        else:
            hasher = self._hasher.copy()
            hasher.update(unit.encode())
            slot = int.from_bytes(hasher.digest()[:8], "big") % BUCKETS
        return self._arms[bisect.bisect_right(self._uppers, slot)]
