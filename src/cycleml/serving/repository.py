"""The models a server holds: one bundle, or a repository ``<root>/<model>/<version>/``.

Loading happens off the event loop. A new version is loaded and warmed up before it
is swapped into the routing table; the version it replaces stops taking requests at
that moment, finishes the ones it holds, and only then shuts its instances down, so a
reload never fails a request in flight.
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
from cycleml.serving.metrics import ServingMetrics
from cycleml.serving.served_model import ServedModel
from cycleml.serving.settings import ServeSettings

log = logging.getLogger(__name__)

BUNDLE_FILE = "bundle.json"


class ModelNotFound(LookupError):
    """No such model or version is served (HTTP 404); the message lists what is."""


class ModelUnavailable(RuntimeError):
    """The model exists but is not ready: still loading, or its load failed (HTTP 503)."""


@dataclass(frozen=True)
class VersionOnDisk:
    model: str
    version: str
    path: Path
    # changes whenever bundle.json or the model file is rewritten
    signature: tuple


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

    def __init__(self, settings: ServeSettings, metrics: ServingMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.root = Path(settings.path)
        self.single_bundle = (self.root / BUNDLE_FILE).is_file()
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()
        # routing table: model -> version -> served model; and each model's default version
        self._live: dict[str, dict[str, ServedModel]] = {}
        self._default: dict[str, str] = {}
        self._signatures: dict[tuple[str, str], tuple] = {}
        self._failures: dict[str, str] = {}
        self._loading: set[str] = set()
        # the watch's view: signatures seen at the last poll, and of loads that failed
        self._pending: dict[tuple[str, str], tuple] = {}
        self._failed: dict[tuple[str, str], tuple] = {}
        # models unloaded on request: the watch leaves them alone until a load
        self._held_unloaded: set[str] = set()
        self.loaded_once = False
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

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
        """The versions of a model to serve, by pin or by version policy."""
        pinned = self.settings.pinned_versions.get(name)
        if pinned is not None:
            chosen = [v for v in versions if v.version == pinned]
            if not chosen:
                self._failures[name] = (
                    f"pinned version {pinned} of model '{name}' not found; on disk: "
                    f"{', '.join(v.version for v in versions)}"
                )
            return chosen
        if self.settings.version_policy == "all":
            return list(versions)
        return versions[-1:]

    # -- loading ---------------------------------------------------------------------------
    def load_all(self) -> None:
        """Load every model found (at start-up)."""
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
        """(Re)load one model from disk now; returns the versions it serves afterwards."""
        on_disk = self.scan()
        if name not in on_disk:
            known = ", ".join(sorted(on_disk)) or "none"
            raise ModelNotFound(f"model '{name}' not found under '{self.root}' (found: {known})")
        self._held_unloaded.discard(name)
        self._sync_model(name, on_disk[name])
        with self._lock:
            served = sorted(self._live.get(name, {}), key=version_order)
        if not served:
            raise ModelUnavailable(self._failures.get(name, f"model '{name}' failed to load"))
        return served

    def unload_model(self, name: str, hold: bool = True) -> None:
        """Stop serving ``name``; ``hold``: and keep the watch from loading it again
        until :meth:`load_model` (an unload on request)."""
        with self._lock:
            if name not in self._live:
                raise ModelNotFound(f"model '{name}' is not loaded")
            retired = list(self._live.pop(name).values())
            self._default.pop(name, None)
            if hold:
                self._held_unloaded.add(name)
        for model in retired:
            self._retire(model)

    def _sync_model(self, name: str, versions: list[VersionOnDisk]) -> None:
        """Make the served versions of ``name`` match what is wanted on disk."""
        with self._reload_lock:
            wanted = self.wanted(name, versions)
            with self._lock:
                current = dict(self._live.get(name, {}))
            fresh: dict[str, ServedModel] = {}
            self._loading.add(name)
            try:
                for found in wanted:
                    key = (name, found.version)
                    if found.version in current and self._signatures.get(key) == found.signature:
                        continue
                    model = self._load_version(found)
                    if model is not None:
                        fresh[found.version] = model
                        self._signatures[key] = found.signature
            finally:
                self._loading.discard(name)
            keep = {v.version for v in wanted}
            with self._lock:
                table = {v: m for v, m in current.items() if v in keep and v not in fresh}
                table.update(fresh)
                retired = [m for v, m in current.items() if v not in table or table[v] is not m]
                if table:
                    self._live[name] = table
                    self._default[name] = max(table, key=version_order)
                else:
                    self._live.pop(name, None)
                    self._default.pop(name, None)
            for model in retired:
                self._retire(model)
            if fresh:
                log.info(
                    "model %s now serves version(s) %s (default %s)",
                    name,
                    ", ".join(sorted(table, key=version_order)),
                    self._default.get(name),
                )

    def _load_version(self, found: VersionOnDisk) -> ServedModel | None:
        started = time.perf_counter()
        key = (found.model, found.version)
        try:
            bundle = load_bundle(found.path)
            model = ServedModel(
                found.model, bundle, self.settings, self.metrics, version=found.version
            )
            model.warm_up()
        except Exception as err:  # a broken bundle must not take the server down
            self._failures[found.model] = f"version {found.version}: {err}"
            self._failed[key] = found.signature
            log.error(
                "cannot load model %s version %s from %s: %s",
                found.model,
                found.version,
                found.path,
                err,
            )
            return None
        self._failures.pop(found.model, None)
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
        calls its ``release()``; :meth:`lease` does both around a ``with`` block."""
        with self._lock:
            versions = self._live.get(name)
            if versions is None:
                raise self._missing(name)
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

    def versions(self, name: str) -> list[str]:
        with self._lock:
            return sorted(self._live.get(name, {}), key=version_order)

    def _missing(self, name: str) -> Exception:
        if name in self._loading:
            return ModelUnavailable(f"model '{name}' is loading")
        if name in self._failures:
            return ModelUnavailable(f"model '{name}' failed to load: {self._failures[name]}")
        known = ", ".join(sorted(self._live)) or "none"
        return ModelNotFound(f"model '{name}' is not served (served models: {known})")

    @property
    def ready(self) -> bool:
        with self._lock:
            return self.loaded_once and bool(self._live) and not self._loading

    def index(self) -> list[dict[str, Any]]:
        """The repository index: every model and version, with its state."""
        entries = []
        with self._lock:
            live = {name: dict(v) for name, v in self._live.items()}
        for name, versions in sorted(live.items()):
            for version in sorted(versions, key=version_order):
                entries.append({"name": name, "version": version, "state": "READY"})
        for name, reason in sorted(self._failures.items()):
            if name != "*" and name not in live:
                entries.append({"name": name, "state": "UNAVAILABLE", "reason": reason})
        return entries

    def all_models(self) -> list[ServedModel]:
        with self._lock:
            return [m for versions in self._live.values() for m in versions.values()]

    # -- watching the folder ---------------------------------------------------------------
    def poll(self) -> None:
        """One watch step: load versions that appeared or changed and have stayed the same
        since the previous poll (so a half-copied folder is not loaded), and drop models
        whose folders are gone. A version that failed to load is retried once its files
        change."""
        try:
            on_disk = self.scan()
        except Exception as err:
            log.warning("watch: cannot scan '%s': %s", self.root, err)
            return
        for name, versions in on_disk.items():
            if name in self._held_unloaded:
                continue
            wanted = self.wanted(name, versions)
            served = set(self.versions(name))
            changed = [
                v
                for v in wanted
                if (
                    v.version not in served
                    or self._signatures.get((name, v.version)) != v.signature
                )
                and self._failed.get((name, v.version)) != v.signature
            ]
            stale = served - {v.version for v in wanted}
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

    def start_watching(self) -> None:
        if self._watcher is not None:
            return
        interval = self.settings.reload.interval_s

        def watch() -> None:
            while not self._stop.wait(interval):
                self.poll()

        self._watcher = threading.Thread(target=watch, name="repository-watch", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        """Stop watching and stop every model after it finished its queued work."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        with self._lock:
            models = [m for versions in self._live.values() for m in versions.values()]
            self._live.clear()
            self._default.clear()
        for model in models:
            model.stop(timeout=self.settings.limits.drain_timeout_s)
