"""`cycleml train`: compose the config, build data, model, callbacks, loggers, trainer; fit, test."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from cycleml.errors import ConfigError
from cycleml.hydra_app import hydra_app

if TYPE_CHECKING:
    import lightning as L

# torch and Lightning are imported when a run starts, so that `--help`, `--cfg job` and
# config errors answer at once

log = logging.getLogger(__name__)


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The data module of ``cfg.data`` with ``cfg.augment`` as its training transform;
    baselines fit on the items as they are, so they get no augmentation (nor its checks)."""
    augment = cfg.get("augment")
    if augment and cfg.model.get("baseline"):
        log.info("augment: not used by the baseline model %s", cfg.model.get("_target_"))
        augment = None
    transform = hydra.utils.instantiate(augment) if augment else None
    datamodule = hydra.utils.instantiate(cfg.data, train_transform=transform)
    datamodule.setup()
    return datamodule


def build_model(cfg: DictConfig, datamodule: Any, run_id: str) -> L.LightningModule:
    """The LightningModule of ``cfg.model``, its network sized to the data."""
    net_kwargs = datamodule.net_kwargs()
    model_config = OmegaConf.to_container(cfg.model, resolve=True)
    model_config["net"].update(net_kwargs)
    factory = hydra.utils.instantiate(cfg.model, net=net_kwargs, _partial_=True)
    return factory(
        num_classes=datamodule.num_classes,
        class_names=list(datamodule.class_names),
        model_config=model_config,
        data_spec={
            **datamodule.spec(),
            "data_config": OmegaConf.to_container(cfg.data, resolve=True),
        },
        run_id=run_id,
    )


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one training job; returns its final metrics (``train/…``, ``val/…``, ``test/…``)."""
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor

    from cycleml.models.feature_cache import enable_feature_cache
    from cycleml.training.console import CONSOLE, configure_console
    from cycleml.training.interrupt import INTERRUPTED_EXIT, report_interrupt
    from cycleml.training.resume_config import config_for_resume, resume_overrides
    from cycleml.training.run import (
        finish_loggers,
        flat_config,
        instantiate_callbacks,
        instantiate_loggers,
        move_into_run,
        record_tracker_ids,
        resolve_resume,
        start_run,
    )
    from cycleml.training.summary import write_summary

    verbose = bool(cfg.get("verbose"))
    configure_console(verbose)
    output_dir = Path(cfg.paths.output_dir)
    resume = resolve_resume(
        cfg.get("ckpt_path"), Path(cfg.paths.log_dir) / cfg.task_name / "runs", output_dir
    )
    if resume.run_dir is not None and resume.run_dir.resolve() != output_dir.resolve():
        # continue in the interrupted run's folder: its checkpoints, tracker files, summary
        move_into_run(output_dir, resume.run_dir.resolve())
        output_dir = resume.run_dir.resolve()
    if resume.source_dir is not None:
        # the checkpoint fits the run's own config, not whatever this command line composed
        cfg = config_for_resume(cfg, resume.source_dir, *resume_overrides())
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _set_torch_threads(cfg)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = build_datamodule(cfg)
    info = start_run(output_dir, resume)
    if cfg.model.get("baseline"):
        from cycleml.training.baseline import run_baseline

        return run_baseline(cfg, datamodule)

    model = build_model(cfg, datamodule, info["run_id"])
    enable_feature_cache(model.net, augmented=_augmented(datamodule))
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    callbacks += getattr(datamodule, "callbacks", list)()
    loggers = instantiate_loggers(cfg.get("logger"), info["run_id"], quiet=not verbose)
    record_tracker_ids(output_dir, info, loggers)
    if not loggers:
        # nothing to report learning rates to (logger=null, debug runs)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False
    )
    for logger in loggers:
        logger.log_hyperparams({**flat_config(cfg), "dataset_fingerprint": datamodule.fingerprint})

    try:
        metrics, best = _fit_and_test(cfg, trainer, model, datamodule, resume.ckpt_path, verbose)
    except SystemExit:
        if not trainer.interrupted:
            finish_loggers(loggers, exit_code=1)
            raise
        # Lightning stops on Ctrl-C with sys.exit(1); 130 is the shell's code for SIGINT
        finish_loggers(loggers, exit_code=INTERRUPTED_EXIT)
        report_interrupt(trainer, output_dir)
        raise SystemExit(INTERRUPTED_EXIT) from None
    except BaseException:
        finish_loggers(loggers, exit_code=1)
        raise
    finish_loggers(loggers)
    if trainer.global_rank == 0:
        write_summary(
            output_dir,
            cfg,
            datamodule.fingerprint,
            metrics,
            best or None,
            extra={"global_step": trainer.global_step, "epochs": trainer.current_epoch},
        )
        shown = [f"{k} {metrics[k]:.4f}" for k in ("val/acc", "test/acc") if k in metrics]
        log.info("run %s finished: %s", output_dir, ", ".join(shown) or "-", extra=CONSOLE)
    return metrics


def _augmented(datamodule: Any) -> bool:
    """Whether the training split is augmented (an image pipeline or a text augmenter)."""
    return any(
        getattr(datamodule, name, None) is not None for name in ("train_transform", "augment")
    )


def _set_torch_threads(cfg: DictConfig) -> None:
    """``torch_threads``, else a sweep trial's share (set by the sweeper), else a free-CPU count."""
    import torch

    from cycleml.sweeps.resources import THREADS_KEY
    from cycleml.training.threads import torch_threads_for_run

    if not cfg.get("torch_threads") and OmegaConf.select(cfg, THREADS_KEY):
        return  # the sweeper's TrialThreads callback has set this trial's share
    threads, reason = torch_threads_for_run(cfg.get("torch_threads"))
    torch.set_num_threads(threads)
    log.info("torch uses %d CPU thread(s) (%s)", threads, reason)


def _fit_and_test(
    cfg: DictConfig,
    trainer: L.Trainer,
    model: L.LightningModule,
    datamodule: L.LightningDataModule,
    ckpt_path: str | None,
    verbose: bool = True,
) -> tuple[dict[str, float], str]:
    metrics: dict[str, float] = {}
    if cfg.get("train"):
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics.update(_floats(trainer.callback_metrics))
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if cfg.get("test"):
        if not best:
            log.warning("no best checkpoint (checkpointing off?): testing the current weights")
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=verbose)
        metrics.update(_floats(trainer.callback_metrics))
    return metrics, best


def _floats(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if getattr(v, "numel", lambda: 1)() == 1}


@hydra_app("train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        raise ConfigError(
            f"optimized_metric '{name}' was not logged; available: {', '.join(sorted(metrics))}"
        )
    return metrics[name]


if __name__ == "__main__":
    main()
