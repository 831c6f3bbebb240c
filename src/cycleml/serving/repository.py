"""The models a server holds: one bundle, or a repository ``<root>/<model>/<version>/``.

Loading happens off the event loop. A new version is loaded and warmed up before it
is swapped into the routing table; the version it replaces stops taking requests at
that moment, finishes the ones it holds, and only then shuts its instances down, so a
reload never fails a request in flight.

A version that fails to load never replaces one that works: the model keeps serving
what it served, the failure is reported (log, ``cycleml_model_load_failures_total``, the
model's readiness and the repository index), and the watch tries that version again only
once its files change.

A registry root is followed by alias: the versions aliases point to are served, and
``model@alias`` routes to the version its alias points to. When an alias moves, the new
version is loaded and warmed up first, then the alias switches to it in one step;
requests already holding the old version finish on it, and a version no alias points
to any more is retired once they are done.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cycleml.errors import CycleMLError
from cycleml.inference import load_bundle
from cycleml.registry.errors import RegistryError
from cycleml.registry.refs import MAX_NAME_LENGTH, check_name
from cycleml.serving.metrics import ServingMetrics
from cycleml.serving.prediction_logger import PredictionLogger
from cycleml.serving.registry_follow import FollowedModel, RegistryFollower
from cycleml.serving.served_model import ServedModel
from cycleml.serving.settings import ServeSettings

log = logging.getLogger(__name__)

BUNDLE_FILE = "bundle.json"


class ModelNotFound(LookupError):
    """No such model or version is served (HTTP 404); the message lists what is."""


class ModelUnavailable(RuntimeError):
    """The model exists but is not ready: still loading, or its load failed (HTTP 503)."""


class LoadFailed(CycleMLError):
    """An explicit load found a version that does not load; what was served stays."""


class BadModelRef(ValueError):
    """A malformed model reference, or one that names both an alias and a version
    (HTTP 400)."""


def _shown(text: str) -> str:
    """``text`` quoted for an error message; a long one cut short (it comes from a URL)."""
    if len(text) <= 2 * MAX_NAME_LENGTH:
        return repr(text)
    return f"{text[:64]!r}... ({len(text)} characters)"


def _name_problem(part: str, what: str) -> str | None:
    if len(part) > MAX_NAME_LENGTH:
        return f"{what} {part[:64]!r}... is {len(part)} characters long; at most {MAX_NAME_LENGTH}"
    try:
        check_name(part, what)
    except RegistryError as err:
        return str(err)
    return None


def malformed_reference(reference: str, name_served: bool = False) -> BadModelRef | None:
    """The 400 error for a model reference (``name`` or ``name@alias``, from a URL) that
    breaks the registry's naming rules; None when it is well formed.

    Asked only once a look-up has failed: a served name costs requests no check, and a
    repository folder may serve a name the registry would refuse. ``name_served``: the
    name part is served, so only the alias is checked."""
    name, at, alias = reference.partition("@")
    parts = [] if name_served else [(name, "model name")]
    if at:
        parts.append((alias, "alias"))
    for part, what in parts:
        problem = _name_problem(part, what)
        if problem is not None:
            return BadModelRef(f"model reference {_shown(reference)}: {problem}")
    return None


def malformed_name(name: str) -> BadModelRef | None:
    """The 400 error for a model name (no alias: the repository routes) that breaks the
    naming rules; None when it is well formed. Asked only once a look-up has failed."""
    problem = _name_problem(name, "model name")
    if problem is None:
        return None
    if "@" in name and _name_problem(name.partition("@")[0], "model name") is None:
        problem += "; this route takes a model name, not name@alias"
    return BadModelRef(problem)


@dataclass(frozen=True)
class VersionOnDisk:
    model: str
    version: str
    path: Path
    # changes whenever bundle.json or the model file is rewritten
    signature: tuple


@dataclass(frozen=True)
class LoadFailure:
    """Why a version did not load, and the files it was tried with."""

    signature: tuple
    message: str


def version_order(version: str) -> tuple:
    """Numeric versions sort as numbers and after non-numeric ones."""
    return (1, int(version), "") if version.isdigit() else (0, 0, version)


def _signature(path: Path) -> tuple:
    parts = []
    for child in sorted(path.iterdir()):
        if child.is_file():
            stat = child.stat()
            parts.append((child.name, stat.st_size, stat.st_mtime_ns))
    return tuple(parts)


class ModelRepository:
    """Finds, loads, routes to and reloads the served model versions."""

    def __init__(
        self,
        settings: ServeSettings,
        metrics: ServingMetrics,
        prediction_logger: PredictionLogger | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        # every loaded version logs its sampled predictions here (None: the log is off)
        self.prediction_logger = prediction_logger
        self.root = Path(settings.path)
        self.single_bundle = (self.root / BUNDLE_FILE).is_file()
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()
        # routing table: model -> version -> served model; and each model's default version
        self._live: dict[str, dict[str, ServedModel]] = {}
        self._default: dict[str, str] = {}
        self._signatures: dict[tuple[str, str], tuple] = {}
        # model-level problems (a pin that matches no folder, an unreadable repository)
        self._failures: dict[str, str] = {}
        self._loading: set[str] = set()
        # the watch's view: signatures seen at the last poll; versions whose load failed
        self._pending: dict[tuple[str, str], tuple] = {}
        self._failed: dict[tuple[str, str], LoadFailure] = {}
        # models unloaded on request: the watch leaves them alone until a load
        self._held_unloaded: set[str] = set()
        # a registry root: what its aliases point to, and each model's routed aliases
        self.follower = (
            RegistryFollower(self.root, settings.registry.db_url)
            if settings.follows_registry
            else None
        )
        self._followed: dict[str, FollowedModel] = {}
        self._routes: dict[str, dict[str, str]] = {}
        # versions served because a running experiment's arm names them: model -> versions
        self._for_experiments: dict[str, set[str]] = {}
        # versions an experiment's arm named that failed to load: not tried again for an
        # experiment until their files change (kept apart from ``_failed``, which forgets
        # a version once nothing wants it)
        self._experiment_failed: dict[tuple[str, str], LoadFailure] = {}
        self.loaded_once = False
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        # set by close(), under the reload lock: no version loads afterwards
        self._closed = False

    # -- what is on disk -------------------------------------------------------------------
    def scan(self) -> dict[str, list[VersionOnDisk]]:
        """Model name -> versions found on disk, oldest first."""
        if self.single_bundle:
            bundle = load_bundle(self.root)
            found = VersionOnDisk(
                bundle.meta.name, bundle.meta.version, self.root, _signature(self.root)
            )
            return {bundle.meta.name: [found]}
        models: dict[str, list[VersionOnDisk]] = {}
        if not self.root.is_dir():
            raise CycleMLError(f"model repository '{self.root}' is not a directory")
        # one model's folder (<path>/<version>/bundle.json) serves as a one-model repository
        if self._versions_in(self.root):
            model_dirs = [self.root]
        else:
            model_dirs = sorted(
                p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
            )
        for model_dir in model_dirs:
            versions = self._versions_in(model_dir)
            if versions:
                models[model_dir.name] = sorted(versions, key=lambda v: version_order(v.version))
        return models

    @staticmethod
    def _versions_in(model_dir: Path) -> list[VersionOnDisk]:
        return [
            VersionOnDisk(model_dir.name, v.name, v, _signature(v))
            for v in model_dir.iterdir()
            if v.is_dir() and (v / BUNDLE_FILE).is_file()
        ]

    def wanted(self, name: str, versions: list[VersionOnDisk]) -> list[VersionOnDisk]:
        """The versions of a model to serve, by pin, by the registry's aliases, or by
        version policy; and those an experiment's arm names."""
        chosen = self._wanted(name, versions)
        extra = self._for_experiments.get(name)
        if extra:
            have = {v.version for v in chosen}
            chosen += [v for v in versions if v.version in extra and v.version not in have]
        return chosen

    def _wanted(self, name: str, versions: list[VersionOnDisk]) -> list[VersionOnDisk]:
        pinned = self.settings.pinned_versions.get(name)
        if pinned is not None:
            chosen = [v for v in versions if v.version == pinned]
            if not chosen:
                self._failures[name] = (
                    f"pinned version {pinned} of model '{name}' not found; on disk: "
                    f"{', '.join(v.version for v in versions)}"
                )
            return chosen
        if self.follower is not None:
            followed = self._followed.get(name)
            chosen_versions = followed.versions if followed is not None else set()
            return [v for v in versions if v.version in chosen_versions]
        if self.settings.version_policy == "all":
            return list(versions)
        return versions[-1:]

    # -- loading ---------------------------------------------------------------------------
    def load_all(self) -> None:
        """Load every model found (at start-up)."""
        if self.follower is not None and not self._read_registry():
            self._failures["*"] = f"cannot read the model registry at '{self.root}'"
        try:
            on_disk = self.scan()
        except CycleMLError as err:
            log.error("cannot read models at '%s': %s", self.root, err)
            self._failures["*"] = str(err)
            on_disk = {}
        if not on_disk and "*" not in self._failures:
            self._failures["*"] = f"no model bundles found under '{self.root}'"
            log.error("%s", self._failures["*"])
        for name, versions in on_disk.items():
            self._sync_model(name, versions)
        self.loaded_once = True

    def load_model(self, name: str) -> list[str]:
        """(Re)load one model from disk now, trying again versions that failed before;
        returns the versions it serves afterwards. ``LoadFailed`` when a wanted version
        does not load (what was served before stays served)."""
        on_disk = self.scan()
        if name not in on_disk:
            known = ", ".join(sorted(on_disk)) or "none"
            raise malformed_name(name) or ModelNotFound(
                f"model '{name}' not found under '{self.root}' (found: {known})"
            )
        self._held_unloaded.discard(name)
        failed = self._sync_model(name, on_disk[name], retry_failed=True)
        with self._lock:
            served = sorted(self._live.get(name, {}), key=version_order)
        if failed:
            still = f"still serving version(s) {', '.join(served)}" if served else "not served"
            raise LoadFailed(f"model '{name}' {'; '.join(failed)}; {still}")
        if not served:
            raise ModelUnavailable(self.failure_reason(name) or f"model '{name}' failed to load")
        return served

    def serve_for_experiment(
        self,
        name: str,
        version: str | None,
        alias: str | None,
        load: bool = True,
        retry_failed: bool = False,
    ) -> None:
        """Make sure ``name`` (at ``version``, or ``@alias``) is served, for an
        experiment's arm: a version on disk that is not served yet is loaded (blocking),
        unless the model was unloaded on request (that holds until a load). Raises
        ModelNotFound / ModelUnavailable naming what is missing. ``load=False``: only
        check what can be checked without loading; nothing is loaded or kept.

        A version that failed to load is not tried again until its files change (like
        the watch), unless ``retry_failed`` (a change asked for on the admin route)."""
        if alias is not None or version is None:
            with self._lock:
                served = name in self._live
                routed = self._routes.get(name, {}).get(alias) if alias is not None else None
            if not served:
                raise self.not_served(name)
            if alias is not None and routed is None:
                raise self._unknown_alias(name, alias)
            return
        if version in self.versions(name):
            if load:
                self._for_experiments.setdefault(name, set()).add(version)
            return
        if name in self._held_unloaded:
            raise self.not_served(name)
        on_disk = [] if self.single_bundle else self.scan().get(name, [])
        found = next((v for v in on_disk if v.version == version), None)
        if found is None:
            shown = ", ".join(v.version for v in on_disk) or "none"
            raise ModelNotFound(
                f"model '{name}' has no version {version} in '{self.root}' (versions: {shown})"
            )
        key = (name, version)
        if retry_failed:
            self._experiment_failed.pop(key, None)
            self._failed.pop(key, None)
        failure = self._experiment_failed.get(key) or self._failed.get(key)
        if failure is not None and failure.signature == found.signature:
            raise self._failed_for_experiment(name, version, failure)
        if not load:
            return
        self._for_experiments.setdefault(name, set()).add(version)
        self._sync_model(name, on_disk)
        if version not in self.versions(name):
            failure = self._failed.get(key)
            if failure is not None:
                self._experiment_failed[key] = failure
                raise self._failed_for_experiment(name, version, failure)
            reason = self.failure_reason(name) or "not loaded"
            raise ModelUnavailable(f"model '{name}' version {version} is not served: {reason}")
        self._experiment_failed.pop(key, None)

    @staticmethod
    def _failed_for_experiment(name: str, version: str, failure: LoadFailure) -> Exception:
        # the same words at every poll: the experiment's router logs it once
        return ModelUnavailable(
            f"model '{name}' version {version} failed to load: {failure.message}; it is "
            "tried again once its files change"
        )

    def not_served(self, name: str) -> Exception:
        """Why ``name`` is not served: unloaded on request (until a load), loading,
        failed to load, or unknown (a ModelNotFound naming the served models)."""
        if name in self._held_unloaded:
            return ModelUnavailable(f"model '{name}' was unloaded on request; load it first")
        return self._missing(name)

    def keep_for_experiments(self, wanted: dict[str, set[str]]) -> None:
        """Versions only experiments wanted and that no running experiment names any
        more stop being served (blocking); a model unloaded on request stays unloaded."""
        before = self._for_experiments
        self._for_experiments = {name: set(v) for name, v in wanted.items()}
        for name in sorted(set(before) | set(wanted)):
            if name in self._held_unloaded or self.single_bundle:
                continue
            if before.get(name, set()) - wanted.get(name, set()):
                versions = self.scan().get(name)
                if versions:
                    self._sync_model(name, versions)

    def unload_model(self, name: str, hold: bool = True) -> None:
        """Stop serving ``name``; ``hold``: and keep the watch from loading it again
        until :meth:`load_model` (an unload on request)."""
        with self._lock:
            if name not in self._live:
                raise malformed_name(name) or ModelNotFound(f"model '{name}' is not loaded")
            retired = list(self._live.pop(name).values())
            self._default.pop(name, None)
            # no alias routes to a version no longer served (a load routes them afresh)
            self._routes.pop(name, None)
            if hold:
                self._held_unloaded.add(name)
        for model in retired:
            self._retire(model)

    def _sync_model(
        self, name: str, versions: list[VersionOnDisk], retry_failed: bool = False
    ) -> list[str]:
        """Make the served versions of ``name`` match what is wanted on disk; returns the
        failures of the versions it could not load (empty: all wanted are served).

        Versions that failed to load with the same files are not tried again unless
        ``retry_failed``; when no wanted version loads, the versions served so far stay.
        """
        with self._reload_lock:
            if self._closed:
                return []
            wanted = self.wanted(name, versions)
            self._forget_failures(name, wanted)
            with self._lock:
                current = dict(self._live.get(name, {}))
            fresh: dict[str, ServedModel] = {}
            failed: list[str] = []
            self._loading.add(name)
            try:
                for found in wanted:
                    key = (name, found.version)
                    if found.version in current and self._signatures.get(key) == found.signature:
                        continue
                    failure = self._failed.get(key)
                    if failure is not None and failure.signature == found.signature:
                        if retry_failed:
                            del self._failed[key]
                        else:
                            failed.append(f"version {found.version}: {failure.message}")
                            continue
                    model = self._load_version(found)
                    if model is None:
                        failed.append(f"version {found.version}: {self._failed[key].message}")
                    else:
                        fresh[found.version] = model
                        self._signatures[key] = found.signature
                if failed and not fresh and not current:
                    fresh.update(self._newest_that_loads(name, versions, wanted))
            finally:
                self._loading.discard(name)
            keep = {v.version for v in wanted} | set(fresh)
            with self._lock:
                table = {v: m for v, m in current.items() if v in keep and v not in fresh}
                table.update(fresh)
                if not table and failed:
                    # nothing wanted loads: a broken version never retires a working one
                    table = current
                routes = self._route_aliases(name, table, current)
                retired = [m for v, m in current.items() if v not in table or table[v] is not m]
                if table:
                    self._live[name] = table
                    self._routes[name] = routes
                    followed = self._followed.get(name)
                    default_alias = followed.default_alias if followed is not None else None
                    self._default[name] = (
                        routes[default_alias]
                        if default_alias in routes
                        else max(table, key=version_order)
                    )
                else:
                    self._live.pop(name, None)
                    self._routes.pop(name, None)
                    self._default.pop(name, None)
            for model in retired:
                self._retire(model)
            if fresh or retired:
                log.info(
                    "model %s now serves version(s) %s (default %s%s)",
                    name,
                    ", ".join(sorted(table, key=version_order)) or "none",
                    self._default.get(name),
                    "".join(f", {a} -> {v}" for a, v in sorted(routes.items())),
                )
            return failed

    def _route_aliases(
        self, name: str, table: dict[str, ServedModel], current: dict[str, ServedModel]
    ) -> dict[str, str]:
        """Each alias of ``name`` routed to the version it points to when that version is
        in ``table``; otherwise (its load failed, or its folder is missing) to the version
        it was routed to so far, which then stays in ``table``. Called under the lock."""
        followed = self._followed.get(name)
        if followed is None:
            return {}
        before = self._routes.get(name, {})
        routes = {}
        for alias, version in followed.aliases.items():
            if version in table:
                routes[alias] = version
            elif before.get(alias) in current:
                routes[alias] = before[alias]
                table[before[alias]] = current[before[alias]]
                log.warning(
                    "model %s: alias %s points to version %s, which is not served; it "
                    "stays on version %s",
                    name,
                    alias,
                    version,
                    before[alias],
                )
        return routes

    def _newest_that_loads(
        self, name: str, versions: list[VersionOnDisk], wanted: list[VersionOnDisk]
    ) -> dict[str, ServedModel]:
        """With ``version_policy=latest`` and nothing served yet (start-up), the newest
        older version that loads stands in for a newest one that does not."""
        if (
            self.settings.version_policy != "latest"
            or name in self.settings.pinned_versions
            or self.follower is not None
        ):
            return {}
        skip = {v.version for v in wanted}
        for found in reversed(versions):
            key = (name, found.version)
            failure = self._failed.get(key)
            if found.version in skip or (failure and failure.signature == found.signature):
                continue
            model = self._load_version(found)
            if model is not None:
                self._signatures[key] = found.signature
                log.warning(
                    "model %s serves version %s until its newer version loads",
                    name,
                    found.version,
                )
                return {found.version: model}
        return {}

    def _forget_failures(self, name: str, wanted: list[VersionOnDisk]) -> None:
        """Drop the load failures of versions no longer wanted (gone, or superseded)."""
        versions = {v.version for v in wanted}
        for key in [k for k in list(self._failed) if k[0] == name and k[1] not in versions]:
            del self._failed[key]

    def failure_reason(self, name: str) -> str | None:
        """Why (part of) a model is not served as wanted: failed versions, a missing pin."""
        reasons = [
            f"version {version} failed to load: {failure.message}"
            for (model, version), failure in sorted(list(self._failed.items()))
            if model == name
        ]
        if name in self._failures:
            reasons.append(self._failures[name])
        return "; ".join(reasons) or None

    def _load_version(self, found: VersionOnDisk) -> ServedModel | None:
        started = time.perf_counter()
        key = (found.model, found.version)
        try:
            bundle = load_bundle(found.path)
            model = ServedModel(
                found.model,
                bundle,
                self.settings,
                self.metrics,
                version=found.version,
                prediction_logger=self.prediction_logger,
            )
            model.warm_up()
        except Exception as err:  # a broken bundle must not take the server down
            self._failed[key] = LoadFailure(found.signature, str(err))
            self.metrics.load_failures.labels(found.model, found.version).inc()
            log.error(
                "cannot load model %s version %s from %s: %s",
                found.model,
                found.version,
                found.path,
                err,
            )
            return None
        self._failed.pop(key, None)
        log.info(
            "loaded model %s version %s in %.2f s",
            found.model,
            found.version,
            time.perf_counter() - started,
        )
        return model

    def _retire(self, model: ServedModel) -> None:
        """Stop a model that no longer takes requests, once those it holds are done."""

        def drain() -> None:
            deadline = time.monotonic() + self.settings.limits.drain_timeout_s
            while model.leases > 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            model.stop(timeout=self.settings.limits.drain_timeout_s)
            log.info("retired model %s version %s", model.name, model.version)

        threading.Thread(
            target=drain, name=f"retire-{model.name}-{model.version}", daemon=True
        ).start()

    # -- routing ---------------------------------------------------------------------------
    def acquire(self, name: str, version: str | None = None) -> ServedModel:
        """The served model for a request, held (a reload waits for it) until the caller
        calls its ``release()``; :meth:`lease` does both around a ``with`` block.

        ``name`` may be ``model@alias``: the alias is resolved here, under the same lock
        as the lease, so the model returned is the one that computes the answer."""
        reference = name
        name, at, alias = name.partition("@")
        with self._lock:
            versions = self._live.get(name)
            if versions is None:
                # a malformed reference is a 400 naming the rule it breaks; checked only
                # now, so served names cost no check (a loading model's name is real)
                missing = self._missing(name)
                known = not isinstance(missing, ModelNotFound)
                raise malformed_reference(reference, known) or missing
            if at:
                if version not in (None, ""):
                    raise malformed_reference(reference, True) or BadModelRef(
                        f"'{name}@{alias}' names an alias; ask for it or for a version "
                        f"(/versions/{version}), not both"
                    )
                chosen = self._routes.get(name, {}).get(alias)
                if chosen is None:
                    raise malformed_reference(reference, True) or self._unknown_alias(name, alias)
            else:
                chosen = self._default[name] if version in (None, "") else version
            model = versions.get(chosen)
            if model is None:
                raise ModelNotFound(
                    f"model '{name}' has no version '{version}' loaded "
                    f"(loaded: {', '.join(sorted(versions, key=version_order))})"
                )
            model.acquire()
        return model

    @contextmanager
    def lease(self, name: str, version: str | None = None) -> Iterator[ServedModel]:
        """The served model for a request, held so that a reload waits for the request."""
        model = self.acquire(name, version)
        try:
            yield model
        finally:
            model.release()

    def get(self, name: str, version: str | None = None) -> ServedModel:
        """The served model without holding it (for metadata and readiness)."""
        with self.lease(name, version) as model:
            return model

    def serves(self, name: str) -> bool:
        """Whether ``name`` is served now (some version of it is loaded). Read without
        the lock, so the event loop can ask it per request: the table is replaced or
        popped under the lock, and a membership test of a dict is atomic."""
        return name in self._live

    def versions(self, name: str) -> list[str]:
        with self._lock:
            return sorted(self._live.get(name, {}), key=version_order)

    def aliases(self, name: str) -> dict[str, str]:
        """``alias -> version`` as requests to ``name@alias`` are routed now."""
        with self._lock:
            return dict(sorted(self._routes.get(name, {}).items()))

    def _unknown_alias(self, name: str, alias: str) -> Exception:
        followed = self._followed.get(name)
        pointed = followed.aliases.get(alias) if followed is not None else None
        if pointed is not None:
            reason = self.failure_reason(name) or "not loaded yet"
            return ModelUnavailable(
                f"alias '{alias}' of model '{name}' points to version {pointed}, which is "
                f"not served: {reason}"
            )
        known = ", ".join(sorted(self._routes.get(name, {}))) or "none"
        return ModelNotFound(f"model '{name}' has no alias '{alias}' (aliases: {known})")

    def _missing(self, name: str) -> Exception:
        if name in self._loading:
            return ModelUnavailable(f"model '{name}' is loading")
        reason = self.failure_reason(name)
        if reason is not None:
            return ModelUnavailable(f"model '{name}' is not served: {reason}")
        known = ", ".join(sorted(self._live)) or "none"
        return ModelNotFound(f"model '{name}' is not served (served models: {known})")

    @property
    def ready(self) -> bool:
        with self._lock:
            # a model that loads a new version while serving an older one stays ready
            loading_only = any(name not in self._live for name in tuple(self._loading))
            return self.loaded_once and bool(self._live) and not loading_only

    def index(self) -> list[dict[str, Any]]:
        """The repository index: every model and version, with its state; a version that
        failed to load is UNAVAILABLE with the reason, next to the versions still served."""
        entries = []
        with self._lock:
            live = {name: dict(v) for name, v in self._live.items()}
            routes = {name: dict(r) for name, r in self._routes.items()}
        for name, versions in live.items():
            for version in versions:
                entry: dict[str, Any] = {"name": name, "version": version, "state": "READY"}
                aliases = sorted(a for a, v in routes.get(name, {}).items() if v == version)
                if aliases:
                    entry["aliases"] = aliases
                entries.append(entry)
        for (name, version), failure in list(self._failed.items()):
            if version not in live.get(name, {}):
                entries.append(
                    {
                        "name": name,
                        "version": version,
                        "state": "UNAVAILABLE",
                        "reason": f"failed to load: {failure.message}",
                    }
                )
        for name, reason in sorted(self._failures.items()):
            if name != "*" and name not in live:
                entries.append({"name": name, "state": "UNAVAILABLE", "reason": reason})
        return sorted(entries, key=lambda e: (e["name"], version_order(e.get("version", ""))))

    def all_models(self) -> list[ServedModel]:
        with self._lock:
            return [m for versions in self._live.values() for m in versions.values()]

    # -- watching the folder ---------------------------------------------------------------
    def poll(self) -> None:
        """One watch step: load versions that appeared or changed and have stayed the same
        since the previous poll (so a half-copied folder is not loaded), and drop models
        whose folders are gone. A version that failed to load is retried once its files
        change; until then the model serves what it served before."""
        try:
            on_disk = self.scan()
        except Exception as err:
            log.warning("watch: cannot scan '%s': %s", self.root, err)
            return
        for name, versions in on_disk.items():
            if name in self._held_unloaded:
                continue
            wanted = self.wanted(name, versions)
            self._forget_failures(name, wanted)
            served = set(self.versions(name))
            loadable = [
                v
                for v in wanted
                if getattr(self._failed.get((name, v.version)), "signature", None) != v.signature
            ]
            changed = [
                v
                for v in loadable
                if v.version not in served or self._signatures.get((name, v.version)) != v.signature
            ]
            # versions no longer wanted, unless they stand in for wanted ones that failed
            stale = served - {v.version for v in loadable} if loadable else set()
            stale -= set(self.aliases(name).values())
            if not changed and not stale:
                continue
            unsettled = [v for v in changed if self._pending.get((name, v.version)) != v.signature]
            for v in changed:
                self._pending[(name, v.version)] = v.signature
            if unsettled:
                continue
            log.info("watch: reloading model %s", name)
            self._sync_model(name, versions)
        if not self.single_bundle:
            for name in set(self._default) - set(on_disk):
                log.info("watch: model %s was removed from the repository", name)
                self.unload_model(name, hold=False)
            for key in [k for k in list(self._failed) if k[0] not in on_disk]:
                del self._failed[key]

    def follow_registry(self) -> None:
        """One step of following a registry: read its aliases and versions, and sync
        each model whose view changed (new versions are loaded before aliases move)."""
        before = self._followed
        if not self._read_registry():
            return
        for name in sorted(set(before) | set(self._followed)):
            if before.get(name) != self._followed.get(name) and name not in self._held_unloaded:
                log.info("registry: model %s now wants %s", name, self._followed.get(name))
                self._sync_model(name, self._versions_on_disk(name))

    def _read_registry(self) -> bool:
        assert self.follower is not None
        try:
            self._followed = self.follower.read()
        except Exception as err:  # a database hiccup must not stop the server
            log.warning("registry: cannot read '%s': %s", self.root, err)
            return False
        return True

    def _versions_on_disk(self, name: str) -> list[VersionOnDisk]:
        model_dir = self.root / name
        if not model_dir.is_dir():
            return []
        return sorted(self._versions_in(model_dir), key=lambda v: version_order(v.version))

    def start_watching(self) -> None:
        """Poll the folder (``reload.watch``) and follow the registry, in one thread."""
        if self._watcher is not None:
            return
        watch_folder = self.settings.reload.watch
        if self.follower is None and not watch_folder:
            return
        folder_every = self.settings.reload.interval_s
        interval = folder_every
        if self.follower is not None:
            interval = min(interval, self.settings.registry.poll_interval_s)

        def watch() -> None:
            next_folder_poll = time.monotonic() + folder_every
            while not self._stop.wait(interval):
                # one bad step (a file removed mid-scan, a database hiccup) must not end
                # the watch: the next step tries again
                try:
                    if self.follower is not None:
                        self.follow_registry()
                    if watch_folder and time.monotonic() >= next_folder_poll:
                        next_folder_poll = time.monotonic() + folder_every
                        self.poll()
                except Exception:
                    log.exception("watch: a step failed; trying again in %.1f s", interval)

        self._watcher = threading.Thread(target=watch, name="repository-watch", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        """Stop watching and stop every model after it finished its queued work.

        A load under way (a watch step, a load on request) finishes first and its model
        is stopped with the others; no load starts afterwards."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
            if self._watcher.is_alive():
                log.warning("watch: still busy at close; waiting for its load to finish")
        with self._reload_lock:
            self._closed = True
            with self._lock:
                models = [m for versions in self._live.values() for m in versions.values()]
                self._live.clear()
                self._default.clear()
        for model in models:
            model.stop(timeout=self.settings.limits.drain_timeout_s)
        if self.follower is not None:
            self.follower.close()
