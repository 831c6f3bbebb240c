"""The database layer: opening SQLite/PostgreSQL, clear errors, idempotent inserts."""

from __future__ import annotations

import sqlite3
import threading
import uuid
from pathlib import Path

import pytest
from sqlalchemy import (
    Column,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import make_url

from cycleml.db import (
    chunked,
    insert_new_rows,
    open_database,
    safe_url,
    sqlite_path,
    utc_now,
)
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
        match=rf"^database file '{path}' does not exist \(db_url 'sqlite:///{path}'\): no "
        r"registry database there yet; check the path, or create it with `cycleml registry "
        r"register`$",
    ):
        open_database(
            f"sqlite:///{path}",
            create=[table],
            must_exist=True,
            what="registry",
            created_by="`cycleml registry register`",
        )
    assert not path.parent.exists()
    open_database(f"sqlite:///{path}", create=[table]).dispose()  # a command that writes
    engine = open_database(f"sqlite:///{path}", create=[table], must_exist=True)
    engine.dispose()


def _tables_and_journal(path) -> tuple[list[str], str]:
    with sqlite3.connect(path) as conn:
        names = sorted(row[0] for row in conn.execute("SELECT name FROM sqlite_master"))
        return names, conn.execute("PRAGMA journal_mode").fetchone()[0]


def test_must_exist_names_another_programs_database_and_changes_nothing(tmp_path):
    """An existing file without cycleml's tables gets no tables and no WAL switch."""
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE people (id INTEGER)")
    before = path.read_bytes()
    table = probe_table()
    for url in (f"sqlite:///{path}", f"sqlite:///file:{path}?uri=true"):
        with pytest.raises(
            ConfigError,
            match=rf"^no registry tables in '{path}' \(it lacks {table.name}; it holds "
            r"people\): not a cycleml database; check db_url$",
        ):
            open_database(url, create=[table], must_exist=True, what="registry")
    assert _tables_and_journal(path) == (["people"], "delete")
    assert path.read_bytes() == before
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(ConfigError, match=r"no cycleml tables in '.*empty.db' .*holds no table"):
        open_database(f"sqlite:///{empty}", create=[table], must_exist=True)
    assert empty.stat().st_size == 0


def test_must_exist_names_a_partial_layout(tmp_path):
    path = tmp_path / "old.db"
    metadata = MetaData()
    first, second = probe_table(metadata), probe_table(metadata)
    open_database(f"sqlite:///{path}", create=[first]).dispose()
    with pytest.raises(
        ConfigError,
        match=rf"^the experiment tables in '{path}' lack {second.name}: an older layout, or "
        r"another program's tables of the same names; add them with `cycleml experiment "
        r"start`, or check db_url$",
    ):
        open_database(
            f"sqlite:///{path}",
            create=[first, second],
            must_exist=True,
            what="experiment",
            created_by="`cycleml experiment start`",
        )
    assert _tables_and_journal(path)[0] == [first.name, f"sqlite_autoindex_{first.name}_1"]


def test_must_exist_reads_tables_a_cycleml_database_lacks_as_empty(tmp_path):
    """monitoring.db with predictions logged but no experiment started: no experiments,
    and the file is left as it is."""
    path = tmp_path / "monitoring.db"
    logged = Table("monitoring_probe", MetaData(), Column("id", Integer, primary_key=True))
    open_database(f"sqlite:///{path}", create=[logged]).dispose()
    before = _tables_and_journal(path)
    metadata = MetaData()
    parent, child = probe_table(metadata), probe_table(metadata)
    child.append_column(Column("parent_id", Integer, ForeignKey(f"{parent.name}.id")))
    engine = open_database(f"sqlite:///{path}", create=[parent, child], must_exist=True)
    try:
        for _ in range(3):  # every pooled connection, also one opened in another thread
            with engine.connect() as conn:
                assert conn.execute(select(parent)).all() == []
                assert conn.execute(select(child)).all() == []
        worker = threading.Thread(target=lambda: engine.connect().close())
        worker.start()
        worker.join()
        with engine.connect() as first, engine.connect() as second:
            assert first.execute(select(child)).all() == second.execute(select(parent)).all()
    finally:
        engine.dispose()
    assert _tables_and_journal(path) == before


def test_sqlite_file_uri_and_home_paths(tmp_path, monkeypatch):
    """``~`` is the home folder (not a folder named '~'); a file: URI's path is checked."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    open_database("sqlite:///~/data/x.db").dispose()
    assert (tmp_path / "home" / "data" / "x.db").is_file() and not (tmp_path / "~").exists()
    open_database("sqlite:///~/data/x.db", must_exist=True).dispose()
    missing = tmp_path / "nowhere.db"
    for url in (f"sqlite:///file:{missing}?uri=true", "sqlite:///file:nowhere.db?uri=true",
                f"sqlite:///file://{missing}?mode=rw&uri=true"):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"database file '{missing}' does not exist"):
            open_database(url, create=[probe_table()], must_exist=True)
    assert not missing.exists()
    assert sqlite_path("sqlite:///file::memory:?cache=shared&uri=true") is None
    assert sqlite_path("sqlite:///file:a%20b.db?uri=true") == Path("a b.db")
    assert sqlite_path("sqlite://") is None


@pytest.fixture
def postgres_schema_url():
    """POSTGRES_URL in a schema of its own (no other test's tables in sight)."""
    schema = f"h_must_exist_{uuid.uuid4().hex[:8]}"
    admin = open_database(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.mark.skipif(POSTGRES_URL is None, reason="set CYCLEML_TEST_POSTGRES_URL")
def test_must_exist_creates_no_postgresql_table(postgres_schema_url):
    """As in SQLite: a schema without cycleml's tables is named and left as it is; one
    with other cycleml tables reads those it lacks as empty."""
    url = postgres_schema_url
    metadata = MetaData()
    ours = Table("registry_probe", metadata, Column("id", Integer))
    parent, child = probe_table(metadata), probe_table(metadata)
    child.append_column(Column("parent_id", Integer, ForeignKey(f"{parent.name}.id")))
    with pytest.raises(ConfigError, match=rf"lacks {parent.name}, {child.name}; it holds no"):
        open_database(url, create=[parent, child], must_exist=True)
    writer = open_database(url, create=[ours])
    try:
        engine = open_database(url, create=[parent, child], must_exist=True)
        try:
            for _ in range(3):
                with engine.connect() as conn:
                    assert conn.execute(select(child)).all() == []
        finally:
            engine.dispose()
        assert inspect(writer).get_table_names() == ["registry_probe"]
    finally:
        writer.dispose()


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
