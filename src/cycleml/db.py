"""The one database layer (SQLAlchemy Core) for everything cycleml persists at run time.

Each part declares its tables on :data:`metadata` and opens the database with
:func:`open_database`. SQLite (``sqlite:///file.db``, the default: embedded, zero
setup) and PostgreSQL (``postgresql+psycopg://user@host/db``) are supported; writes
that must be idempotent use :func:`insert_new_rows`, which skips rows whose unique
key already exists in either dialect.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, MetaData, Table, create_engine, event, exc, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, make_url

from cycleml.errors import ConfigError

log = logging.getLogger(__name__)

metadata = MetaData()

SUPPORTED_BACKENDS = ("sqlite", "postgresql")


def open_database(url: str | URL, create: Sequence[Table] = ()) -> Engine:
    """An engine for ``url`` after a test connection, with ``create`` tables made.

    SQLite files get their folder created and run in WAL mode with a busy timeout,
    so readers and one writer from several threads or processes do not block each
    other. A bad URL, a missing driver or an unreachable server is a
    :class:`ConfigError` naming the (password-free) URL.
    """
    try:
        parsed = make_url(url)
    except exc.ArgumentError as err:
        raise ConfigError(f"db_url '{url}' is not a database URL: {err}") from err
    shown = safe_url(parsed)
    if parsed.get_backend_name() not in SUPPORTED_BACKENDS:
        raise ConfigError(
            f"db_url '{shown}': unsupported database '{parsed.get_backend_name()}'; "
            "use sqlite:///path.db or postgresql+psycopg://user@host:5432/db"
        )
    options: dict[str, Any] = {"future": True}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        options["connect_args"] = {"timeout": 30}
    else:
        options["pool_pre_ping"] = True
    try:
        engine = create_engine(parsed, **options)
    except ModuleNotFoundError as err:
        raise ConfigError(
            f"db_url '{shown}' needs the database driver '{err.name}'; "
            "install it (PostgreSQL: pip install 'cycleml[postgres]')"
        ) from err
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except exc.SQLAlchemyError as err:
        engine.dispose()
        reason = str(getattr(err, "orig", err)).strip().splitlines()[0]
        raise ConfigError(f"cannot connect to database '{shown}': {reason}") from err
    if create:
        metadata.create_all(engine, tables=list(create))
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def safe_url(url: str | URL) -> str:
    """The URL as text with any password hidden, for logs and errors."""
    return make_url(url).render_as_string(hide_password=True)


def insert_new_rows(conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]]) -> int:
    """Insert ``rows``, skipping any that collide with a unique key already present.

    Returns how many rows were inserted, or -1 where the driver does not report it.
    """
    if not rows:
        return 0
    dialect = conn.dialect.name
    if dialect == "postgresql":
        statement = postgresql.insert(table).on_conflict_do_nothing()
    elif dialect == "sqlite":
        statement = sqlite.insert(table).on_conflict_do_nothing()
    else:
        raise ConfigError(f"unsupported database dialect '{dialect}'")
    return int(conn.execute(statement, list(rows)).rowcount)


def chunked(values: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    """``values`` in slices of at most ``size`` (bounded ``IN (...)`` lists)."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


def utc_now() -> dt.datetime:
    """The current time, timezone-aware UTC (what every timestamp column stores)."""
    return dt.datetime.now(dt.timezone.utc)
