"""`cycleml export ckpt_path=… [export.*]`: a checkpoint → a verified model bundle."""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cycleml.errors import ConfigError
from cycleml.hydra_app import hydra_app

log = logging.getLogger(__name__)

_PLACEMENT = ("name", "version", "out_dir", "bundles_dir")


@hydra_app("export")
def main(cfg: DictConfig) -> str:
    from cycleml.training.evaluate import resolve_checkpoint

    # a wrong path or a baseline run is named before torch and ONNX are imported
    ckpt = resolve_checkpoint(cfg.ckpt_path)

    from cycleml.export.checkpoint import export_checkpoint
    from cycleml.export.exporter import ExportSettings

    options: dict[str, Any] = OmegaConf.to_container(cfg.export, resolve=True)  # type: ignore[assignment]
    placement = {key: options.pop(key, None) for key in _PLACEMENT}
    try:
        settings = ExportSettings(**options)
    except TypeError as err:
        raise ConfigError(f"unknown export option: {err}") from err
    version = placement["version"]
    bundle = export_checkpoint(
        ckpt,
        out_dir=placement["out_dir"],
        bundles_dir=placement["bundles_dir"] or "bundles",
        name=placement["name"],
        version=None if version is None else str(version),
        settings=settings,
    )
    parity = bundle.meta.verification["parity"]
    log.info(
        "exported %s %s to %s: val accuracy %.2f%%, parity max |diff| %.1e%s",
        bundle.meta.name,
        bundle.meta.version,
        bundle.path,
        100 * bundle.meta.metrics["bundle/val_acc"],
        parity["max_abs_diff"],
        "".join(
            f", {p} {100 * v.accuracy:.2f}% (-{v.accuracy_drop:.2f})"
            for p, v in bundle.meta.variants.items()
        ),
    )
    return str(bundle.path)


if __name__ == "__main__":
    main()
