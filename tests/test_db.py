"""The database layer: opening SQLite/PostgreSQL, clear errors, idempotent inserts."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, UniqueConstraint, select, text

from cycleml.db import chunked, insert_new_rows, open_database, safe_url, utc_now
from cycleml.errors import ConfigError
from test_predict_support import DATABASES, POSTGRES_URL


def probe_table() -> Table:
    return Table(
        f"probe_{uuid.uuid4().hex[:8]}",
        MetaData(),
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
