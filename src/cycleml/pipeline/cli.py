"""`cycleml pipeline [hydra overrides]`: gather → clean → train → evaluate → export →
register → gate → promote, resumable, one pipeline per model at a time."""

from __future__ import annotations

from omegaconf import DictConfig

from cycleml.hydra_app import hydra_app


@hydra_app("pipeline")
def main(cfg: DictConfig) -> None:
    from cycleml.pipeline.runner import run_pipeline

    status = run_pipeline(cfg)
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    main()
