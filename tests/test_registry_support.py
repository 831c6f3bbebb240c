"""Registry test helpers: a database per test (SQLite file or a fresh PostgreSQL
schema), distinct valid bundles, and worker functions that race in other processes.
(No tests here; test modules import it. Imports no torch, so spawned workers start fast.)"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

POSTGRES_URL_ENV = "CYCLEML_TEST_POSTGRES_URL"


def postgres_schema_url(base_url: str) -> Iterator[str]:
    """A URL whose connections use a new schema of their own (dropped afterwards), so
    runs in parallel never see each other's registry tables."""
    schema = f"registry_test_{uuid.uuid4().hex[:12]}"
    engine = create_engine(base_url)
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = make_url(base_url).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


def database_url(kind: str, folder: Path, name: str) -> Iterator[str]:
    """For a fixture parametrized over ``sqlite`` and ``postgresql``: an SQLite file in
    ``folder``, or a throw-away PostgreSQL schema; skipped, saying why, where no
    PostgreSQL server is configured."""
    if kind == "sqlite":
        yield f"sqlite:///{folder / name}"
        return
    base = os.environ.get(POSTGRES_URL_ENV)
    if not base:
        import pytest

        pytest.skip(
            f"PostgreSQL tests need {POSTGRES_URL_ENV} (`make test` sets it when a server "
            "answers on 127.0.0.1:5432)"
        )
    yield from postgres_schema_url(base)


def variant_of(bundle: Path, destination: Path, tag: str) -> Path:
    """A copy of ``bundle`` with different bytes (``bundle.json`` records ``tag``)."""
    shutil.copytree(bundle, destination)
    meta_path = destination / "bundle.json"
    data = json.loads(meta_path.read_text())
    data["created_at"] = f"{data.get('created_at', '')} {tag}".strip()
    meta_path.write_text(json.dumps(data))
    return destination


def race_worker(barrier: Any, results: Any, db_url: str | None, root: str, op: str, args: tuple):
    """Open the registry, wait for the other racer, run one operation; put
    ``("ok", value)`` or ``("error", kind, message)`` on ``results``."""
    from cycleml.registry import Registry, RegistryError

    registry = Registry(db_url, root)
    try:
        barrier.wait(timeout=60)
        if op == "register":
            version, created = registry.register(*args)
            outcome: tuple = ("ok", (version.version, created))
        else:
            move = getattr(registry, op)(*args[:-1], expected=args[-1])
            outcome = ("ok", None if move is None else move.to_version)
    except RegistryError as err:
        outcome = ("error", type(err).__name__, str(err))
    finally:
        registry.close()
    results.put(outcome)


def sqlite_tables(path: Path) -> list[str]:
    """The names of everything in a SQLite file's schema (tables and indexes), sorted."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return sorted(row[0] for row in conn.execute("SELECT name FROM sqlite_master"))
