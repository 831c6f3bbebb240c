"""Moving an alias as a compare-and-set inside the caller's transaction.

The change is one guarded statement (``UPDATE … WHERE version = <seen>``, ``DELETE …
WHERE version = <seen>``, or an ``INSERT`` that the primary key refuses when the alias
appeared meanwhile) whose row count says whether this writer won. SQLite serialises
writers; PostgreSQL re-checks the ``WHERE`` of a blocked ``UPDATE`` against the row
the winner committed, so on both exactly one of two racing moves changes the alias.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Final

from sqlalchemy import delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from cycleml.registry.errors import AliasConflict
from cycleml.registry.records import AliasMove
from cycleml.registry.tables import alias_moves, aliases


class _Any:
    def __repr__(self) -> str:
        return "ANY"

    def __reduce__(self) -> str:
        return "ANY"  # pickled by name: still the one sentinel in another process


ANY: Final[Any] = _Any()
"""``expected=ANY``: move the alias wherever it points now."""


def shown(version: int | None) -> str:
    return "nowhere (unset)" if version is None else f"version {version}"


def current_version(conn: Connection, model: str, alias: str) -> int | None:
    query = select(aliases.c.version).where(aliases.c.model == model, aliases.c.alias == alias)
    return conn.execute(query).scalar_one_or_none()


def lock_aliases(conn: Connection, model: str, names: list[str]) -> dict[str, int]:
    """``{alias: version}`` of those of ``names`` that exist, their rows locked until
    commit in name order on PostgreSQL (SQLite ignores the lock: its writers are serial)."""
    query = (
        select(aliases.c.alias, aliases.c.version)
        .where(aliases.c.model == model, aliases.c.alias.in_(names))
        .order_by(aliases.c.alias)
        .with_for_update()
    )
    return {alias: version for alias, version in conn.execute(query).all()}


def move_alias(
    conn: Connection,
    model: str,
    alias: str,
    to_version: int | None,
    expected: int | None | Any,
    who: str,
    reason: str,
    now: dt.datetime,
) -> AliasMove | None:
    """Point ``model@alias`` at ``to_version`` (None: delete it) if it still points at
    ``expected`` (ANY: wherever it is now); append the move to the audit table.

    Returns the move, or None when the alias already points at ``to_version``.
    Raises :class:`AliasConflict` when another writer moved the alias first.
    """
    current = current_version(conn, model, alias)
    if expected is not ANY and expected != current:
        raise AliasConflict(
            f"alias {model}@{alias} points to {shown(current)}, not {shown(expected)} "
            "as expected: it was moved meanwhile; check it and try again"
        )
    if current == to_version:
        return None
    where = (aliases.c.model == model, aliases.c.alias == alias)
    if current is None:
        row = {"model": model, "alias": alias, "version": to_version, "updated_at": now}
        changed = _insert_absent(conn, row)
    elif to_version is None:
        changed = conn.execute(delete(aliases).where(*where, aliases.c.version == current)).rowcount
    else:
        statement = update(aliases).where(*where, aliases.c.version == current)
        changed = conn.execute(statement.values(version=to_version, updated_at=now)).rowcount
    if changed != 1:
        raise AliasConflict(
            f"alias {model}@{alias} was moved by another writer while this move of it "
            f"(from {shown(current)} to {shown(to_version)}) was running; check it and try again"
        )
    move = AliasMove(model, alias, current, to_version, who, now, reason)
    conn.execute(
        insert(alias_moves).values(
            model=model,
            alias=alias,
            from_version=current,
            to_version=to_version,
            who=who,
            at=now,
            reason=reason,
        )
    )
    return move


def _insert_absent(conn: Connection, row: dict[str, Any]) -> int:
    """Insert the alias row unless the primary key exists; 1 if inserted, else 0
    (counted from RETURNING: not every driver reports a row count here)."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(aliases).values(**row).on_conflict_do_nothing()
    return len(conn.execute(statement.returning(aliases.c.alias)).all())
