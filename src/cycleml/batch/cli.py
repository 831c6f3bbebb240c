"""`cycleml predict bundle=… input=… db_url=…`: offline prediction into a database."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from cycleml.errors import ConfigError
from cycleml.hydra_app import hydra_app

if TYPE_CHECKING:
    from cycleml.batch.runner import PredictSummary

# ONNX Runtime and the database layer are imported when the run starts, so that
# `--help` and config errors answer at once

log = logging.getLogger(__name__)

SUMMARY_FILE = "predict_summary.json"


@hydra_app("predict")
def main(cfg: DictConfig) -> PredictSummary:
    from cycleml.batch.runner import PredictSettings, predict_to_database

    runtime = cfg.get("runtime") or {}
    monitoring = cfg.get("monitoring") or {}
    monitoring_db_url = monitoring.get("db_url") if monitoring.get("enabled", False) else None
    if monitoring.get("enabled", False) and not monitoring_db_url:
        raise ConfigError("monitoring.enabled needs monitoring.db_url (an SQLAlchemy URL)")
    providers = runtime.get("providers")
    settings = PredictSettings(
        batch_size=int(cfg.batch_size),
        decode_workers=int(cfg.decode_workers),
        prefetch=int(cfg.prefetch),
        top_k=int(cfg.top_k),
        shard=None if cfg.shard is None else str(cfg.shard),
        text_field=str(cfg.text_field),
        image_field=str(cfg.image_field),
        key_field=None if cfg.key_field is None else str(cfg.key_field),
        input_format=cfg.input_format,
        precision=str(cfg.precision),
        intra_op_threads=int(runtime.get("intra_op_threads", 0)),
        inter_op_threads=int(runtime.get("inter_op_threads", 1)),
        providers=list(OmegaConf.to_container(providers)) if providers else None,  # type: ignore[arg-type]
        spin_wait=bool(runtime.get("spin_wait", False)),
        progress=bool(cfg.progress),
        monitoring_db_url=None if monitoring_db_url is None else str(monitoring_db_url),
    )
    summary = predict_to_database(cfg.bundle, cfg.input, str(cfg.db_url), settings)
    if HydraConfig.initialized():
        path = Path(HydraConfig.get().runtime.output_dir) / SUMMARY_FILE
        path.write_text(json.dumps(summary.to_dict(), indent=2) + "\n", encoding="utf-8")
        log.info("summary written to %s", path)
    return summary


if __name__ == "__main__":
    main()
