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
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from sqlalchemy import Engine, MetaData, Table, create_engine, event, exc, inspect, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.schema import CreateTable

from cycleml.errors import ConfigError
from cycleml.redaction import redact

log = logging.getLogger(__name__)

metadata = MetaData()

SUPPORTED_BACKENDS = ("sqlite", "postgresql")
# the first word of every cycleml table's name: a database holding one is cycleml's
CYCLEML_TABLE_PREFIXES = ("registry_", "ab_", "monitoring_", "batch_")
_CREATE_ATTEMPTS = 5
_SQLITE_BUSY_MS = 30_000


def open_database(
    url: str | URL,
    create: Sequence[Table] = (),
    check_layout: bool = True,
    must_exist: bool = False,
    what: str = "cycleml",
    created_by: str = "a command that writes to it",
) -> Engine:
    """An engine for ``url`` after a test connection, with ``create`` tables made.

    SQLite files get their folder created (``~`` expanded) and run in WAL mode with a
    busy timeout, so readers and one writer from several threads or processes do not
    block each other. A bad URL, a missing driver or an unreachable server is a
    :class:`ConfigError` naming the (password-free) URL, and so (with
    ``check_layout``) is a table of ``create`` that already exists without the columns
    cycleml reads and writes: another program's table of the same name, or an older
    layout, which the create leaves as it is.

    ``must_exist`` (commands that only read, or change records already there) creates
    nothing and changes nothing: no file, folder or table, and no switch to WAL. A
    :class:`ConfigError` names, with the ``what`` of the tables (``registry``) and
    the commands that make them (``created_by``):

    - a missing SQLite file (also a ``file:`` URI's): a mistyped path is not answered
      as an empty database;
    - a database holding none of ``create`` and no other cycleml table either (another
      program's database, an empty file): ``no registry tables in '/x/other.db'``;
    - a database holding some of ``create`` but not all (an older layout, or a
      stranger's tables of the same names).

    A cycleml database that holds none of ``create`` but other cycleml tables (a
    ``monitoring.db`` that ``cycleml predict`` logged predictions to, before any
    experiment was started) truthfully holds no such records: each connection then
    reads empty temporary tables in their place (``experiment list`` says no
    experiments), and the database is left as it is. Records written there by a
    command that changes existing ones cannot be lost that way: with every table of
    ``create`` empty, it finds nothing to change.
    """
    try:
        parsed = make_url(url)
    except exc.ArgumentError as err:
        raise ConfigError(f"db_url '{url}' is not a database URL: {err}") from err
    if "@" in (parsed.host or ""):
        # a raw '@' in the password: the URL parses with the rest of the password as
        # part of the host, which safe_url and the driver's errors would then show
        shown = redact(url) if isinstance(url, str) else parsed.render_as_string()
        raise ConfigError(
            f"db_url '{shown}': more than one '@' before the host; an '@' inside the "
            "password must be written %40 (or keep the password off the command line: "
            "PGPASSWORD or ~/.pgpass)"
        )
    shown = safe_url(parsed)
    if parsed.get_backend_name() not in SUPPORTED_BACKENDS:
        raise ConfigError(
            f"db_url '{shown}': unsupported database '{parsed.get_backend_name()}'; "
            "use sqlite:///path.db or postgresql+psycopg://user@host:5432/db"
        )
    options: dict[str, Any] = {}
    where = shown
    if parsed.get_backend_name() == "sqlite":
        path = sqlite_path(parsed)
        if path is not None:
            where = str(path.absolute())
            if must_exist and not path.exists():
                raise ConfigError(
                    f"database file '{where}' does not exist (db_url '{shown}'): no {what} "
                    f"database there yet; check the path, or create it with {created_by}"
                )
            if not _is_file_uri(parsed):
                # SQLite opens the path as written: a '~' would be a folder of that name
                parsed = parsed.set(database=str(path))
                if not must_exist:
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
        event.listen(engine, "connect", partial(_sqlite_pragmas, wal=not must_exist))
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except exc.SQLAlchemyError as err:
        engine.dispose()
        raise ConfigError(f"cannot connect to database '{shown}': {_reason(err)}") from err
    if create:
        if must_exist:
            _stand_in_for_absent(engine, create, where, what, created_by, check_layout)
        else:
            _create_tables(engine, create, shown)
        if check_layout:
            check_columns(engine, create, shown)
    return engine


def check_columns(engine: Engine, tables: Sequence[Table], shown: str) -> None:
    """A ConfigError (the engine disposed) naming the first of ``tables`` that exists
    without a column cycleml reads and writes (``shown``: the database, password-free)."""
    missing = missing_columns(engine, tables)
    if missing:
        engine.dispose()
        table, columns = next(iter(missing.items()))
        raise ConfigError(
            f"table {table} in database '{shown}' lacks the column(s) "
            f"{', '.join(columns)} that cycleml reads and writes: another program's "
            f"table of that name, or an older layout; use another database or rename "
            f"the table (ALTER TABLE {table} RENAME TO {table}_old)"
        )


def sqlite_path(url: str | URL) -> Path | None:
    """The file a SQLite URL opens (``~`` expanded; a ``file:`` URI's path when
    ``uri=true``, as written), or None for an in-memory database."""
    parsed = make_url(url)
    database = parsed.database or ""
    if _is_file_uri(parsed):
        location = database.removeprefix("file:")
        if location.startswith("//"):  # file://host/path: the authority is empty or localhost
            location = "/" + location[2:].partition("/")[2]
        location = unquote(location.partition("?")[0])
        if parsed.query.get("mode") == "memory" or location in ("", ":memory:"):
            return None
        return Path(location)
    if database in ("", ":memory:"):
        return None
    return Path(database).expanduser()


def _is_file_uri(parsed: URL) -> bool:
    return (parsed.database or "").startswith("file:") and str(
        parsed.query.get("uri", "")
    ).lower() in ("true", "1")


def _stand_in_for_absent(
    engine: Engine,
    tables: Sequence[Table],
    where: str,
    what: str,
    created_by: str,
    check_layout: bool,
) -> None:
    """With ``must_exist``: a ConfigError where the database lacks some of ``tables``
    (a table present without cycleml's columns named first), except a cycleml database
    lacking all of them, which reads them as empty temporary tables (see
    :func:`open_database`)."""
    try:
        present = set(inspect(engine).get_table_names())
    except exc.SQLAlchemyError as err:
        engine.dispose()
        raise ConfigError(f"cannot read database '{where}': {_reason(err)}") from err
    absent = [table.name for table in tables if table.name not in present]
    if not absent:
        return
    if len(absent) < len(tables):
        if check_layout:
            check_columns(engine, tables, where)
        engine.dispose()
        raise ConfigError(
            f"the {what} tables in '{where}' lack {', '.join(absent)}: an older layout, "
            f"or another program's tables of the same names; add them with {created_by}, "
            "or check db_url"
        )
    held = sorted(present)
    if not any(name.startswith(CYCLEML_TABLE_PREFIXES) for name in held):
        engine.dispose()
        listing = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
        raise ConfigError(
            f"no {what} tables in '{where}' (it lacks {', '.join(absent)}; it holds "
            f"{listing or 'no table'}): not a cycleml database; check db_url"
        )
    creates = [
        str(CreateTable(table).compile(dialect=engine.dialect)).replace(
            "CREATE TABLE", "CREATE TEMPORARY TABLE", 1
        )
        for table in tables
    ]

    def stand_in(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        for statement in creates:
            cursor.execute(statement)
        cursor.close()
        dbapi_connection.commit()  # kept past the pool's rollback on return

    event.listen(engine, "connect", stand_in)
    engine.dispose()  # the test connection lacks them; every one opened from now on has them
    log.debug("%s holds no %s tables yet: reading them as empty", where, what)


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


def _sqlite_pragmas(dbapi_connection: Any, _record: Any, wal: bool = True) -> None:
    """Busy timeout, WAL (``wal=False``: left as the file has it, so that a command that
    only reads changes nothing; a database cycleml made is in WAL already), synchronous
    NORMAL and foreign keys, on each new connection."""
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_MS}")
    if wal:
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
