"""`cycleml serve path=<bundle or repository> [overrides]`: the HTTP server.

The server itself (uvicorn, the ASGI app, ONNX Runtime) is imported when the command
runs, so that `--help` and config errors answer at once; see ``serving/server.py``.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from cycleml.hydra_app import hydra_app
from cycleml.serving.settings import ServeSettings

# keys of the serve config that are not server settings
_NOT_SETTINGS = ("task_name", "paths")


def settings_from_config(cfg: DictConfig) -> ServeSettings:
    values = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(values, dict)
    for key in _NOT_SETTINGS:
        values.pop(key, None)
    return ServeSettings.from_dict(values)


@hydra_app("serve")
def main(cfg: DictConfig) -> None:
    from cycleml.serving.server import serve

    serve(settings_from_config(cfg))


if __name__ == "__main__":
    main()
