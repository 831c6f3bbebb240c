"""Database fixtures for the predict tests: SQLite always, PostgreSQL when
``CYCLEML_TEST_POSTGRES_URL`` is set. (No tests here; test modules import it.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import create_engine, delete, select, text
from sqlalchemy.engine import make_url

from cycleml.batch.store import TABLES, prediction_errors, predictions
from cycleml.db import open_database

POSTGRES_URL = os.environ.get("CYCLEML_TEST_POSTGRES_URL")

DATABASES = [
    "sqlite",
    pytest.param(
        "postgres",
        marks=[
            pytest.mark.postgres,
            pytest.mark.skipif(
                not POSTGRES_URL,
                reason="PostgreSQL tests need CYCLEML_TEST_POSTGRES_URL "
                "(e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test)",
            ),
        ],
    ),
]


# the predict tests' own PostgreSQL schema: the test database is shared
POSTGRES_SCHEMA = "cycleml_predict_tests"


def postgres_schema_url(schema: str) -> str:
    """The test PostgreSQL with ``schema`` (created if missing) first on the search path."""
    assert POSTGRES_URL
    engine = create_engine(POSTGRES_URL)
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    engine.dispose()
    return str(make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"}))


def database_url(kind: str, tmp_path: Path, model_names: list[str]) -> str:
    """A fresh SQLite file, or the test PostgreSQL with this test's models' rows removed."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'predictions.db'}"
    url = postgres_schema_url(POSTGRES_SCHEMA)
    engine = open_database(url, create=TABLES)
    with engine.begin() as conn:
        for table in TABLES:
            conn.execute(delete(table).where(table.c.model_name.in_(model_names)))
    engine.dispose()
    return url


def stored(url: str, model_name: str) -> tuple[dict[str, dict], dict[str, str]]:
    """``({key: prediction row}, {key: error reason})`` of one model, asserting that no
    key appears twice in either table."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = (
                conn.execute(select(predictions).where(predictions.c.model_name == model_name))
                .mappings()
                .all()
            )
            errors = (
                conn.execute(
                    select(prediction_errors).where(prediction_errors.c.model_name == model_name)
                )
                .mappings()
                .all()
            )
    finally:
        engine.dispose()
    keys = [r["input_key"] for r in rows]
    assert len(keys) == len(set(keys)), "a key was predicted twice"
    error_keys = [r["input_key"] for r in errors]
    assert len(error_keys) == len(set(error_keys)), "a key has two error rows"
    return {r["input_key"]: dict(r) for r in rows}, {r["input_key"]: r["reason"] for r in errors}
