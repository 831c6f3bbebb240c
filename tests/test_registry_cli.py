"""`cycleml registry …` end to end in subprocesses: what a user types and sees."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path

from omegaconf import OmegaConf

from cycleml.monitoring.log import PredictionLog
from cycleml.registry import Registry
from cycleml.registry.cli import open_registry
from test_errors_cli import cycleml
from test_export_support import cached_bundle
from test_registry_support import sqlite_tables, variant_of


def ok(*args: str, cwd: Path) -> str:
    result = cycleml(*args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def error(*args: str, cwd: Path) -> str:
    """The one line a failing command prints on stderr (exit status 2)."""
    result = cycleml(*args, cwd=cwd)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("cycleml registry")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_register_list_alias_promote_compare_archive(tmp_path):
    first = cached_bundle("image")
    second = variant_of(first, tmp_path / "second", "retrained")
    out = ok("registry", "register", f"bundle={first}", "name=digits", "description=first run",
             "+tags.team=vision", cwd=tmp_path)  # fmt: skip
    assert f"registered digits/1 at {tmp_path / 'registry' / 'digits' / '1'}" in out
    assert "already holds these bytes" in ok(
        "registry", "register", str(first), "name=digits", cwd=tmp_path
    )
    ok("registry", "register", str(second), "name=digits", "parent=digits/1", cwd=tmp_path)
    models = ok("registry", "list", cwd=tmp_path).splitlines()
    assert models[0].split() == ["model", "versions", "archived", "latest", "aliases"]
    assert models[2].split() == ["digits", "2", "0", "2"]

    assert "digits@champion: nowhere (unset) -> version 1" in ok(
        "registry", "alias", "digits", "champion=1", "reason=first release", cwd=tmp_path
    )
    ok("registry", "alias", "digits", "challenger=2", cwd=tmp_path)
    listed = json.loads(ok("registry", "list", "digits", "format=json", cwd=tmp_path))
    assert [(v["version"], v["aliases"]) for v in listed] == [
        (1, ["champion"]),
        (2, ["challenger"]),
    ]
    assert listed[0]["tags"] == {"team": "vision"} and listed[0]["description"] == "first run"
    assert listed[1]["lineage"]["parent"] == "digits/1"

    # a stale expectation is refused with one line, and nothing moves
    line = error(
        "registry", "promote", "digits", "challenger", "champion", "expect=2", cwd=tmp_path
    )
    assert "digits@champion points to version 1, not version 2" in line
    assert "digits@champion: version 1 -> version 2" in ok(
        "registry", "promote", "digits", "challenger", "champion", "expect=1",
        "reason=\"it's better\"", cwd=tmp_path,
    )  # fmt: skip
    shown = ok("registry", "show", "digits@champion", cwd=tmp_path)
    assert "digits/2" in shown and "challenger, champion" in shown
    assert "champion: 1 -> 2  by " in shown and "(it's better)" in shown
    as_json = json.loads(ok("registry", "show", "digits", "format=json", cwd=tmp_path))
    assert as_json["version"] == 2 and as_json["aliases"] == ["challenger", "champion"]

    compared = ok("registry", "compare", "digits", "1", "champion", cwd=tmp_path)
    assert compared.startswith("digits 1 vs 2: same data")
    assert any(row.split()[:3] == ["val/acc", "1.0000", "1.0000"] for row in compared.splitlines())

    line = error("registry", "archive", "digits", "2", cwd=tmp_path)
    assert "digits/2 is not archived: digits@challenger, digits@champion" in line
    ok("registry", "alias", "digits", "champion=1", cwd=tmp_path)
    assert "digits@challenger: version 2 -> nowhere (unset)" in ok(
        "registry", "alias", "digits", "challenger=null", cwd=tmp_path
    )
    assert "digits/2 is archived" in ok(
        "registry", "archive", "digits", "2", "reason=replaced", cwd=tmp_path
    )
    assert [v["version"] for v in json.loads(
        ok("registry", "list", "digits", "format=json", cwd=tmp_path))] == [1]  # fmt: skip
    everything = json.loads(
        ok("registry", "list", "digits", "all=true", "format=json", cwd=tmp_path)
    )
    assert [(v["version"], v["status"]) for v in everything] == [(1, "ready"), (2, "archived")]
    # the root holds model folders only (what `cycleml serve path=registry` reads)
    assert sorted(p.name for p in (tmp_path / "registry").iterdir() if not p.name.startswith(
        "registry.db")) == ["digits"]  # fmt: skip


def test_errors_are_one_line(tmp_path):
    Registry(None, tmp_path / "registry").close()  # an empty registry
    assert "registry show needs ref" in error("registry", "show", cwd=tmp_path)
    assert "no model 'digits' in the registry" in error(
        "registry", "show", "digits@champion", cwd=tmp_path
    )
    assert "model reference 'digits/x'" in error("registry", "show", "digits/x", cwd=tmp_path)
    assert "is too large; at most 2147483647" in error(
        "registry", "show", "digits/99999999999999999999999", cwd=tmp_path
    )
    # free text Hydra cannot read unquoted: the line shows the quoting that works
    line = error("registry", "alias", "digits", "champion=1", "reason=it's better", cwd=tmp_path)
    assert "reason=it's better: Hydra cannot read this value" in line
    assert 'Hydra receives reason="it\'s better"' in line
    assert "in a shell" in line and '"reason=\\"it\'s better\\""' in line
    line = error("registry", "list", "db_url=postgresql+psycopg://u:s3cret!@h/db", cwd=tmp_path)
    assert "Hydra cannot read this value" in line and "s3cret" not in line
    assert 'receives reason="a, b"' in error(
        "registry", "archive", "digits", "2", "reason=a, b", cwd=tmp_path
    )
    assert "alias 'bad name' is not allowed" in error(
        "registry", "alias", "digits", "bad name=1", cwd=tmp_path
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    assert f"bundle '{broken}' fails validation" in error(
        "registry", "register", str(broken), cwd=tmp_path
    )
    (tmp_path / "file").write_text("")
    assert "cannot be created" in error(
        "registry", "register", "bundle=b", f"root={tmp_path / 'file' / 'registry'}", cwd=tmp_path
    )
    # a registry.db whose table of the same name is someone else's
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    with contextlib.closing(sqlite3.connect(foreign / "registry.db")) as conn:
        conn.execute("CREATE TABLE registry_versions (x INTEGER)")
        conn.commit()
    assert "table registry_versions in database" in error(
        "registry", "list", f"root={foreign}", cwd=tmp_path
    )
    result = cycleml("registry", "nope", cwd=tmp_path)
    assert result.returncode == 2 and "unknown command 'nope'" in result.stderr
    assert "promote <name> <source alias> <target alias>" in ok("registry", "--help", cwd=tmp_path)


def test_commands_that_need_a_registry_name_a_missing_one_and_create_nothing(tmp_path):
    """A mistyped root or db_url is not answered as an empty registry (and only
    ``register`` creates one)."""
    root = tmp_path / "typo"
    line = error("registry", "list", f"root={root}", cwd=tmp_path)
    assert line == (
        f"cycleml registry: error: no registry at '{root}': {root / 'registry.db'} does "
        "not exist (nothing was registered there); check the registry root, or create it "
        "with `cycleml registry register` or `cycleml export` with export.register=true"
    )
    assert f"no registry at '{tmp_path / 'registry'}'" in error(
        "registry", "alias", "digits", "champion=1", cwd=tmp_path
    )
    database = tmp_path / "elsewhere" / "registry.db"
    assert f"database file '{database}' does not exist" in error(
        "registry", "show", "digits@champion", f"db_url=sqlite:///{database}", cwd=tmp_path
    )
    assert not root.exists() and not (tmp_path / "registry").exists()
    assert not database.parent.exists()


def test_another_programs_database_is_named_and_left_as_it_is(tmp_path):
    """db_url naming an existing database without registry tables is no empty registry:
    nothing is added to it, its journal mode stays."""
    other = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE people (id INTEGER)")
        conn.commit()
    before = other.read_bytes()
    for args in (["list"], ["show", "digits"]):
        line = error("registry", *args, f"db_url=sqlite:///{other}", cwd=tmp_path)
        assert line.startswith(
            f"cycleml registry: error: registry database: no registry tables in '{other}' (it "
            "lacks registry_versions, registry_aliases, registry_alias_moves, "
            "registry_evaluations; it holds people): not a cycleml database"
        ), line
    assert other.read_bytes() == before
    with contextlib.closing(sqlite3.connect(other)) as conn:
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == [("people",)]
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    # in a cycleml database without registry records yet: an empty registry, unchanged
    shared = tmp_path / "monitoring.db"
    PredictionLog(f"sqlite:///{shared}").close()

    before = sqlite_tables(shared)
    assert "no models in" in ok("registry", "list", f"db_url=sqlite:///{shared}", cwd=tmp_path)
    assert sqlite_tables(shared) == before and "monitoring_predictions" in before


def test_register_and_export_still_create_a_missing_sqlite_registry(tmp_path):
    """The write paths make the database (and its folder) that the read paths need."""
    database = tmp_path / "new" / "registry.db"
    out = ok("registry", "register", f"bundle={cached_bundle('image')}", "name=digits",
             f"db_url=sqlite:///{database}", cwd=tmp_path)  # fmt: skip
    assert "registered digits/1" in out and database.is_file()
    assert "digits" in ok("registry", "list", f"db_url=sqlite:///{database}", cwd=tmp_path)
    # what `cycleml export export.register=true` opens before it exports
    other = tmp_path / "other" / "registry.db"
    registry = open_registry(
        OmegaConf.create({"db_url": f"sqlite:///{other}", "root": str(tmp_path / "reg")})
    )
    registry.close()
    Registry(f"sqlite:///{other}", tmp_path / "reg", must_exist=True).close()
