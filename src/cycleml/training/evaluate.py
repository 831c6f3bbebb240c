"""`cycleml eval ckpt_path=…`: metrics, per-class report, confusion matrix and worst errors."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from cycleml.errors import ConfigError
from cycleml.hydra_app import hydra_app
from cycleml.training.summary import BASELINE_FILE

if TYPE_CHECKING:
    import numpy as np

# torch, Lightning and matplotlib are imported when the evaluation starts, so that
# `--help`, config errors and a wrong ckpt_path answer at once

log = logging.getLogger(__name__)


def resolve_checkpoint(ckpt_path: str) -> Path:
    """A checkpoint file, or a run folder (its best checkpoint, else its last)."""
    path = Path(ckpt_path)
    if path.is_dir():
        for name in ("best.ckpt", "last.ckpt"):
            if (path / "checkpoints" / name).is_file():
                return path / "checkpoints" / name
        if (path / BASELINE_FILE).is_file():
            raise ConfigError(_baseline_message(path))
        raise ConfigError(
            f"run folder '{path}' has no checkpoints/best.ckpt or checkpoints/last.ckpt"
        )
    if not path.is_file():
        raise ConfigError(f"ckpt_path='{path}' does not exist (a .ckpt file or a run folder)")
    if path.suffix == ".joblib":
        raise ConfigError(_baseline_message(path))
    return path


def _baseline_message(path: Path) -> str:
    return (
        f"'{path}' is a scikit-learn baseline run (model=logreg or linear_svm): baselines "
        "are not exported to ONNX nor evaluated here. They are reference scores for the "
        "deep models, and their scikit-learn preprocessing (TF-IDF, pixel scaling) is not "
        "the bundle's (raw pixels or the run's tokenizer in the graph); their val and test "
        "metrics are in the run's summary.json (cycleml compare lists them)"
    )


def per_class_report(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]
) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support of every class."""
    from sklearn.metrics import precision_recall_fscore_support

    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    return [
        {
            "class": name,
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    ]


def worst_errors(
    y_true: np.ndarray, probabilities: np.ndarray, limit: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of misclassified items, most confident mistakes first; with predictions."""
    import numpy as np

    y_pred = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    order = wrong[np.argsort(-confidence[wrong], kind="stable")][:limit]
    return order, y_pred[order], confidence[order]


def evaluate(cfg: DictConfig) -> dict[str, float]:
    ckpt = resolve_checkpoint(cfg.ckpt_path)

    import hydra
    import lightning as L
    import torch

    from cycleml.models.module import ClassifierModule
    from cycleml.training.plots import save_confusion_matrix, save_image_grid
    from cycleml.training.run import finish_loggers, instantiate_loggers
    from cycleml.training.summary import write_json

    module = ClassifierModule.from_checkpoint(ckpt)
    spec: dict[str, Any] = dict(module.hparams.data_spec or {})
    class_names: list[str] = list(module.hparams.class_names)
    data_config = cfg.get("data") or spec.get("data_config")
    if not data_config:
        raise ConfigError(f"checkpoint '{ckpt}' records no data config; pass data=… explicitly")
    # text: tokenize with the model's own tokenizer, never one re-trained on this data
    extra = (
        {"tokenizer_json": spec["tokenizer_json"], "class_names": class_names}
        if spec.get("kind") == "text"
        else {}
    )
    datamodule = hydra.utils.instantiate(data_config, **extra)
    datamodule.setup()
    if list(datamodule.class_names) != class_names:
        raise ConfigError(
            f"the data's classes {list(datamodule.class_names)} differ from the model's {class_names}"
        )
    split = cfg.split
    loader = {"test": datamodule.test_dataloader, "val": datamodule.val_dataloader}.get(split)
    if loader is None:
        raise ConfigError(f"split must be 'test' or 'val', got '{split}'")

    output_dir = Path(cfg.paths.output_dir)
    loggers = instantiate_loggers(cfg.get("logger"), module.hparams.run_id or "eval")
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=[])
    probabilities = torch.cat(trainer.predict(module, dataloaders=loader())).numpy()
    y_true = torch.cat([y for _, y in loader()]).numpy()
    y_pred = probabilities.argmax(axis=1)

    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, average="macro", zero_division=0
    )
    metrics = {
        f"{split}/acc": float(accuracy_score(y_true, y_pred)),
        f"{split}/precision": float(precision),
        f"{split}/recall": float(recall),
        f"{split}/f1": float(f1),
    }
    report = per_class_report(y_true, y_pred, class_names)
    write_json(
        output_dir / "metrics.json",
        {"checkpoint": str(ckpt), "split": split, "metrics": metrics, "per_class": report},
    )
    _write_csv(output_dir / "per_class_report.csv", report)
    files = [
        save_confusion_matrix(y_true, y_pred, class_names, output_dir / "confusion_matrix.png")
    ]

    order, pred, conf = worst_errors(y_true, probabilities, cfg.num_errors)
    if spec.get("kind") == "text":
        from cycleml.training.text_report import write_worst_texts

        errors_file = write_worst_texts(
            datamodule.split_ids(split),
            datamodule.split_texts(split),
            y_true,
            y_pred,
            probabilities.max(axis=1),
            class_names,
            output_dir / "worst_errors.csv",
            cfg.num_errors,
        )
    else:
        images, _ = datamodule.split_arrays(split)
        titles = [
            f"{class_names[y_true[i]]}→{class_names[p]} {c:.2f}"
            for i, p, c in zip(order, pred, conf, strict=True)
        ]
        errors_file = save_image_grid(images[order], titles, output_dir / "worst_errors.png")
    files.append(errors_file)

    for logger in loggers:
        logger.log_metrics({f"eval/{k}": v for k, v in metrics.items()})
        if hasattr(logger, "log_image"):
            for path in files:
                if path.suffix == ".png":
                    logger.log_image(key=f"eval/{path.stem}", images=[str(path)])
    finish_loggers(loggers)
    log.info(
        "%s metrics: %s",
        split,
        ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()),
    )
    log.info("evaluation written to %s (%d errors shown)", output_dir, len(order))
    return metrics


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import csv

    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@hydra_app("eval")
def main(cfg: DictConfig) -> float:
    OmegaConf.resolve(cfg)
    metrics = evaluate(cfg)
    return metrics[f"{cfg.split}/acc"]


if __name__ == "__main__":
    main()
