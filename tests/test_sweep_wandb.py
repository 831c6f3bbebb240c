"""W&B sweep files: the command a W&B agent builds turns into a valid cycleml command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

from cycleml.configs_path import config_dir
from cycleml.errors import ConfigError
from cycleml.sweeps.wandb_sweep import cycleml_arguments, hydra_overrides

SWEEP_FILES = sorted((Path(config_dir()) / "sweeps").glob("*.yaml"))
MODULE = "cycleml.sweeps.wandb_sweep"


def agent_command(sweep: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """The command line a W&B agent runs for one run with ``params`` (no W&B server).

    W&B's own helpers build the macro values; the substitution is the agent's rule: an
    element ``${name}`` is replaced by the list of that macro's values.
    """
    command = create_sweep_command(list(sweep["command"]))
    macros = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    macros.update(interpreter=["python"], env=["/usr/bin/env"], program=[sweep.get("program", "")])
    line: list[str] = []
    for element in map(str, command):
        if element.startswith("${") and element.endswith("}"):
            line += macros.get(element[2:-1]) or []
        else:
            line.append(element)
    return line


def first_values(sweep: dict[str, Any]) -> dict[str, Any]:
    """One run's parameters: the first listed value, or a distribution's minimum."""
    params = {}
    for key, spec in sweep["parameters"].items():
        if "values" in spec:
            params[key] = spec["values"][0]
        elif "value" in spec:
            params[key] = spec["value"]
        else:
            params[key] = spec["min"]
    return params


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_sweep_file_is_a_w_and_b_sweep_that_runs_cycleml(path: Path) -> None:
    sweep = yaml.safe_load(path.read_text())
    assert sweep["method"] in {"bayes", "grid", "random"}
    assert sweep["metric"] == {"name": "val/acc", "goal": "maximize"}
    for spec in sweep["parameters"].values():
        for bound in ("min", "max"):
            # PyYAML reads 1e-6 as a string; W&B needs numbers
            assert bound not in spec or isinstance(spec[bound], (int, float))
    params = first_values(sweep)
    line = agent_command(sweep, params)
    assert line[:4] == ["/usr/bin/env", "python", "-m", MODULE]
    arguments = cycleml_arguments(line[4:], env={"WANDB_RUN_ID": "run42"})
    assert arguments[0] == "train"
    assert "logger=wandb" in arguments and "logger.wandb.offline=false" in arguments
    assert arguments[1] == "logger.wandb.id=run42"
    parser = OverridesParser.create()
    parsed = {o.key_or_group: o.value() for o in parser.parse_overrides(arguments[1:])}
    for key, value in params.items():
        assert parsed[key] == value


@pytest.mark.slow
def test_agent_command_composes_in_cycleml_train(tmp_path: Path) -> None:
    sweep = yaml.safe_load((Path(config_dir()) / "sweeps" / "digits_bayes.yaml").read_text())
    params = {**first_values(sweep), "model.optimizer.lr": 0.0123}
    line = agent_command(sweep, params)
    # the agent's `python -m cycleml.sweeps.wandb_sweep ...`, asking Hydra for the config only
    run = [sys.executable, *line[2:], "--cfg", "job"]
    env = {**os.environ, "WANDB_RUN_ID": "abcd1234", "CYCLEML_ROOT": str(tmp_path)}
    result = subprocess.run(run, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load(result.stdout[result.stdout.index("task_name") :])
    assert config["model"]["optimizer"]["lr"] == pytest.approx(0.0123)
    assert config["model"]["net"]["width"] == params["model.net.width"]
    assert config["data"]["batch_size"] == params["data.batch_size"]
    assert config["logger"]["wandb"]["offline"] is False
    assert config["logger"]["wandb"]["id"] == "abcd1234"


def test_parameter_values_become_typed_hydra_overrides() -> None:
    overrides = hydra_overrides(
        {
            "a": None,
            "b": True,
            "c": "two words",
            "d": [1, 2],
            "e": 1e-5,
            "model": {"optimizer": {"lr": 0.1}},
        }
    )
    assert overrides == [
        "a=null",
        "b=true",
        "c='two words'",
        "d=[1,2]",
        "e=1e-05",
        "model.optimizer.lr=0.1",
    ]
    parsed = [o.value() for o in OverridesParser.create().parse_overrides(overrides)]
    assert parsed == [None, True, "two words", [1, 2], 1e-5, 0.1]


def test_user_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="not valid JSON"):
        cycleml_arguments(["train", "{not json"], env={})
    with pytest.raises(ConfigError, match="usage"):
        cycleml_arguments([json.dumps({"a": 1})], env={})
    # an explicit id wins over the agent's
    assert cycleml_arguments(["train", "logger.wandb.id=mine"], env={"WANDB_RUN_ID": "x"}) == [
        "train",
        "logger.wandb.id=mine",
    ]
