"""What a bundle folder holds (file hashes, size) and where it came from (lineage).

Lineage comes from ``bundle.json`` and, when the training run folder named by the
bundle's ``source.checkpoint`` is still there, from that run's ``summary.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cycleml.inference.bundle import ModelBundle
from cycleml.registry.errors import RegistryError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
# summary.json entries copied into the lineage (training side facts)
_SUMMARY_KEYS = ("task_name", "model", "data", "finished_at", "best_checkpoint", "tags")


def hash_files(folder: Path, shown: Path | None = None) -> tuple[dict[str, str], int]:
    """``({relative path: sha256}, total bytes)`` of every file below ``folder`` (a copy
    of the bundle ``shown`` in errors)."""
    hashes: dict[str, str] = {}
    total = 0
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            where = path.relative_to(folder).as_posix()
            raise RegistryError(
                f"bundle '{shown or folder}' holds a link '{where}'; copy the file in instead"
            )
        if not path.is_file():
            continue
        digest = hashlib.sha256()
        with path.open("rb") as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
        hashes[path.relative_to(folder).as_posix()] = digest.hexdigest()
        total += path.stat().st_size
    return hashes, total


def content_hash(files: dict[str, str]) -> str:
    """One hash of the file names and contents: equal for byte-identical bundles."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{files[name]}\n".encode())
    return digest.hexdigest()


def bundle_lineage(bundle: ModelBundle) -> dict[str, Any]:
    """Lineage facts from ``bundle.json`` and the training run's ``summary.json``."""
    meta = bundle.meta
    source = dict(meta.source)
    lineage: dict[str, Any] = {
        "run_id": meta.run_id,
        "fingerprint": meta.fingerprint,
        "metrics": dict(meta.metrics),
        "parity": meta.verification.get("parity"),
        "verification": dict(meta.verification),
        "variants": {name: asdict(variant) for name, variant in meta.variants.items()},
        "git_commit": source.get("git_commit"),
        "kind": meta.kind,
        "class_names": list(meta.class_names),
        "bundle": {"name": meta.name, "version": meta.version, "created_at": meta.created_at},
        "source": source,
    }
    summary, run_dir = _run_summary(source.get("checkpoint"))
    if summary:
        lineage["run_dir"] = str(run_dir)
        lineage["run"] = {key: summary.get(key) for key in _SUMMARY_KEYS if key in summary}
        lineage["run_id"] = lineage["run_id"] or summary.get("run_id")
        lineage["fingerprint"] = lineage["fingerprint"] or summary.get("dataset_fingerprint")
        lineage["git_commit"] = lineage["git_commit"] or summary.get("git_commit")
        run_metrics = summary.get("metrics") or {}
        lineage["metrics"] = {**run_metrics, **lineage["metrics"]}
    return lineage


def _run_summary(checkpoint: object) -> tuple[dict[str, Any], Path | None]:
    """The ``summary.json`` of the run that wrote ``checkpoint``, if it is still there."""
    if not isinstance(checkpoint, str) or not checkpoint:
        return {}, None
    ckpt = Path(checkpoint)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    path = run_dir / "summary.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        log.info("no training run summary at %s; lineage comes from bundle.json only", path)
        return {}, None
    except (OSError, ValueError) as err:
        log.warning("cannot read %s (%s); lineage comes from bundle.json only", path, err)
        return {}, None
    return (data, run_dir) if isinstance(data, dict) else ({}, None)
