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
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, MetaData, Table, create_engine, event, exc, inspect, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, make_url

from cycleml.errors import ConfigError

log = logging.getLogger(__name__)

metadata = MetaData()

SUPPORTED_BACKENDS = ("sqlite", "postgresql")
_CREATE_ATTEMPTS = 5
_SQLITE_BUSY_MS = 30_000


def open_database(
    url: str | URL,
    create: Sequence[Table] = (),
    check_layout: bool = True,
    must_exist: bool = False,
) -> Engine:
    """An engine for ``url`` after a test connection, with ``create`` tables made.

    SQLite files get their folder created and run in WAL mode with a busy timeout,
    so readers and one writer from several threads or processes do not block each
    other. With ``must_exist`` (commands that only read, or change records already
    there) a missing SQLite file is a :class:`ConfigError` naming it, and no file or
    folder is created: a mistyped path is not answered as an empty database. A bad
    URL, a missing driver or an unreachable server is a
    :class:`ConfigError` naming the (password-free) URL, and so (with
    ``check_layout``) is a table of ``create`` that already exists without the columns
    cycleml reads and writes: another program's table of the same name, or an older
    layout, which the create leaves as it is.
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
    options: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            path = Path(database).expanduser()
            if must_exist and not path.exists():
                raise ConfigError(
                    f"database file '{path}' does not exist (db_url '{shown}'); check the "
                    "path: this command needs an existing database and creates none"
                )
            path.parent.mkdir(parents=True, exist_ok=True)
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
        raise ConfigError(f"cannot connect to database '{shown}': {_reason(err)}") from err
    if create:
        _create_tables(engine, create, shown)
        if check_layout:
            missing = missing_columns(engine, create)
            if missing:
                engine.dispose()
                table, columns = next(iter(missing.items()))
                raise ConfigError(
                    f"table {table} in database '{shown}' lacks the column(s) "
                    f"{', '.join(columns)} that cycleml reads and writes: another program's "
                    f"table of that name, or an older layout; use another database or rename "
                    f"the table (ALTER TABLE {table} RENAME TO {table}_old)"
                )
    return engine


def missing_columns(engine: Engine, tables: Sequence[Table]) -> dict[str, list[str]]:
    """The columns of each of ``tables`` that its table in the database lacks (tables
    the database does not have are left out)."""
    inspector = inspect(engine)
    missing: dict[str, list[str]] = {}
    for table in tables:
        if not inspector.has_table(table.name):
            continue
        present = {column["name"] for column in inspector.get_columns(table.name)}
        absent = [column.name for column in table.columns if column.name not in present]
        if absent:
            missing[table.name] = absent
    return missing


def _create_tables(engine: Engine, tables: Sequence[Table], shown: str) -> None:
    """Create the missing ``tables``. Jobs started together on a new database (the
    shards of one run) race to create them: one that loses finds them made by another
    between its check and its CREATE, and fails; it then checks again."""
    for attempt in range(1, _CREATE_ATTEMPTS + 1):
        try:
            metadata.create_all(engine, tables=list(tables))
            return
        except exc.SQLAlchemyError as err:
            if attempt == _CREATE_ATTEMPTS:
                engine.dispose()
                names = ", ".join(table.name for table in tables)
                raise ConfigError(
                    f"cannot create the tables {names} in database '{shown}': {_reason(err)}"
                ) from err
            log.debug("creating tables, attempt %d: %s", attempt, err)


def _reason(err: exc.SQLAlchemyError) -> str:
    """The driver's own message, first line only (SQLAlchemy appends the statement)."""
    return str(getattr(err, "orig", err)).strip().splitlines()[0]


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_MS}")
    _use_wal(cursor)
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _use_wal(cursor: Any) -> None:
    """Switch the database to WAL. When several connections open a new file at the same
    moment (shards started together), SQLite refuses all switches but one with "database
    is locked" at once, without the busy wait; the others try again until it is done."""
    deadline = time.monotonic() + _SQLITE_BUSY_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


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


def as_utc(value: dt.datetime) -> dt.datetime:
    """``value`` as timezone-aware UTC. A naive time is taken as UTC (SQLite hands every
    stored time back naive); an aware one is converted, since SQLite compares stored
    times as text and a bound with another offset would be hours off."""
    return (
        value.replace(tzinfo=dt.timezone.utc)
        if value.tzinfo is None
        else value.astimezone(dt.timezone.utc)
    )
