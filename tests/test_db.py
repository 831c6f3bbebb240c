"""The database layer: opening SQLite/PostgreSQL, clear errors, idempotent inserts."""

from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    inspect,
    select,
    text,
)

from cycleml.db import chunked, insert_new_rows, open_database, safe_url, utc_now
from cycleml.errors import ConfigError
from test_predict_support import DATABASES, POSTGRES_URL


def probe_table(metadata: MetaData | None = None) -> Table:
    return Table(
        f"probe_{uuid.uuid4().hex[:8]}",
        metadata or MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("key", String(50), nullable=False),
        Column("value", Integer),
        UniqueConstraint("key"),
    )


@pytest.mark.parametrize("database", DATABASES)
def test_insert_new_rows_skips_existing_keys(tmp_path, database):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}" if database == "sqlite" else POSTGRES_URL
    table = probe_table()
    engine = open_database(url)
    table.create(engine)
    try:
        # SQLite reports how many rows went in; psycopg's executemany cannot (-1)
        unknown = -1 if database == "postgres" else None
        with engine.begin() as conn:
            rows = [{"key": "a", "value": 1}, {"key": "b", "value": 2}]
            assert insert_new_rows(conn, table, rows) in (2, unknown)
            rows = [{"key": "b", "value": 3}, {"key": "c", "value": 4}]
            assert insert_new_rows(conn, table, rows) in (1, unknown)
            assert insert_new_rows(conn, table, []) == 0
        with engine.connect() as conn:
            stored = dict(conn.execute(select(table.c.key, table.c.value)).all())
        assert stored == {"a": 1, "b": 2, "c": 4}
    finally:
        table.drop(engine)
        engine.dispose()


def test_sqlite_file_folder_is_created_and_uses_wal(tmp_path):
    path = tmp_path / "deep" / "er" / "p.db"
    engine = open_database(f"sqlite:///{path}")
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30000
    engine.dispose()
    assert path.is_file()


def test_must_exist_names_a_missing_sqlite_file_and_creates_nothing(tmp_path):
    """A command that only reads does not answer a mistyped path as an empty database."""
    path = tmp_path / "typo" / "p.db"
    table = probe_table()
    with pytest.raises(
        ConfigError,
        match=rf"database file '{path}' does not exist \(db_url 'sqlite:///{path}'\); check "
        "the path: this command needs an existing database and creates none",
    ):
        open_database(f"sqlite:///{path}", create=[table], must_exist=True)
    assert not path.parent.exists()
    open_database(f"sqlite:///{path}").dispose()  # a command that writes creates it
    engine = open_database(f"sqlite:///{path}", create=[table], must_exist=True)
    try:
        assert table.name in inspect(engine).get_table_names()  # an older layout gains it
    finally:
        engine.dispose()


@pytest.mark.skipif(POSTGRES_URL is None, reason="set CYCLEML_TEST_POSTGRES_URL")
def test_must_exist_leaves_postgresql_as_it_is():
    """No file to miss: the tables a read needs are made where the schema lacks them."""
    table = probe_table()
    engine = open_database(POSTGRES_URL, create=[table], must_exist=True)
    try:
        assert table.name in inspect(engine).get_table_names()
    finally:
        table.drop(engine)
        engine.dispose()


def test_bad_urls_are_named():
    with pytest.raises(ConfigError, match="'not a url' is not a database URL"):
        open_database("not a url")
    with pytest.raises(ConfigError, match="unsupported database 'mysql'"):
        open_database("mysql://user@localhost/db")
    with pytest.raises(
        ConfigError,
        match=r"cannot connect to database 'postgresql\+psycopg://u:\*\*\*@127.0.0.1:1/x'",
    ):
        open_database("postgresql+psycopg://u:secret@127.0.0.1:1/x")


def test_helpers():
    assert safe_url("postgresql://u:secret@h/db") == "postgresql://u:***@h/db"
    assert [list(c) for c in chunked([1, 2, 3, 4, 5], 2)] == [[1, 2], [3, 4], [5]]
    assert utc_now().utcoffset().total_seconds() == 0


@pytest.mark.parametrize("database", DATABASES)
def test_jobs_started_together_create_the_tables_once(tmp_path, database):
    """Shards of one run, started at the same moment on a new database, race to create
    the tables; every one of them must open the database."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}" if database == "sqlite" else POSTGRES_URL
    tables = MetaData()
    probe_table(tables), probe_table(tables)
    barrier = threading.Barrier(4)
    failures: list[BaseException] = []

    def open_it() -> None:
        barrier.wait()
        try:
            open_database(url, create=list(tables.tables.values())).dispose()
        except BaseException as err:
            failures.append(err)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    engine = open_database(url)
    try:
        assert failures == []
        assert set(tables.tables) <= set(inspect(engine).get_table_names())
    finally:
        tables.drop_all(engine)
        engine.dispose()


def test_tables_that_cannot_be_created_are_named(tmp_path):
    path = tmp_path / "db.sqlite"
    open_database(f"sqlite:///{path}").dispose()
    read_only = f"sqlite:///file:{path}?mode=ro&uri=true"
    table = probe_table()
    with pytest.raises(ConfigError, match=rf"cannot create the tables {table.name} in database"):
        open_database(read_only, create=[table])


@pytest.mark.parametrize("database", DATABASES)
def test_a_table_of_the_same_name_without_our_columns_is_named(tmp_path, database):
    """Another program's table (or an older layout) under a name cycleml uses: the
    create leaves it alone, and opening says which columns it lacks, instead of a
    traceback at the first read or write."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}" if database == "sqlite" else POSTGRES_URL
    table = probe_table()
    engine = open_database(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(f"CREATE TABLE {table.name} (id INTEGER, other TEXT)"))
        with pytest.raises(ConfigError, match=rf"table {table.name} in database .* lacks the "
                           r"column\(s\) key, value that cycleml reads and writes"):  # fmt: skip
            open_database(url, create=[table])
        # the table is left as it was
        assert [c["name"] for c in inspect(engine).get_columns(table.name)] == ["id", "other"]
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {table.name}"))
        engine.dispose()
