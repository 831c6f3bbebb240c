"""What every run leaves behind: run_info.json at the start, summary.json at the end."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cycleml.files import write_atomic
from cycleml.redaction import redact_values

log = logging.getLogger(__name__)

RUN_INFO = "run_info.json"
SUMMARY = "summary.json"
# a scikit-learn baseline run's fitted pipeline (it has no Lightning checkpoint)
BASELINE_FILE = "checkpoints/baseline.joblib"
TRACKED_PACKAGES = (
    "cycleml",
    "torch",
    "torchvision",
    "lightning",
    "torchmetrics",
    "hydra-core",
    "wandb",
    "albumentations",
    "numpy",
    "scikit-learn",
    "onnx",
    "onnxruntime",
    "tokenizers",
    "optuna",
)


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The current commit (with ``-dirty`` when there are local changes), or None."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` atomically: a reader sees the old file or the new one, never a part."""
    return write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def write_summary(
    output_dir: str | Path,
    cfg: DictConfig,
    fingerprint: str,
    metrics: dict[str, float],
    best_ckpt: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``<output_dir>/summary.json``: config, data version, code version, results.

    An existing summary only grows: its metrics are kept unless measured again.
    """
    output_dir = Path(output_dir)
    info = read_json(output_dir / RUN_INFO)
    earlier = read_json(output_dir / SUMMARY).get("metrics") or {}
    summary = {
        "run_id": info.get("run_id", output_dir.name),
        "wandb_id": info.get("wandb_id"),
        "task_name": cfg.get("task_name"),
        "model": _model_name(cfg),
        "data": _target_name(cfg.get("data")),
        "tags": list(cfg.get("tags") or []),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dataset_fingerprint": fingerprint,
        "git_commit": git_commit(cfg.get("paths", {}).get("root_dir")),
        "packages": package_versions(),
        "best_checkpoint": best_ckpt,
        "metrics": {k: float(v) for k, v in sorted({**earlier, **metrics}.items())},
        "config": redact_values(OmegaConf.to_container(cfg, resolve=True)),
    }
    summary.update(extra or {})
    path = write_json(output_dir / SUMMARY, summary)
    log.info("summary written to %s", path)
    return path


def _target_name(node: Any) -> str | None:
    target = node.get("_target_") if isinstance(node, (dict, DictConfig)) else None
    return target.rsplit(".", 1)[-1] if target else None


def _model_name(cfg: DictConfig) -> str | None:
    model = cfg.get("model")
    if model is None:
        return None
    net = model.get("net")
    if isinstance(net, (dict, DictConfig)):
        name = net.get("name")
        return name or _target_name(net)
    return _target_name(model)


def remove_if_stub(folder: Path) -> bool:
    """Remove a run folder that holds nothing of a run: only Hydra's ``.hydra/``, logs and
    ``run_info.json`` (a launch that failed or moved on before writing any result)."""
    if not folder.is_dir():
        return False
    stub_parts = {".hydra", RUN_INFO}
    if all(p.name in stub_parts or p.suffix == ".log" for p in folder.iterdir()):
        shutil.rmtree(folder)
        return True
    return False
