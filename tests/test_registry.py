"""The model registry API on SQLite and PostgreSQL: versions, lineage, aliases,
the audit trail, races between processes, and the errors users see."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import select

from cycleml.registry import (
    ANY,
    AliasConflict,
    ModelRef,
    Registry,
    RegistryError,
    model_registry,
    parse_model_ref,
)
from cycleml.registry.tables import alias_moves, versions
from test_export_support import cached_bundle, rewrite_meta
from test_predict_support import DATABASES, POSTGRES_URL
from test_registry_support import postgres_schema_url, race_worker, variant_of


@pytest.fixture(params=DATABASES)
def db_url(request):
    """None (SQLite inside the registry root) or a PostgreSQL schema of this test's own."""
    if request.param == "sqlite":
        yield None
    else:
        yield from postgres_schema_url(POSTGRES_URL)


@pytest.fixture
def registry(db_url, tmp_path):
    reg = Registry(db_url, tmp_path / "registry")
    yield reg
    reg.close()


@pytest.fixture
def bundles(tmp_path) -> list[Path]:
    """Three valid image bundles with different bytes."""
    first = cached_bundle("image")
    return [first] + [variant_of(first, tmp_path / f"bundle{i}", f"v{i}") for i in (2, 3)]


def rows(registry: Registry, table) -> list[dict]:
    with registry.engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(table)).mappings()]


def visible_entries(root: Path) -> list[str]:
    """What `cycleml serve` sees in the root: everything not hidden and not the db."""
    return sorted(p.name for p in root.iterdir() if not p.name.startswith((".", "registry.db")))


# --- references -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("digits", ModelRef("digits")),
        ("digits/3", ModelRef("digits", version=3)),
        ("digits@champion", ModelRef("digits", alias="champion")),
        ("my-model_v2.1@stage-0", ModelRef("my-model_v2.1", alias="stage-0")),
    ],
)
def test_model_refs_parse(text, expected):
    assert parse_model_ref(text) == expected
    assert str(parse_model_ref(text)) == text


@pytest.mark.parametrize(
    "text",
    ["", "digits/x", "digits/0", "digits/-1", "a@b@c", "a/1/2", "a/1@b", "@champion",
     "digits@", ".hidden", "../etc", "di gits", "digits@chäm", "a/b", "x" * 200],
)  # fmt: skip
def test_bad_model_refs_are_named(text):
    with pytest.raises(RegistryError, match="model reference|not allowed|empty"):
        parse_model_ref(text)


def test_versions_beyond_the_version_column_are_named():
    # versions live in INTEGER columns (32 bits in PostgreSQL)
    assert parse_model_ref("digits/2147483647").version == 2**31 - 1
    for text in ("digits/2147483648", "digits/99999999999999999999999"):
        with pytest.raises(RegistryError, match=rf"'{text}'.* too large; at most 2147483647"):
            parse_model_ref(text)


# --- register -------------------------------------------------------------------


def test_register_twice_gives_one_version(db_url, tmp_path, bundles):
    registry = Registry(db_url, tmp_path / "registry")
    first, created = registry.register(bundles[0], name="digits", tags={"team": "vision"})
    assert created and first.version == 1 and first.path == tmp_path / "registry/digits/1"
    assert first.tags == {"team": "vision"} and first.status == "ready"
    again, created_again = registry.register(bundles[0], name="digits")
    assert (again.version, created_again) == (1, False)
    second, created = registry.register(bundles[1], name="digits")
    assert created and second.version == 2 and second.content_hash != first.content_hash
    assert [v.version for v in registry.versions("digits")] == [1, 2]
    # the copy is byte-identical to the bundle, and its hashes are recorded
    assert sorted(first.files) == sorted(p.name for p in bundles[0].iterdir())
    for name in first.files:
        assert (first.path / name).read_bytes() == (bundles[0] / name).read_bytes()
    assert first.size_bytes == sum(p.stat().st_size for p in bundles[0].iterdir())
    assert visible_entries(registry.root) == ["digits"]
    assert not [p for p in registry.root.iterdir() if p.name.startswith(".")]
    assert registry.models() == ["digits"]
    registry.close()


def test_register_takes_the_name_from_the_bundle_and_next_free_number(registry, bundles):
    version, _ = registry.register(bundles[0])
    assert version.ref == "tiny-image/1"
    # a stray numbered folder on disk is never overwritten
    (registry.root / "tiny-image" / "2").mkdir()
    (registry.root / "tiny-image" / "2" / "mine.txt").write_text("keep")
    assert registry.register(bundles[1])[0].version == 3
    assert (registry.root / "tiny-image" / "2" / "mine.txt").read_text() == "keep"


def test_a_bundle_that_fails_validation_leaves_nothing(registry, tmp_path, bundles):
    broken = variant_of(bundles[0], tmp_path / "broken", "x")
    rewrite_meta(broken, opset=11)
    with pytest.raises(RegistryError, match=r"bundle '.*broken' fails validation: .*opset"):
        registry.register(broken, name="digits")
    with pytest.raises(RegistryError, match="fails validation: bundle not found"):
        registry.register(tmp_path / "nowhere", name="digits")
    assert rows(registry, versions) == []
    assert not registry.root.exists() or visible_entries(registry.root) == []


def test_a_failure_while_moving_into_place_leaves_nothing(registry, bundles, monkeypatch):
    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(model_registry.os, "rename", refuse)
    with pytest.raises(RegistryError, match="cannot write version folder .*digits/1"):
        registry.register(bundles[0], name="digits")
    assert rows(registry, versions) == []
    assert not (registry.root / "digits").exists()
    assert not [p for p in registry.root.iterdir() if p.name.startswith(".staging")]


def test_a_failed_commit_leaves_nothing(registry, bundles, monkeypatch):
    from sqlalchemy.engine import RootTransaction

    def fail(self):
        raise RuntimeError("the database went away")

    monkeypatch.setattr(RootTransaction, "commit", fail)
    with pytest.raises(RuntimeError, match="went away"):
        registry.register(bundles[0], name="digits")
    monkeypatch.undo()
    assert rows(registry, versions) == []
    assert not (registry.root / "digits").exists()
    assert not [p for p in registry.root.iterdir() if p.name.startswith(".")]
    # a later version that fails leaves the earlier ones in place
    registry.register(bundles[0], name="digits")
    monkeypatch.setattr(RootTransaction, "commit", fail)
    with pytest.raises(RuntimeError, match="went away"):
        registry.register(bundles[1], name="digits")
    monkeypatch.undo()
    assert [v.version for v in registry.versions("digits")] == [1]
    assert sorted(p.name for p in (registry.root / "digits").iterdir()) == ["1"]


def test_bad_names_and_roots_are_refused(tmp_path, bundles):
    registry = Registry(None, tmp_path / "registry")
    for name in ("../escape", ".hidden", "a/b", "name with space"):
        with pytest.raises(RegistryError, match="not allowed"):
            registry.register(bundles[0], name=name)
    with pytest.raises(RegistryError, match="alias 'x y' is not allowed"):
        registry.set_alias("digits", "x y", 1)
    assert not (tmp_path / "escape").exists() and rows(registry, versions) == []
    registry.close()
    (tmp_path / "afile").write_text("")
    with pytest.raises(RegistryError, match=r"registry root '.*afile/registry' cannot be created"):
        Registry(None, tmp_path / "afile" / "registry")


def test_a_registry_that_must_exist_is_named_and_not_created(tmp_path):
    root = tmp_path / "typo" / "registry"
    with pytest.raises(
        RegistryError, match=rf"no registry at '{root}': {root / 'registry.db'} does not exist"
    ):
        Registry(None, root, must_exist=True)
    database = tmp_path / "elsewhere" / "r.db"
    with pytest.raises(RegistryError, match=rf"database file '{database}' does not exist"):
        Registry(f"sqlite:///{database}", root, must_exist=True)
    assert list(tmp_path.iterdir()) == []
    Registry(None, root).close()  # what registers creates it; then it opens
    Registry(None, root, must_exist=True).close()


def test_a_root_without_write_access_is_named(registry, bundles, monkeypatch):
    monkeypatch.setattr(model_registry.os, "access", lambda path, mode: False)
    with pytest.raises(RegistryError, match=r"registry root '.*registry' is not writable"):
        registry.register(bundles[0], name="digits")
    monkeypatch.undo()
    assert rows(registry, versions) == [] and not (registry.root / "digits").exists()


def test_links_in_a_bundle_are_refused(registry, tmp_path, bundles):
    linked = variant_of(bundles[0], tmp_path / "linked", "x")
    (tmp_path / "secret.txt").write_text("outside the bundle")
    (linked / "notes.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(RegistryError, match=r"bundle '.*/linked' holds a link 'notes.txt'"):
        registry.register(linked, name="digits")
    assert rows(registry, versions) == [] and not (registry.root / "digits").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_root_is_named(tmp_path, bundles):
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "ro")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        with pytest.raises(RegistryError, match="registry root .*ro' is not writable"):
            registry.register(bundles[0], name="digits")
    finally:
        (tmp_path / "ro").chmod(0o755)


def _race(db_url, root: Path, calls: list[tuple[str, tuple]]) -> list[tuple]:
    """Run each ``(operation, args)`` in its own process, all released at once."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(len(calls)), context.Queue()
    workers = [
        context.Process(target=race_worker, args=(barrier, results, db_url, str(root), op, args))
        for op, args in calls
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    return outcomes


def test_racing_registers_take_different_versions(registry, db_url, bundles):
    outcomes = _race(
        db_url,
        registry.root,
        [("register", (str(bundles[1]), "digits")), ("register", (str(bundles[2]), "digits"))],
    )
    assert sorted(o[1] for o in outcomes) == [(1, True), (2, True)], outcomes
    by_hash = {v.content_hash: v for v in registry.versions("digits")}
    assert len(by_hash) == 2
    for version in by_hash.values():  # each folder holds the bundle its row describes
        assert (version.path / "bundle.json").read_bytes() == (
            bundles[1] if "v2" in (version.path / "bundle.json").read_text() else bundles[2]
        ).joinpath("bundle.json").read_bytes()
    # the same bytes racing: one version, both told so
    outcomes = _race(
        db_url,
        registry.root,
        [("register", (str(bundles[0]), "digits")), ("register", (str(bundles[0]), "digits"))],
    )
    assert sorted(o[1][0] for o in outcomes) == [3, 3] and sorted(o[1][1] for o in outcomes) == [
        False,
        True,
    ]
    assert len(registry.versions("digits")) == 3


# --- lineage --------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One real `cycleml train` run (digits, a few batches) for the lineage tests."""
    from test_export_checkpoint import train_in

    return train_in(tmp_path_factory.mktemp("train"), "trainer.limit_train_batches=5")


def test_lineage_from_a_real_trained_run(tmp_path, trained_run):
    from cycleml.export.checkpoint import export_checkpoint

    run = trained_run
    bundle = export_checkpoint(run, bundles_dir=tmp_path / "bundles", name="digits")
    registry = Registry(None, tmp_path / "registry")
    first, _ = registry.register(bundle.path, description="first")
    second, _ = registry.register(
        variant_of(bundle.path, tmp_path / "again", "retrained"), parent="digits/1"
    )
    summary = json.loads((run / "summary.json").read_text())
    run_info = json.loads((run / "run_info.json").read_text())
    lineage = first.lineage
    assert lineage["run_id"] == run_info["run_id"] == summary["run_id"]
    assert lineage["fingerprint"] == summary["dataset_fingerprint"] and lineage["fingerprint"]
    assert lineage["git_commit"] == summary["git_commit"]
    assert lineage["metrics"]["test/acc"] == pytest.approx(summary["metrics"]["test/acc"])
    assert lineage["metrics"]["bundle/val_acc"] == bundle.meta.metrics["bundle/val_acc"]
    assert lineage["parity"]["passed"] and lineage["parity"]["argmax_agreement"] == 1.0
    assert lineage["kind"] == "image" and lineage["class_names"] == [str(d) for d in range(10)]
    assert Path(lineage["run_dir"]) == run and lineage["run"]["model"] == summary["model"]
    assert lineage["run"]["best_checkpoint"] == summary["best_checkpoint"]
    assert lineage["parent"] is None and second.lineage["parent"] == "digits/1"
    assert first.description == "first" and "@" in first.created_by
    assert first.created_at.utcoffset().total_seconds() == 0
    # the stored record reads back the same, and is JSON
    assert registry.get("digits", 1) == first
    assert json.loads(json.dumps(first.to_dict()))["lineage"]["run_id"] == lineage["run_id"]
    with pytest.raises(RegistryError, match="model 'digits' has no version 9"):
        registry.register(bundle.path, parent="digits/9")
    registry.close()


@pytest.mark.slow
def test_export_with_register_exports_then_registers(tmp_path, trained_run):
    command = [sys.executable, "-m", "cycleml", "export", f"ckpt_path={trained_run}",
               "export.register=true", "registry.description=from export",
               "+registry.tags.team=vision"]  # fmt: skip
    env = {**os.environ, "CYCLEML_ROOT": str(tmp_path)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"registered digits/1 at {tmp_path / 'registry' / 'digits' / '1'}" in result.stdout
    registry = Registry(None, tmp_path / "registry")
    version = registry.get("digits", 1)
    assert version.description == "from export" and version.tags == {"team": "vision"}
    exported = tmp_path / "bundles" / "digits" / "1"
    assert (exported / "model.onnx").read_bytes() == (version.path / "model.onnx").read_bytes()
    summary = json.loads((trained_run / "summary.json").read_text())
    assert version.lineage["run_id"] == summary["run_id"] and version.lineage["run_dir"]
    registry.close()
    # an unusable registry fails before the export, with one line
    (tmp_path / "file").write_text("")
    result = subprocess.run([*command[:6], f"registry.root={tmp_path / 'file' / 'r'}"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 2 and "cannot be created" in result.stderr
    assert not (tmp_path / "bundles" / "digits" / "2").exists()


def test_lineage_variants_come_from_bundle_json(registry, bundles):
    version, _ = registry.register(bundles[0], name="digits")
    assert set(version.lineage["variants"]) == {"int8", "fp16"}
    assert version.lineage["variants"]["int8"]["method"] == "static"
    assert version.lineage["run_id"] == "run-image" and version.lineage["fingerprint"]
    assert "run_dir" not in version.lineage  # no training run folder behind this bundle


# --- aliases --------------------------------------------------------------------


def test_alias_moves_are_audited(registry, bundles):
    for bundle in bundles:
        registry.register(bundle, name="digits")
    move = registry.set_alias("digits", "champion", 1, reason="first")
    assert (move.from_version, move.to_version) == (None, 1)
    assert registry.set_alias("digits", "champion", "1") is None  # already there: no move
    registry.set_alias("digits", "champion", 2, reason="better", expected=1)
    registry.set_alias("digits", "staging", 3)
    assert registry.aliases() == {"digits": {"champion": 2, "staging": 3}}
    assert registry.aliases("digits") == {"digits": {"champion": 2, "staging": 3}}
    assert registry.aliases("other") == {}
    with pytest.raises(AliasConflict, match=r"digits@champion points to version 2, not version 1"):
        registry.set_alias("digits", "champion", 3, expected=1)
    with pytest.raises(AliasConflict, match="points to version 3, not nowhere"):
        registry.set_alias("digits", "staging", 1, expected=None)
    deleted = registry.delete_alias("digits", "staging", reason="done")
    assert (deleted.from_version, deleted.to_version) == (3, None)
    audit = registry.audit("digits")
    assert [(m.alias, m.from_version, m.to_version, m.reason) for m in audit] == [
        ("champion", None, 1, "first"),
        ("champion", 1, 2, "better"),
        ("staging", None, 3, ""),
        ("staging", 3, None, "done"),
    ]
    assert all("@" in m.who and m.at.utcoffset().total_seconds() == 0 for m in audit)
    assert len(rows(registry, alias_moves)) == 4  # the refused moves left no row


def test_promote_moves_the_target_where_the_source_points(registry, bundles):
    for bundle in bundles[:2]:
        registry.register(bundle, name="digits")
    registry.set_alias("digits", "champion", 1)
    registry.set_alias("digits", "challenger", 2)
    move = registry.promote("digits", "challenger", "champion", reason="wins the A/B")
    assert (move.alias, move.from_version, move.to_version) == ("champion", 1, 2)
    assert registry.aliases("digits")["digits"] == {"champion": 2, "challenger": 2}
    assert registry.audit("digits")[-1].reason == "wins the A/B"
    assert registry.promote("digits", "challenger", "champion") is None
    with pytest.raises(RegistryError, match="model 'digits' has no alias 'canary'"):
        registry.promote("digits", "canary", "champion")
    with pytest.raises(AliasConflict, match="not version 1"):
        registry.promote("digits", "challenger", "champion", expected=1)


@pytest.mark.parametrize("operation", ["promote", "set_alias"])
def test_concurrent_moves_from_two_processes_have_one_winner(registry, db_url, bundles, operation):
    for bundle in bundles:
        registry.register(bundle, name="digits")
    registry.set_alias("digits", "champion", 1)
    if operation == "promote":
        registry.set_alias("digits", "challenger", 2)
        registry.set_alias("digits", "canary", 3)
        # both expect champion at 1: one promotes challenger (2), the other canary (3)
        calls = [
            ("promote", ("digits", "challenger", "champion", "a", 1)),
            ("promote", ("digits", "canary", "champion", "b", 1)),
        ]
    else:
        calls = [
            ("set_alias", ("digits", "champion", 2, "a", 1)),
            ("set_alias", ("digits", "champion", 3, "b", 1)),
        ]
    outcomes = _race(db_url, registry.root, calls)
    winners = [o for o in outcomes if o[0] == "ok"]
    losers = [o for o in outcomes if o[0] == "error"]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    kind, message = losers[0][1:]
    assert kind == "AliasConflict" and "digits@champion" in message and "\n" not in message
    assert registry.aliases("digits")["digits"]["champion"] == winners[0][1]
    champion_moves = [m for m in registry.audit("digits") if m.alias == "champion"]
    assert [(m.from_version, m.to_version) for m in champion_moves] == [
        (None, 1),
        (1, winners[0][1]),
    ]


def test_unconditional_moves_retry_instead_of_failing(registry, db_url, bundles):
    for bundle in bundles[:2]:
        registry.register(bundle, name="digits")
    registry.set_alias("digits", "champion", 1)
    calls = [
        ("set_alias", ("digits", "champion", 2, "a", ANY)),
        ("set_alias", ("digits", "champion", 1, "b", ANY)),
    ]
    outcomes = _race(db_url, registry.root, calls)
    assert all(o[0] == "ok" for o in outcomes), outcomes
    final = registry.aliases("digits")["digits"]["champion"]
    last = registry.audit("digits")[-1]
    assert last.to_version == final  # the trail ends where the alias is


def test_opposite_promotions_at_once_both_complete(registry, db_url, bundles):
    """Each moves the alias the other one reads: they take their turns (no deadlock),
    and the audit trail ends where the aliases point."""
    for bundle in bundles[:2]:
        registry.register(bundle, name="digits")
    for _ in range(3):
        registry.set_alias("digits", "champion", 1)
        registry.set_alias("digits", "challenger", 2)
        calls = [
            ("promote", ("digits", "challenger", "champion", "up", ANY)),
            ("promote", ("digits", "champion", "challenger", "down", ANY)),
        ]
        outcomes = _race(db_url, registry.root, calls)
        assert all(o[0] == "ok" for o in outcomes), outcomes
        pointed = registry.aliases("digits")["digits"]
        assert pointed["champion"] == pointed["challenger"]
        last = {m.alias: m.to_version for m in registry.audit("digits")}
        assert last == pointed


# --- archive, resolve, compare ----------------------------------------------------


def test_archive_is_refused_for_an_aliased_version(registry, bundles):
    for bundle in bundles:
        registry.register(bundle, name="digits")
    registry.set_alias("digits", "champion", 2)
    registry.set_alias("digits", "staging", 2)
    with pytest.raises(
        RegistryError, match=r"digits/2 is not archived: digits@champion, digits@staging"
    ):
        registry.archive("digits", 2)
    assert registry.get("digits", 2).status == "ready"
    archived = registry.archive("digits", 3, reason="worse")
    assert archived.status == "archived" and archived.archive_reason == "worse"
    assert archived.path.is_dir()  # nothing deleted
    assert [v.version for v in registry.versions("digits")] == [1, 2]
    assert [v.version for v in registry.versions("digits", include_archived=True)] == [1, 2, 3]
    assert registry.resolve("digits/3")[1].status == "archived"
    with pytest.raises(RegistryError, match="digits/3 is archived; an alias cannot point to it"):
        registry.set_alias("digits", "staging", 3)
    # the same bytes registered again are the archived version, not a new one
    assert registry.register(bundles[2], name="digits") == (archived, False)


def test_resolve_rules(registry, bundles):
    for bundle in bundles:
        registry.register(bundle, name="digits")
    path, record = registry.resolve("digits")
    assert record.version == 3 and path == registry.root / "digits" / "3"
    registry.archive("digits", 3)
    assert registry.resolve("digits")[1].version == 2  # newest non-archived
    registry.set_alias("digits", "champion", 1)
    assert registry.resolve("digits")[1].version == 1  # the champion when set
    assert registry.resolve(ModelRef("digits", alias="champion"))[1].version == 1
    assert registry.resolve("digits/2")[0] == registry.root / "digits" / "2"


def test_unknown_models_versions_and_aliases_are_named(registry, bundles):
    with pytest.raises(
        RegistryError, match=r"no model 'digits' in the registry at .* \(it is empty\)"
    ):
        registry.resolve("digits")
    registry.register(bundles[0], name="digits")
    with pytest.raises(RegistryError, match=r"no model 'cats' .*\(models: digits\)"):
        registry.resolve("cats@champion")
    with pytest.raises(RegistryError, match=r"model 'digits' has no version 4 \(it has 1\)"):
        registry.resolve("digits/4")
    with pytest.raises(
        RegistryError, match=r"model 'digits' has no alias 'champion' \(aliases: none\)"
    ):
        registry.resolve("digits@champion")
    with pytest.raises(RegistryError, match="has no version 2"):
        registry.set_alias("digits", "champion", 2)
    with pytest.raises(RegistryError, match="has no alias 'gone' to delete"):
        registry.delete_alias("digits", "gone")


def test_compare_shows_two_versions_side_by_side(registry, bundles):
    registry.register(bundles[0], name="digits")
    registry.register(bundles[1], name="digits")
    registry.set_alias("digits", "champion", 2)
    table = registry.compare("digits", 1, "champion")
    assert table["versions"] == [1, 2]
    assert table["metrics"]["val/acc"] == [1.0, 1.0]
    assert table["fingerprint"] == ["synthetic-images", "synthetic-images"] and table["same_data"]
    assert table["files"]["model.onnx"][0] == (bundles[0] / "model.onnx").stat().st_size
    assert table["size_bytes"][0] != table["size_bytes"][1] and not table["same_content"]


# --- no torch -------------------------------------------------------------------


def test_the_registry_works_without_torch(registry, db_url, bundles):
    registry.register(bundles[0], name="digits")
    registry.set_alias("digits", "champion", 1)
    script = textwrap.dedent(
        f"""
        import json, sys

        BLOCKED = ("torch", "onnx", "onnxscript", "onnx_ir", "lightning", "optuna", "sklearn")
        sys.modules.update(dict.fromkeys(BLOCKED))  # `import torch` now raises ImportError
        try:
            import torch  # noqa: F401
            raise SystemExit("torch import was not blocked")
        except ImportError:
            pass
        from cycleml.registry import Registry

        registry = Registry({db_url!r}, {str(registry.root)!r})
        path, record = registry.resolve("digits@champion")
        version, created = registry.register({str(bundles[1])!r}, name="digits")
        print(json.dumps({{
            "path": str(path), "version": record.version, "new": [version.version, created],
            "blocked_loaded": sorted(
                name for name, module in sys.modules.items()
                if module is not None and name.split(".")[0] in BLOCKED
            ),
        }}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        "path": str(registry.root / "digits" / "1"),
        "version": 1,
        "new": [2, True],
        "blocked_loaded": [],
    }
