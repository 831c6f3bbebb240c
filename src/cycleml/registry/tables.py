"""The registry's tables on the shared :data:`cycleml.db.metadata`."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKeyConstraint,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from cycleml.db import metadata

versions = Table(
    "registry_versions",
    metadata,
    Column("model", String(128), primary_key=True),
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("status", String(16), nullable=False),
    Column("content_hash", String(64), nullable=False),
    Column("files", JSON, nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("created_by", String(255), nullable=False),
    Column("description", Text, nullable=False),
    Column("tags", JSON, nullable=False),
    Column("lineage", JSON, nullable=False),
    Column("archived_at", DateTime(timezone=True), nullable=True),
    Column("archive_reason", Text, nullable=False, default=""),
    # the same bytes are one version of a model, also when two registers race
    UniqueConstraint("model", "content_hash", name="registry_versions_content"),
)

aliases = Table(
    "registry_aliases",
    metadata,
    Column("model", String(128), primary_key=True),
    Column("alias", String(128), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    ForeignKeyConstraint(
        ["model", "version"],
        ["registry_versions.model", "registry_versions.version"],
        name="registry_aliases_version",
    ),
)

alias_moves = Table(
    "registry_alias_moves",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model", String(128), nullable=False, index=True),
    Column("alias", String(128), nullable=False),
    Column("from_version", Integer, nullable=True),
    Column("to_version", Integer, nullable=True),
    Column("who", String(255), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("reason", Text, nullable=False),
)

# gate decisions (champion vs challenger): a table of its own, so that a database made
# before it existed gets it from create_all (which never adds columns to a table)
evaluations = Table(
    "registry_evaluations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model", String(128), nullable=False),
    Column("version", Integer, nullable=False),
    Column("passed", Boolean, nullable=False),
    Column("reasons", JSON, nullable=False),
    Column("champion", String(160), nullable=True),
    Column("decision", JSON, nullable=False),
    Column("who", String(255), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    ForeignKeyConstraint(
        ["model", "version"],
        ["registry_versions.model", "registry_versions.version"],
        name="registry_evaluations_version",
    ),
    Index("registry_evaluations_model_version", "model", "version"),
)

TABLES = (versions, aliases, alias_moves, evaluations)
