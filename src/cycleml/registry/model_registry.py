"""The model registry: versions of bundles under ``<root>/<name>/<version>/``, their
records and aliases in the database (SQLite inside the root, or PostgreSQL).

The root is a model repository that ``cycleml serve`` reads as it is: only model
folders are visible in it (the SQLite file and the hidden staging folders are not).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import exc, func, insert, select, update
from sqlalchemy.engine import Connection, RowMapping

from cycleml.db import as_utc, open_database, safe_url, utc_now
from cycleml.errors import CycleMLError
from cycleml.inference.bundle import ModelBundle, load_bundle
from cycleml.registry.aliases import ANY, current_version, lock_aliases, move_alias
from cycleml.registry.errors import AliasConflict, GateRefused, RegistryError
from cycleml.registry.lineage import bundle_lineage, content_hash, hash_files
from cycleml.registry.records import ARCHIVED, READY, AliasMove, Evaluation, ModelVersion
from cycleml.registry.refs import ModelRef, check_alias, check_name, check_version, parse_model_ref
from cycleml.registry.tables import TABLES, alias_moves, aliases, evaluations, versions

log = logging.getLogger(__name__)

DB_FILE = "registry.db"
CHAMPION = "champion"
# a register that loses the race for a version number, or a move with expected=ANY
# that loses its compare-and-set, tries again this often
_ATTEMPTS = 20
# the commands that make a registry (the others need one)
CREATED_BY = "`cycleml registry register` or `cycleml export` with export.register=true"
T = TypeVar("T")


def who_am_i() -> str:
    """``user@host`` of this process (the uid when the user has no name)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


class Registry:
    """Register bundles as numbered versions, move aliases, resolve model references.

    ``db_url`` None keeps the records in ``<root>/registry.db`` (SQLite). With
    ``must_exist`` (commands that only read, or move aliases of versions already
    there) a registry whose SQLite file is missing is a :class:`RegistryError`
    naming it, and neither the root nor the file is created.
    """

    def __init__(
        self, db_url: str | None = None, root: str | Path = "registry", must_exist: bool = False
    ) -> None:
        self.root = Path(root).expanduser()
        if db_url is None:
            db_file = self.root / DB_FILE
            if must_exist and not db_file.is_file():
                raise RegistryError(
                    f"no registry at '{self.root}': {db_file} does not exist (nothing was "
                    f"registered there); check the registry root, or create it with {CREATED_BY}"
                )
            self._make_root()
            db_url = f"sqlite:///{db_file}"
        self.db_url = db_url
        try:
            self.engine = open_database(
                db_url, TABLES, must_exist=must_exist, what="registry", created_by=CREATED_BY
            )
        except CycleMLError as err:
            raise RegistryError(f"registry database: {err}") from err

    def __repr__(self) -> str:
        return f"Registry(db_url={safe_url(self.db_url)!r}, root={str(self.root)!r})"

    def close(self) -> None:
        self.engine.dispose()

    # --- versions -----------------------------------------------------------------

    def register(
        self,
        bundle: str | Path,
        name: str | None = None,
        description: str = "",
        tags: Mapping[str, str] | None = None,
        parent: str | None = None,
    ) -> tuple[ModelVersion, bool]:
        """Copy a bundle folder in as the next version of ``name`` (default: the
        bundle's own name). Returns ``(version, created)``; content byte-identical to
        a registered version of the model gives that version and ``created=False``.

        The bundle is validated and copied into a hidden staging folder under the
        root, validated and hashed again there, renamed into ``<root>/<name>/<n>``
        and recorded in one transaction: a failure leaves neither folder nor row.
        """
        source = _load(Path(bundle))
        name = check_name(name if name else source.meta.name)
        tags = _check_tags(tags)
        parent_ref = self.resolve(parent)[1].ref if parent else None
        self._make_root(writable=True)
        model_dir = self.root / name
        if model_dir.exists() and not model_dir.is_dir():
            raise RegistryError(f"'{model_dir}' is a file, not a model folder; move it away")
        # hidden, and the bundle one level down: a server scanning the root sees neither
        # a model folder nor a version folder until the rename below
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{name}-", dir=self.root))
        try:
            copy = staging / "bundle"
            try:
                shutil.copytree(source.path, copy, symlinks=True)  # links are refused below
            except (OSError, shutil.Error) as err:
                raise RegistryError(
                    f"cannot copy bundle '{source.path}' into {self.root}: {err}"
                ) from err
            _load(copy)  # what is registered is what was copied, checked again
            files, size = hash_files(copy, shown=source.path)
            digest = content_hash(files)
            existing = self._by_content(name, digest)
            if existing is not None:
                log.info("%s holds the same content as %s", source.path, existing.ref)
                return existing, False
            lineage = bundle_lineage(source)
            lineage["parent"] = parent_ref
            row = {
                "model": name,
                "status": READY,
                "content_hash": digest,
                "files": files,
                "size_bytes": size,
                "created_by": who_am_i(),
                "description": str(description or ""),
                "tags": tags,
                "lineage": lineage,
                "archive_reason": "",
            }
            return self._insert_version(copy, row)
        except BaseException:
            _remove_if_empty(model_dir)  # a first version that failed leaves no model folder
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _insert_version(self, copy: Path, row: dict[str, Any]) -> tuple[ModelVersion, bool]:
        """Take the next version number: insert the row, rename the folder into place,
        commit. A racing register that took the number first makes the insert fail on
        the primary key (or on the content key: the same bytes), and this one retries."""
        name = row["model"]
        model_dir = self.root / name
        for _ in range(_ATTEMPTS):
            number = self._next_version(name, model_dir)
            target = model_dir / str(number)
            values = {**row, "version": number, "created_at": utc_now()}
            with self.engine.connect() as conn:
                transaction = conn.begin()
                try:
                    conn.execute(insert(versions).values(**values))
                    model_dir.mkdir(exist_ok=True)
                    if target.exists():  # a folder is never replaced
                        raise FileExistsError(target)
                    os.rename(copy, target)
                except exc.IntegrityError:
                    transaction.rollback()
                    same = self._by_content(name, row["content_hash"])
                    if same is not None:
                        return same, False
                    continue
                except (FileExistsError, FileNotFoundError):
                    # the number's folder appeared, or a failed first register removed
                    # the empty model folder meanwhile: take the next turn
                    transaction.rollback()
                    continue
                except OSError as err:
                    transaction.rollback()
                    raise RegistryError(f"cannot write version folder '{target}': {err}") from err
                except BaseException:
                    transaction.rollback()
                    raise
                try:
                    transaction.commit()
                except BaseException:
                    try:
                        os.rename(target, copy)
                    except OSError:
                        shutil.rmtree(target, ignore_errors=True)
                    raise
            log.info("registered %s/%d at %s", name, number, target)
            return self._record(values), True
        raise RegistryError(f"could not take a version number for model '{name}'; try again")

    def _next_version(self, name: str, model_dir: Path) -> int:
        """One more than the highest version in the database or on disk (a stray
        numbered folder is never overwritten)."""
        with self.engine.connect() as conn:
            in_db = conn.execute(
                select(func.max(versions.c.version)).where(versions.c.model == name)
            ).scalar()
        on_disk = [int(p.name) for p in _children(model_dir) if p.name.isdigit()]
        return max([in_db or 0, *on_disk]) + 1

    def models(self) -> list[str]:
        """Every registered model name (also those whose versions are all archived)."""
        with self.engine.connect() as conn:
            return list(
                conn.execute(select(versions.c.model).distinct().order_by(versions.c.model))
                .scalars()
                .all()
            )

    def versions(self, name: str, include_archived: bool = False) -> list[ModelVersion]:
        """The versions of a model, oldest first; archived ones only when asked."""
        name = check_name(name)
        query = select(versions).where(versions.c.model == name).order_by(versions.c.version)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        if not rows:
            raise self._unknown_model(name)
        return [self._record(row) for row in rows if include_archived or row["status"] != ARCHIVED]

    def get(self, name: str, version: int | str) -> ModelVersion:
        name = check_name(name)
        number = check_version(version, name)
        with self.engine.connect() as conn:
            row = (
                conn.execute(
                    select(versions).where(versions.c.model == name, versions.c.version == number)
                )
                .mappings()
                .one_or_none()
            )
        if row is None:
            have = [v.version for v in self.versions(name, include_archived=True)]
            raise RegistryError(
                f"model '{name}' has no version {number} (it has {', '.join(map(str, have))})"
            )
        return self._record(row)

    def resolve(self, ref: str | ModelRef) -> tuple[Path, ModelVersion]:
        """The folder and record a reference names: ``name/<n>`` that version (also
        when archived), ``name@<alias>`` the version the alias points to, and a bare
        ``name`` the ``champion`` alias when set, else the newest non-archived version."""
        ref = parse_model_ref(ref)
        if ref.version is not None:
            record = self.get(ref.name, ref.version)
        elif ref.alias is not None:
            pointed = self.aliases(ref.name).get(ref.name, {})
            if ref.alias not in pointed:
                self.versions(ref.name)  # an unknown model is named as such
                have = ", ".join(sorted(pointed)) or "none"
                raise RegistryError(
                    f"model '{ref.name}' has no alias '{ref.alias}' (aliases: {have})"
                )
            record = self.get(ref.name, pointed[ref.alias])
        else:
            champion = self.aliases(ref.name).get(ref.name, {}).get(CHAMPION)
            if champion is not None:
                record = self.get(ref.name, champion)
            else:
                ready = self.versions(ref.name)
                if not ready:
                    raise RegistryError(f"model '{ref.name}' has only archived versions")
                record = ready[-1]
        return record.path, record

    def archive(self, name: str, version: int | str, reason: str = "") -> ModelVersion:
        """Hide a version from listings and bare-name resolution (its folder and row
        stay). Refused while an alias points to it."""
        record = self.get(name, version)
        if record.status == ARCHIVED:
            return record
        with self.engine.begin() as conn:
            # the version row is written first: a concurrent alias move to it waits
            # for this transaction (PostgreSQL row lock, SQLite's one writer)
            conn.execute(
                update(versions)
                .where(versions.c.model == record.name, versions.c.version == record.version)
                .values(status=ARCHIVED, archived_at=utc_now(), archive_reason=str(reason))
            )
            pointing = (
                conn.execute(
                    select(aliases.c.alias).where(
                        aliases.c.model == record.name, aliases.c.version == record.version
                    )
                )
                .scalars()
                .all()
            )
            if pointing:
                names = ", ".join(f"{record.name}@{a}" for a in sorted(pointing))
                raise RegistryError(
                    f"{record.ref} is not archived: {names} point(s) to it; "
                    "move or delete the alias first"
                )
        log.info("archived %s", record.ref)
        return self.get(record.name, record.version)

    def compare(self, name: str, a: int | str, b: int | str) -> dict[str, Any]:
        """Two versions side by side: metrics, dataset fingerprints, sizes, origin.
        ``a`` and ``b`` are version numbers or aliases."""
        first, second = (self._version_or_alias(name, x) for x in (a, b))

        def pair(pick: Callable[[ModelVersion], Any]) -> list[Any]:
            return [pick(first), pick(second)]

        metric_names = sorted(
            set(first.lineage.get("metrics") or {}) | set(second.lineage.get("metrics") or {})
        )
        file_names = sorted(set(first.files) | set(second.files))
        return {
            "model": first.name,
            "versions": pair(lambda v: v.version),
            "status": pair(lambda v: v.status),
            "metrics": {
                m: pair(lambda v, m=m: (v.lineage.get("metrics") or {}).get(m))
                for m in metric_names
            },
            "fingerprint": pair(lambda v: v.lineage.get("fingerprint")),
            "same_data": first.lineage.get("fingerprint") == second.lineage.get("fingerprint"),
            "run_id": pair(lambda v: v.lineage.get("run_id")),
            "git_commit": pair(lambda v: v.lineage.get("git_commit")),
            "size_bytes": pair(lambda v: v.size_bytes),
            "files": {f: pair(lambda v, f=f: _file_size(v, f)) for f in file_names},
            "same_content": first.content_hash == second.content_hash,
            "created_at": pair(lambda v: v.created_at.isoformat()),
        }

    # --- aliases ------------------------------------------------------------------

    def aliases(self, name: str | None = None) -> dict[str, dict[str, int]]:
        """``{model: {alias: version}}`` in one query (cheap enough to poll)."""
        query = select(aliases.c.model, aliases.c.alias, aliases.c.version)
        if name is not None:
            query = query.where(aliases.c.model == name)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        table: dict[str, dict[str, int]] = {}
        for model, alias, version in rows:
            table.setdefault(model, {})[alias] = version
        return table

    def set_alias(
        self,
        name: str,
        alias: str,
        version: int | str,
        reason: str = "",
        expected: int | None | Any = ANY,
    ) -> AliasMove | None:
        """Point ``name@alias`` at ``version`` (not an archived one), if it still
        points at ``expected`` (None: unset; ANY: wherever). Returns the move, or None
        when it already pointed there. Losing to a concurrent move with an
        ``expected`` raises :class:`AliasConflict`."""
        alias = check_alias(alias)
        record = self.get(name, version)
        self._refuse_archived(record)

        def work(conn: Connection) -> AliasMove | None:
            move = move_alias(
                conn, record.name, alias, record.version, expected, who_am_i(), reason, utc_now()
            )
            if move is not None:
                self._check_still_ready(conn, record)
            return move

        return self._write(work, expected)

    def delete_alias(
        self, name: str, alias: str, reason: str = "", expected: int | None | Any = ANY
    ) -> AliasMove:
        """Remove ``name@alias`` (recorded in the audit trail like any move)."""
        name, alias = check_name(name), check_alias(alias)
        if alias not in self.aliases(name).get(name, {}):
            self.versions(name)
            raise RegistryError(f"model '{name}' has no alias '{alias}' to delete")

        def work(conn: Connection) -> AliasMove:
            move = move_alias(conn, name, alias, None, expected, who_am_i(), reason, utc_now())
            if move is None:
                raise AliasConflict(f"alias {name}@{alias} was deleted meanwhile")
            return move

        return self._write(work, expected)

    def promote(
        self,
        name: str,
        source_alias: str,
        target_alias: str,
        reason: str = "",
        expected: int | None | Any = ANY,
        require_gate: bool = False,
        force: bool = False,
    ) -> AliasMove | None:
        """Atomically point ``target_alias`` where ``source_alias`` points
        (``promote digits challenger champion``). ``expected`` guards the target's
        current version as in :meth:`set_alias`.

        ``require_gate`` refuses a version whose last gate decision failed (a
        :class:`GateRefused` naming its reasons); ``force`` promotes it anyway and
        says so in the audit trail. A version never gated is promoted either way."""
        name = check_name(name)
        source, target = check_alias(source_alias), check_alias(target_alias)
        if source == target:
            raise RegistryError(f"promote {name}: source and target alias are both '{source}'")
        self.resolve(ModelRef(name, alias=source))  # names an unknown model or alias

        def work(conn: Connection) -> AliasMove | None:
            # PostgreSQL: both rows locked in name order, so that promotions in opposite
            # directions wait for each other instead of deadlocking
            version = lock_aliases(conn, name, [source, target]).get(source)
            if version is None:
                raise RegistryError(f"model '{name}' has no alias '{source}'")
            why = reason
            if require_gate:
                failed = self._failed_gate(conn, name, version)
                if failed is not None and not force:
                    raise GateRefused(
                        f"{name}/{version} ({name}@{source}) failed its last gate "
                        f"({failed.at:%Y-%m-%d %H:%M:%SZ}): {'; '.join(failed.reasons)}. "
                        "Promote it anyway with force=true"
                    )
                if failed is not None:
                    note = f"forced past a failed gate: {'; '.join(failed.reasons)}"
                    why = f"{reason} ({note})" if reason else note
            move = move_alias(conn, name, target, version, expected, who_am_i(), why, utc_now())
            # under SQLite the first write took the lock: the source must still agree
            if current_version(conn, name, source) != version:
                raise AliasConflict(f"alias {name}@{source} moved during the promotion")
            return move

        return self._write(work, expected)

    def audit(self, name: str) -> list[AliasMove]:
        """Every alias move of a model, oldest first."""
        name = check_name(name)
        query = select(alias_moves).where(alias_moves.c.model == name).order_by(alias_moves.c.id)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [
            AliasMove(
                r["model"],
                r["alias"],
                r["from_version"],
                r["to_version"],
                r["who"],
                as_utc(r["at"]),
                r["reason"],
            )
            for r in rows
        ]

    # --- gate decisions -----------------------------------------------------------

    def record_evaluation(
        self, name: str, version: int | str, decision: Mapping[str, Any]
    ) -> Evaluation:
        """Store a gate decision on a version. ``decision`` is the gate's own record
        (``passed``, ``reasons``, ``champion``, rules, table, time) and is kept whole;
        a version may collect several (each gate run adds one, the last one counts)."""
        record = self.get(name, version)
        if not isinstance(decision, Mapping) or not isinstance(decision.get("passed"), bool):
            raise RegistryError(
                f"a gate decision for {record.ref} needs passed=true/false, got {decision!r:.200}"
            )
        reasons = decision.get("reasons") or []
        if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
            raise RegistryError(
                f"a gate decision's reasons must be a list of text, got {reasons!r}"
            )
        champion = decision.get("champion")
        values = {
            "model": record.name,
            "version": record.version,
            "passed": bool(decision["passed"]),
            "reasons": list(reasons),
            "champion": None if champion is None else str(champion),
            "decision": _json_safe(dict(decision)),
            "who": who_am_i(),
            "at": utc_now(),
        }
        with self.engine.begin() as conn:
            row_id = conn.execute(insert(evaluations).values(**values)).inserted_primary_key[0]
        log.info("gate decision on %s: %s", record.ref, "passed" if values["passed"] else "failed")
        return _evaluation({**values, "id": row_id})

    def evaluations(self, name: str, version: int | str) -> list[Evaluation]:
        """Every gate decision stored on a version, oldest first."""
        record = self.get(name, version)
        query = (
            select(evaluations)
            .where(evaluations.c.model == record.name, evaluations.c.version == record.version)
            .order_by(evaluations.c.id)
        )
        with self.engine.connect() as conn:
            return [_evaluation(row) for row in conn.execute(query).mappings()]

    def last_evaluation(self, name: str, version: int | str) -> Evaluation | None:
        """The version's latest gate decision (the one that counts), or None if never gated."""
        found = self.evaluations(name, version)
        return found[-1] if found else None

    def _failed_gate(self, conn: Connection, name: str, version: int) -> Evaluation | None:
        """The version's last gate decision if it failed (inside a transaction)."""
        row = (
            conn.execute(
                select(evaluations)
                .where(evaluations.c.model == name, evaluations.c.version == version)
                .order_by(evaluations.c.id.desc())
                .limit(1)
            )
            .mappings()
            .one_or_none()
        )
        if row is None or row["passed"]:
            return None
        return _evaluation(row)

    # --- helpers ------------------------------------------------------------------

    def _write(self, work: Callable[[Connection], T], expected: Any) -> T:
        """Run ``work`` in one transaction; a lost compare-and-set is retried only
        when the caller did not say what it expected."""
        for _ in range(_ATTEMPTS - 1):
            try:
                with self.engine.begin() as conn:
                    return work(conn)
            except AliasConflict:
                if expected is not ANY:
                    raise
        with self.engine.begin() as conn:
            return work(conn)

    def _refuse_archived(self, record: ModelVersion) -> None:
        if record.status == ARCHIVED:
            raise RegistryError(f"{record.ref} is archived; an alias cannot point to it")

    def _check_still_ready(self, conn: Connection, record: ModelVersion) -> None:
        """Inside the alias move's transaction, after its write: the version was not
        archived meanwhile (the row lock orders this against a concurrent archive)."""
        status = conn.execute(
            select(versions.c.status)
            .where(versions.c.model == record.name, versions.c.version == record.version)
            .with_for_update()
        ).scalar_one()
        if status == ARCHIVED:
            raise RegistryError(f"{record.ref} was archived meanwhile; the alias was not moved")

    def _version_or_alias(self, name: str, which: int | str) -> ModelVersion:
        if isinstance(which, str) and not which.isdigit():
            return self.resolve(ModelRef(check_name(name), alias=check_alias(which)))[1]
        return self.get(name, which)

    def _by_content(self, name: str, digest: str) -> ModelVersion | None:
        with self.engine.connect() as conn:
            row = (
                conn.execute(
                    select(versions).where(
                        versions.c.model == name, versions.c.content_hash == digest
                    )
                )
                .mappings()
                .one_or_none()
            )
        return None if row is None else self._record(row)

    def _record(self, row: RowMapping | Mapping[str, Any]) -> ModelVersion:
        return ModelVersion(
            name=row["model"],
            version=int(row["version"]),
            path=self.root / row["model"] / str(row["version"]),
            status=row["status"],
            content_hash=row["content_hash"],
            files=dict(row["files"]),
            created_at=as_utc(row["created_at"]),
            created_by=row["created_by"],
            description=row["description"],
            tags=dict(row["tags"]),
            lineage=dict(row["lineage"]),
            size_bytes=int(row["size_bytes"]),
            archived_at=as_utc(row["archived_at"]) if row.get("archived_at") else None,
            archive_reason=row.get("archive_reason") or "",
        )

    def _unknown_model(self, name: str) -> RegistryError:
        known = self.models()
        have = f" (models: {', '.join(known)})" if known else " (it is empty)"
        return RegistryError(f"no model '{name}' in the registry at {self.root}{have}")

    def _make_root(self, writable: bool = False) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RegistryError(
                f"registry root '{self.root}' cannot be created: {err.strerror or err}"
            ) from err
        if writable and not os.access(self.root, os.W_OK | os.X_OK):
            raise RegistryError(f"registry root '{self.root}' is not writable")


def _load(path: Path) -> ModelBundle:
    try:
        return load_bundle(path)
    except CycleMLError as err:
        raise RegistryError(f"bundle '{path}' fails validation: {err}") from err


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty (other versions), or not there
        folder.rmdir()


def _check_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in (tags or {}).items():
        if not isinstance(key, str) or not key:
            raise RegistryError(f"tag name {key!r} must be non-empty text")
        out[key] = "" if value is None else str(value)
    return out


def _children(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if p.is_dir()]
    except FileNotFoundError:
        return []


def _file_size(record: ModelVersion, file: str) -> int | None:
    if file not in record.files:
        return None
    try:
        return (record.path / file).stat().st_size
    except OSError:
        return None


def _evaluation(row: Mapping[str, Any]) -> Evaluation:
    return Evaluation(
        model=row["model"],
        version=int(row["version"]),
        passed=bool(row["passed"]),
        reasons=list(row["reasons"] or []),
        champion=row["champion"],
        decision=dict(row["decision"] or {}),
        who=row["who"],
        at=as_utc(row["at"]),
        id=int(row["id"]),
    )


def _json_safe(value: Any) -> Any:
    """``value`` as JSON the database stores: NaN and infinities become null (JSON has
    none), numpy numbers and other objects their plain or text form."""

    def clean(item: Any) -> Any:
        if isinstance(item, float):
            return item if math.isfinite(item) else None
        if isinstance(item, Mapping):
            return {str(k): clean(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [clean(v) for v in item]
        return item

    return clean(json.loads(json.dumps(value, default=_plain)))


def _plain(item: Any) -> Any:
    if hasattr(item, "item"):  # numpy scalars
        return item.item()
    if hasattr(item, "tolist"):
        return item.tolist()
    return str(item)
