"""`cycleml train model=logreg`: a scikit-learn baseline on the data module's own split.

No Lightning loop and no GPU: the baseline fits on exactly the training items a deep
model of the same data config sees (``split_ids``), is scored with the same metric
definitions (``models.module.classification_metrics``) and leaves the same
``summary.json``, so ``cycleml compare`` ranks baselines and deep models together.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import joblib
import numpy as np
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from cycleml.errors import ConfigError, CycleMLError
from cycleml.models.baselines import SklearnBaseline
from cycleml.models.module import classification_metrics
from cycleml.training.run import flat_config, instantiate_loggers
from cycleml.training.summary import BASELINE_FILE, RUN_INFO, read_json, write_summary

log = logging.getLogger(__name__)


def split_inputs(datamodule: Any, split: str) -> tuple[list[str] | np.ndarray, np.ndarray]:
    """A split's raw inputs (texts, or uint8 NHWC images) and int64 labels, in loader order."""
    kind = datamodule.spec()["kind"]
    if kind == "text":
        return datamodule.split_texts(split), datamodule.split_labels(split)
    if kind == "image":
        images, labels = datamodule.split_arrays(split)
        return images, np.asarray(labels, dtype=np.int64)
    raise ConfigError(f"baselines handle text and image data, not {kind!r}")


def score(
    predictions: np.ndarray, labels: np.ndarray, num_classes: int, prefix: str
) -> dict[str, float]:
    """``<prefix>/acc``, ``/precision``, ``/recall``, ``/f1`` as the LightningModule logs them."""
    metrics = classification_metrics(num_classes).clone(prefix=f"{prefix}/")
    metrics.update(torch.from_numpy(predictions), torch.from_numpy(labels))
    return {name: float(value) for name, value in metrics.compute().items()}


def build_baseline(model_cfg: DictConfig, seed: int) -> SklearnBaseline:
    """The baseline of ``cfg.model`` (without its ``baseline`` flag), seeded."""
    node = OmegaConf.to_container(model_cfg, resolve=True)
    node.pop("baseline", None)
    target = str(node.get("_target_", ""))
    if not target.startswith("cycleml.models.baselines."):
        raise ConfigError(
            f"model: baseline: true needs a cycleml.models.baselines factory as _target_ "
            f"(e.g. model=logreg), got {target or 'none'!r}"
        )
    try:
        baseline = hydra.utils.instantiate(node)
    except InstantiationException as err:
        # let a user error from the factory reach the CLI as itself, not wrapped
        if isinstance(err.__cause__, CycleMLError):
            raise err.__cause__ from None
        raise
    if not isinstance(baseline, SklearnBaseline):
        raise ConfigError(f"model: {target} made a {type(baseline).__name__}, not a baseline")
    if "random_state" in baseline.estimator.get_params():
        baseline.estimator.set_params(random_state=seed)
    return baseline


def run_baseline(cfg: DictConfig, datamodule: Any) -> dict[str, float]:
    """Fit on the train split, score val and test, save the model and ``summary.json``."""
    output_dir = Path(cfg.paths.output_dir)
    baseline = build_baseline(cfg.model, int(cfg.seed))
    kind = datamodule.spec()["kind"]
    inputs, labels = split_inputs(datamodule, "train")
    started = time.perf_counter()
    baseline.fit(kind, inputs, labels)
    fit_seconds = time.perf_counter() - started
    log.info("fitted %s on %d %s items in %.2f s", baseline.name, len(labels), kind, fit_seconds)

    metrics: dict[str, float] = {}
    for split in ("train", "val", "test"):
        split_x, split_y = split_inputs(datamodule, split)
        metrics.update(score(baseline.predict(split_x), split_y, datamodule.num_classes, split))
    metrics["val/acc_best"] = metrics["val/acc"]
    log.info(
        "%s: val/acc %.4f, test/acc %.4f", baseline.name, metrics["val/acc"], metrics["test/acc"]
    )

    model_path = output_dir / BASELINE_FILE
    model_path.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(
        {"baseline": baseline, "class_names": list(datamodule.class_names),
         "data_spec": datamodule.spec()},
        model_path,
    )  # fmt: skip
    _log_to_trackers(cfg, output_dir, datamodule.fingerprint, metrics)
    write_summary(
        output_dir,
        cfg,
        datamodule.fingerprint,
        metrics,
        str(model_path),
        extra={
            "baseline": baseline.name,
            "fit_seconds": round(fit_seconds, 3),
            "split_sizes": {s: len(datamodule.split_ids(s)) for s in ("train", "val", "test")},
        },
    )
    return metrics


def _log_to_trackers(
    cfg: DictConfig, output_dir: Path, fingerprint: str, metrics: dict[str, float]
) -> None:
    """Send config and final metrics to the configured loggers (W&B, CSV)."""
    run_id = read_json(output_dir / RUN_INFO).get("run_id", output_dir.name)
    for logger in instantiate_loggers(cfg.get("logger"), run_id):
        logger.log_hyperparams({**flat_config(cfg), "dataset_fingerprint": fingerprint})
        logger.log_metrics(metrics, step=0)
        logger.finalize("success")
