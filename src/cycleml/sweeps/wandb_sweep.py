"""Run a cycleml command for a W&B sweep agent, W&B's parameters turned into Hydra overrides.

The sweep files in ``configs/sweeps/`` start every run as

    python -m cycleml.sweeps.wandb_sweep train experiment=digits ... '{"model.optimizer.lr": 0.01}'

W&B fills the last argument (its ``${args_json}`` macro) with the run's parameters; each
becomes ``key=value`` written in Hydra's grammar (strings quoted where needed, ``None``
as ``null``, lists as ``[a,b]``), which W&B's own ``${args_no_hyphens}`` does not do.
The run joins the agent's W&B run: its id (``WANDB_RUN_ID``) goes to ``logger.wandb.id``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from cycleml.errors import ConfigError
from cycleml.sweeps.overrides import override

log = logging.getLogger(__name__)

RUN_ID_ENV = "WANDB_RUN_ID"
RUN_ID_KEY = "logger.wandb.id"


def hydra_overrides(params: Mapping[str, Any]) -> list[str]:
    """One override per W&B parameter; nested parameters (dicts) become dotted keys."""
    overrides = []
    for key, value in params.items():
        if isinstance(value, Mapping) and value:
            overrides += hydra_overrides({f"{key}.{k}": v for k, v in value.items()})
        else:
            overrides.append(override(str(key), value))
    return overrides


def cycleml_arguments(argv: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
    """The ``cycleml`` command line for a W&B run.

    ``argv``: the cycleml command, fixed overrides, and W&B's parameters as a JSON object
    (anywhere after the command).
    """
    env = os.environ if env is None else env
    if not argv or argv[0].startswith(("-", "{")):
        raise ConfigError(
            "usage: python -m cycleml.sweeps.wandb_sweep <cycleml command> [overrides] "
            "'<W&B parameters as JSON>'"
        )
    command, arguments = argv[0], []
    for arg in argv[1:]:
        if arg.lstrip().startswith("{"):
            try:
                params = json.loads(arg)
            except ValueError as err:
                raise ConfigError(f"W&B parameters are not valid JSON: {arg!r} ({err})") from err
            # in place, so that flags such as `--cfg job` keep their position
            arguments += hydra_overrides(params)
        else:
            arguments.append(arg)
    run_id = env.get(RUN_ID_ENV)
    if run_id and not any(a.startswith(f"{RUN_ID_KEY}=") for a in arguments):
        arguments.insert(0, override(RUN_ID_KEY, run_id))
    return [command, *arguments]


def main(argv: Sequence[str] | None = None) -> None:
    from cycleml.cli import main as cycleml_main

    try:
        arguments = cycleml_arguments(sys.argv[1:] if argv is None else argv)
    except ConfigError as err:
        print(f"cycleml wandb sweep: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    log.info("cycleml %s", " ".join(arguments))
    cycleml_main(arguments)


if __name__ == "__main__":
    main()
