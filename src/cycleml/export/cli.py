"""`cycleml export ckpt_path=… [export.*]`: a checkpoint → a verified model bundle."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from cycleml.errors import ConfigError
from cycleml.hydra_app import hydra_app

if TYPE_CHECKING:
    from cycleml.inference.bundle import ModelBundle

log = logging.getLogger(__name__)

_PLACEMENT = ("name", "version", "out_dir", "bundles_dir")


@hydra_app("export")
def main(cfg: DictConfig) -> str:
    from cycleml.training.evaluate import resolve_checkpoint

    # a wrong path or a baseline run is named before torch and ONNX are imported
    ckpt = resolve_checkpoint(cfg.ckpt_path)

    from cycleml.registry.cli import open_registry
    from cycleml.registry.text import registered_line

    options: dict[str, Any] = OmegaConf.to_container(cfg.export, resolve=True)  # type: ignore[assignment]
    placement = {key: options.pop(key, None) for key in _PLACEMENT}
    # the registry is opened first, so that a bad root or database fails before the export
    registry = open_registry(cfg.registry) if options.pop("register", False) else None
    try:
        bundle = _export(ckpt, placement, options)
        if registry is None:
            return str(bundle.path)
        registered, created = registry.register(
            bundle.path,
            description=cfg.registry.description or "",
            tags=OmegaConf.to_container(cfg.registry.tags, resolve=True),  # type: ignore[arg-type]
        )
    finally:
        if registry is not None:
            registry.close()
    print(registered_line(registered, created))
    return registered.ref


def _export(ckpt_path: Path, placement: dict[str, Any], options: dict[str, Any]) -> ModelBundle:
    from cycleml.export.checkpoint import export_checkpoint
    from cycleml.export.exporter import ExportSettings

    try:
        settings = ExportSettings(**options)
    except TypeError as err:
        raise ConfigError(f"unknown export option: {err}") from err
    version = placement["version"]
    bundle = export_checkpoint(
        ckpt_path,
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
    return bundle


if __name__ == "__main__":
    main()
