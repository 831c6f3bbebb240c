"""Experiments and their changes, kept in the project's database.

:class:`ExperimentSpec` is one experiment as configured (``configs/serve.yaml`` →
``experiments:``, the admin route or the ``cycleml experiment`` command);
:meth:`ExperimentSpec.from_dict` checks it and names every problem.
:class:`ExperimentStore` starts, ramps and stops experiments in the database and
records each change, so that a running server (which polls the store) and every
later report see the same history.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import re
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine, exc, func, inspect, select, update

from cycleml.db import as_utc, check_columns, open_database, safe_url, utc_now
from cycleml.errors import ConfigError, CycleMLError
from cycleml.experiments.assign import boundaries
from cycleml.experiments.tables import (
    READ_TABLES,
    assignments,
    experiment_changes,
    experiments,
    units,
)
from cycleml.registry.errors import RegistryError
from cycleml.registry.refs import parse_model_ref

MODES = ("split", "shadow")
STATUSES = ("running", "stopped")
SOURCES = ("config", "admin", "cli")
CONTROL = "control"
MAX_NAME = 128
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
_UNIT_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")
_SPEC_KEYS = {"name", "model", "arms", "weights", "unit", "salt", "mode", "status"}
# the index by unit that ab_assignments had before ab_units took over its look-ups
_OLD_UNIT_INDEX = "ab_assignments_by_unit"
_ADD_UNITS_ATTEMPTS = 3

log = logging.getLogger(__name__)


class ExperimentError(CycleMLError, ValueError):
    """An experiment spec or change is invalid, or names an unknown experiment."""


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ExperimentError(f"{what} must be non-empty text, got {value!r}")
    if len(value) > MAX_NAME or not _NAME.fullmatch(value):
        raise ExperimentError(
            f"{what} {value!r} is not allowed: use letters, digits, '_', '.' and '-' "
            f"(at most {MAX_NAME} characters)"
        )
    return value


def check_weights(
    name: str, weights: object, arms: Mapping[str, str], partial: bool = False
) -> dict[str, float]:
    """``weights`` as {arm: float} in the arms' order, checked: known arms, each a finite
    number ≥ 0, summing to a positive number. ``partial`` lets arms be left out (their
    weight is then 0 here; ramp fills them from the current weights)."""
    if not isinstance(weights, Mapping) or not weights:
        raise ExperimentError(f"experiment '{name}': weights must be a mapping arm → number")
    unknown = sorted(set(weights) - set(arms))
    if unknown:
        raise ExperimentError(
            f"experiment '{name}': weights name unknown arms {unknown}; arms are {sorted(arms)}"
        )
    missing = sorted(set(arms) - set(weights))
    if missing and not partial:
        raise ExperimentError(f"experiment '{name}': weights miss the arms {missing}")
    checked: dict[str, float] = {}
    for arm in arms:
        if arm not in weights:
            continue
        value = weights[arm]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ExperimentError(
                f"experiment '{name}': weight of arm '{arm}' must be a number, got {value!r}"
            )
        if not math.isfinite(value) or value < 0:
            raise ExperimentError(
                f"experiment '{name}': weight of arm '{arm}' must be finite and ≥ 0, got {value}"
            )
        checked[arm] = float(value) + 0.0  # -0.0 is stored and shown as 0
    if partial:
        return checked
    try:
        total = math.fsum(checked.values())
    except OverflowError:  # each finite, their sum not: 1e308 + 1e308
        total = math.inf
    if not math.isfinite(total):
        raise ExperimentError(
            f"experiment '{name}': weights {checked} sum to more than the largest number; "
            "weights are relative: give shares such as 0.9 and 0.1"
        )
    if total <= 0:
        raise ExperimentError(
            f"experiment '{name}': weights {checked} do not sum to a positive number"
        )
    return checked


@dataclasses.dataclass(frozen=True)
class ExperimentSpec:
    """One experiment: which model's requests it splits, between which arms, how."""

    name: str
    model: str
    arms: Mapping[str, str]  # arm → model reference ("digits@champion", "digits/7")
    weights: Mapping[str, float]  # arm → weight ≥ 0 (relative; need not sum to 1)
    unit: Mapping[str, str]  # {"header": "X-User-Id"} or {"parameter": "user_id"}
    salt: str
    mode: str = "split"
    status: str = "running"
    revision: int = 0
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None

    @property
    def unit_header(self) -> str | None:
        return self.unit.get("header")

    @property
    def unit_parameter(self) -> str | None:
        return self.unit.get("parameter")

    @property
    def treatment(self) -> str | None:
        """The one non-control arm of a shadow experiment (None in split mode)."""
        if self.mode != "shadow":
            return None
        return next(arm for arm in self.arms if arm != CONTROL)

    @classmethod
    def from_dict(cls, data: object, name: str | None = None) -> ExperimentSpec:
        """A checked spec from its mapping form (config, admin route, CLI).

        ``name`` (from the config key or the URL) fills or must match ``data["name"]``.
        Weights default to equal; the salt defaults to the name; the unit defaults to
        the ``X-User-Id`` header.
        """
        if not isinstance(data, Mapping):
            raise ExperimentError(f"experiment spec must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - _SPEC_KEYS - {"revision", "created_at", "updated_at"})
        if unknown:
            raise ExperimentError(
                f"experiment spec has unknown keys {unknown}; allowed: {sorted(_SPEC_KEYS)}"
            )
        given = data.get("name", name)
        if name is not None and given != name:
            raise ExperimentError(f"experiment spec names '{given}' but is stored as '{name}'")
        exp = _check_name(given, "experiment name")
        model = _check_name(data.get("model"), f"experiment '{exp}': model")
        arms = data.get("arms")
        if not isinstance(arms, Mapping) or len(arms) < 2:
            raise ExperimentError(
                f"experiment '{exp}': arms must map at least two arm names to model "
                f"references, e.g. {{control: {model}@champion, treatment: {model}/7}}"
            )
        checked_arms: dict[str, str] = {}
        for arm, ref in arms.items():
            _check_name(arm, f"experiment '{exp}': arm name")
            try:
                parsed = parse_model_ref(ref)
            except RegistryError as err:
                raise ExperimentError(f"experiment '{exp}': arm '{arm}': {err}") from None
            checked_arms[str(arm)] = str(parsed)
        mode = data.get("mode", "split")
        if mode not in MODES:
            raise ExperimentError(f"experiment '{exp}': mode must be one of {MODES}, got {mode!r}")
        if mode == "shadow" and (len(checked_arms) != 2 or CONTROL not in checked_arms):
            raise ExperimentError(
                f"experiment '{exp}': shadow mode needs exactly the arm '{CONTROL}' and one "
                f"treatment arm, got {sorted(checked_arms)}"
            )
        weights = data.get("weights")
        if weights is None:
            weights = {arm: 1.0 for arm in checked_arms}
        checked_weights = check_weights(exp, weights, checked_arms)
        unit = data.get("unit", {"header": "X-User-Id"})
        if isinstance(unit, str):  # shorthand: "header:X-User-Id" / "parameter:user_id"
            kind, _, value = unit.partition(":")
            unit = {kind.strip(): value.strip()}
        if (
            not isinstance(unit, Mapping)
            or len(unit) != 1
            or next(iter(unit)) not in ("header", "parameter")
            or not isinstance(next(iter(unit.values())), str)
            or not _UNIT_NAME.fullmatch(next(iter(unit.values())))
        ):
            raise ExperimentError(
                f"experiment '{exp}': unit must be {{header: X-User-Id}} or "
                f"{{parameter: user_id}} (letters, digits, '_', '-'), got {unit!r}"
            )
        kind, value = next(iter(unit.items()))
        salt = data.get("salt", exp)
        if not isinstance(salt, str) or not salt or len(salt) > MAX_NAME or not salt.isprintable():
            raise ExperimentError(
                f"experiment '{exp}': salt must be non-empty printable text of at most "
                f"{MAX_NAME} characters, got {salt!r}"
            )
        status = data.get("status", "running")
        if status not in STATUSES:
            raise ExperimentError(
                f"experiment '{exp}': status must be one of {STATUSES}, got {status!r}"
            )
        # what GET /v1/experiments lists may be sent back as it is: its revision is
        # kept as given (the store counts its own), but must be a count
        revision = data.get("revision", 0)
        if revision is None:
            revision = 0
        if isinstance(revision, bool) or not isinstance(revision, int) or revision < 0:
            raise ExperimentError(
                f"experiment '{exp}': revision must be a whole number ≥ 0 (or left out: "
                f"the store counts the revisions), got {revision!r}"
            )
        return cls(
            name=exp,
            model=model,
            arms=checked_arms,
            weights=checked_weights,
            unit={kind: value.lower() if kind == "header" else value},
            salt=salt,
            mode=mode,
            status=status,
            revision=revision,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form (what the admin route answers and the CLI prints)."""
        return {
            "name": self.name,
            "model": self.model,
            "arms": dict(self.arms),
            "weights": dict(self.weights),
            "unit": dict(self.unit),
            "salt": self.salt,
            "mode": self.mode,
            "status": self.status,
            "revision": self.revision,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
        }

    def shares(self) -> dict[str, float]:
        """Each arm's share of the buckets (weights normalised to sum to 1)."""
        total = math.fsum(self.weights.values())
        return {arm: value / total for arm, value in self.weights.items()}

    def same_setup(self, other: ExperimentSpec) -> bool:
        """Whether both split the same model the same way (ignoring status and times)."""
        keys = ("model", "arms", "weights", "unit", "salt", "mode")
        return all(
            dict(getattr(self, k)) == dict(getattr(other, k))
            if isinstance(getattr(self, k), Mapping)
            else getattr(self, k) == getattr(other, k)
            for k in keys
        )


def _same_definition(a: ExperimentSpec, b: ExperimentSpec) -> bool:
    return (a.model, dict(a.arms), dict(a.unit), a.salt, a.mode) == (
        b.model,
        dict(b.arms),
        dict(b.unit),
        b.salt,
        b.mode,
    )


def _spec_from_row(row: Any) -> ExperimentSpec:
    created = row.created_at
    updated = row.updated_at
    return ExperimentSpec(
        name=row.name,
        model=row.model,
        arms=dict(row.arms),
        weights={arm: float(w) for arm, w in row.weights.items()},
        unit=dict(row.unit),
        salt=row.salt,
        mode=row.mode,
        status=row.status,
        revision=int(row.revision),
        created_at=as_utc(created),
        updated_at=as_utc(updated),
    )


def _check_source(source: str) -> str:
    if source not in SOURCES:
        raise ExperimentError(f"change source must be one of {SOURCES}, got {source!r}")
    return source


def _add_units(engine: Engine) -> None:
    """Create ``ab_units`` where it is missing. In a database written before it existed,
    it is filled in the same transaction from the latest split assignment of each
    (experiment, unit), in the order of the assignments, and the old index by unit of
    ``ab_assignments`` is dropped. Servers opening the database together: SQLite takes
    the write lock first, so one of them does it and the others find the table; a
    PostgreSQL server that loses the race fails its CREATE and finds the table when it
    tries again."""
    if inspect(engine).has_table(units.name):
        return  # the usual case: no write lock taken, no statement built
    a = assignments.c
    latest = (
        select(func.max(a.id))
        .where(a.mode == "split", a.unit.is_not(None))
        .group_by(a.experiment, a.unit)
    )
    fill = units.insert().from_select(
        ["experiment", "unit", "arm", "seen_at"],
        select(a.experiment, a.unit, a.arm, a.logged_at).where(a.id.in_(latest)).order_by(a.id),
    )
    for attempt in range(1, _ADD_UNITS_ATTEMPTS + 1):
        try:
            with engine.begin() as conn:
                if engine.dialect.name == "sqlite":
                    conn.exec_driver_sql("BEGIN IMMEDIATE")  # the check and the change as one
                if inspect(conn).has_table(units.name):
                    return
                units.create(conn)
                filled = conn.execute(fill).rowcount
                conn.exec_driver_sql(f"DROP INDEX IF EXISTS {_OLD_UNIT_INDEX}")
        except exc.SQLAlchemyError as err:
            if attempt == _ADD_UNITS_ATTEMPTS:
                reason = str(getattr(err, "orig", err)).strip().splitlines()[0]
                raise ConfigError(
                    f"cannot add the table {units.name} to database "
                    f"'{safe_url(engine.url)}': {reason}"
                ) from err
            log.debug("adding %s, attempt %d: %s", units.name, attempt, err)
            continue
        if filled:
            log.info("experiments: %s filled with the arms of %d unit(s)", units.name, filled)
        return


def _refuse_stopped(spec: ExperimentSpec) -> None:
    """A spec that starts an experiment (or configures one) cannot say it is stopped:
    starting it would silently run it."""
    if spec.status == "stopped":
        raise ExperimentError(
            f"experiment '{spec.name}': status 'stopped' in a spec that starts it; leave "
            f"status out, and stop a running experiment with `cycleml experiment stop "
            f"name={spec.name}` (or POST /v1/experiments/{spec.name}/stop): a stopped "
            "experiment stays stopped across server restarts"
        )


class ExperimentStore:
    """Experiments in the database at ``db_url`` (tables created on first use).

    ``must_exist``: a missing SQLite file is a ConfigError, not created (commands that
    read experiments, or change one already started); a database written before
    ``ab_units`` existed is left as it is (they do not read it). A store opened to write
    adds ``ab_units`` to such a database (:func:`_add_units`)."""

    def __init__(self, db_url: str, must_exist: bool = False) -> None:
        self.db_url = db_url
        self.engine: Engine = open_database(
            db_url,
            READ_TABLES,
            must_exist=must_exist,
            what="experiment",
            created_by="`cycleml experiment start` or `cycleml serve`",
        )
        if not must_exist:
            try:
                _add_units(self.engine)
                check_columns(self.engine, [units], safe_url(db_url))
            except BaseException:
                self.engine.dispose()
                raise

    def close(self) -> None:
        self.engine.dispose()

    def get(self, name: str) -> ExperimentSpec:
        with self.engine.connect() as conn:
            row = conn.execute(select(experiments).where(experiments.c.name == name)).first()
            if row is None:
                known = sorted(conn.execute(select(experiments.c.name)).scalars())
                raise ExperimentError(
                    f"no experiment named '{name}'; known experiments: {known or 'none'}"
                )
        return _spec_from_row(row)

    def list(self) -> list[ExperimentSpec]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(experiments).order_by(experiments.c.name)).all()
        return [_spec_from_row(row) for row in rows]

    def start(self, spec: ExperimentSpec, source: str, note: str = "") -> ExperimentSpec:
        """Store ``spec`` as running (a new experiment, or an update of one by that name).

        Refuses a second running experiment on the same model. Starting an experiment
        that already runs with the same setup changes nothing (a server restarted with
        the same config does not add a change).
        """
        _check_source(source)
        spec = ExperimentSpec.from_dict(spec.to_dict())  # re-check a hand-made spec
        _refuse_stopped(spec)
        now = utc_now()
        with self.engine.begin() as conn:
            clash = conn.execute(
                select(experiments.c.name).where(
                    experiments.c.model == spec.model,
                    experiments.c.status == "running",
                    experiments.c.name != spec.name,
                )
            ).first()
            if clash is not None:
                raise ExperimentError(
                    f"experiment '{spec.name}': model '{spec.model}' already has the running "
                    f"experiment '{clash.name}'; stop it first (one experiment per model)"
                )
            row = conn.execute(select(experiments).where(experiments.c.name == spec.name)).first()
            values = {
                "model": spec.model,
                "arms": dict(spec.arms),
                "weights": dict(spec.weights),
                "unit": dict(spec.unit),
                "salt": spec.salt,
                "mode": spec.mode,
                "status": "running",
                "updated_at": now,
            }
            if row is None:
                conn.execute(
                    experiments.insert().values(
                        name=spec.name, created_at=now, revision=1, **values
                    )
                )
                before, action = None, "start"
            else:
                current = _spec_from_row(row)
                if current.status == "running" and current.same_setup(spec):
                    return current
                action = "start" if current.status == "stopped" else "update"
                before = dict(current.weights)
                conn.execute(
                    update(experiments)
                    .where(experiments.c.name == spec.name)
                    .values(revision=experiments.c.revision + 1, **values)
                )
            self._record(conn, spec.name, now, source, action, before, dict(spec.weights), note)
        return self.get(spec.name)

    def ensure(self, spec: ExperimentSpec, source: str = "config") -> ExperimentSpec:
        """Store a configured experiment when a server starts. A new one is started; one
        stored with the same setup (model, arms, unit, salt, mode) stays as stored, so
        its ramps and its stop survive restarts; one whose setup changed is updated
        (and runs)."""
        _refuse_stopped(spec)
        for attempt in range(2):
            try:
                current = self.get(spec.name)
            except ExperimentError:
                try:
                    return self.start(spec, source)
                except exc.IntegrityError:  # another process stored it meanwhile
                    if attempt:
                        raise
                    continue
            if _same_definition(current, spec):
                return current
            return self.start(spec, source, note="configuration changed")
        raise AssertionError("unreachable")

    def ramp(
        self, name: str, weights: Mapping[str, float], source: str, note: str = ""
    ) -> ExperimentSpec:
        """Change a running experiment's weights live; arms left out keep theirs.

        A weight of 0 stops sending units to that arm. The new weights must still sum
        to a positive number.
        """
        _check_source(source)
        current = self.get(name)
        if current.status != "running":
            raise ExperimentError(
                f"experiment '{name}' is stopped; start it again before ramping it"
            )
        given = check_weights(name, weights, current.arms, partial=True)
        after = {arm: given.get(arm, current.weights[arm]) for arm in current.arms}
        after = check_weights(name, after, current.arms)
        boundaries(after)
        now = utc_now()
        with self.engine.begin() as conn:
            conn.execute(
                update(experiments)
                .where(experiments.c.name == name)
                .values(weights=after, updated_at=now, revision=experiments.c.revision + 1)
            )
            self._record(conn, name, now, source, "ramp", dict(current.weights), after, note)
        return self.get(name)

    def stop(self, name: str, source: str, note: str = "") -> ExperimentSpec:
        """Stop an experiment: its model's requests go to the model's default version
        again. Stopping a stopped experiment changes nothing."""
        _check_source(source)
        current = self.get(name)
        if current.status == "stopped":
            return current
        now = utc_now()
        with self.engine.begin() as conn:
            conn.execute(
                update(experiments)
                .where(experiments.c.name == name)
                .values(status="stopped", updated_at=now, revision=experiments.c.revision + 1)
            )
            weights = dict(current.weights)
            self._record(conn, name, now, source, "stop", weights, weights, note)
        return self.get(name)

    def changes(self, name: str) -> list[dict]:
        """Every change of experiment ``name``, oldest first."""
        self.get(name)
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(experiment_changes)
                .where(experiment_changes.c.experiment == name)
                .order_by(experiment_changes.c.id)
            ).all()
        return [
            {
                "id": row.id,
                "experiment": row.experiment,
                "changed_at": as_utc(row.changed_at),
                "source": row.source,
                "action": row.action,
                "weights_before": row.weights_before,
                "weights_after": row.weights_after,
                "note": row.note,
            }
            for row in rows
        ]

    @staticmethod
    def _record(
        conn: Any,
        name: str,
        now: dt.datetime,
        source: str,
        action: str,
        before: dict | None,
        after: dict,
        note: str,
    ) -> None:
        conn.execute(
            experiment_changes.insert().values(
                experiment=name,
                changed_at=now,
                source=source,
                action=action,
                weights_before=before,
                weights_after=after,
                note=str(note or ""),
            )
        )
