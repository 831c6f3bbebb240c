"""Wrong config values, misspelled groups and impossible setups: one line, at once."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from cycleml.accelerators import check_gpus, visible_cuda_devices
from cycleml.cli_args import (
    HYDRA_LONG_OPTIONS,
    HYDRA_VALUE_OPTIONS,
    as_overrides,
    check_no_bare_words,
)
from cycleml.config_schema import SCHEMAS, check_config
from cycleml.configs_path import config_dir
from cycleml.errors import ConfigError
from cycleml.hydra_app import OVERRIDE_EXAMPLES
from cycleml.override_hints import check_overrides

CONFIGS = Path(config_dir())
# an error must come within 3 s of the command; CPU time is what the command itself
# costs (about 0.5 s measured), the bound leaves room for a loaded test machine
ERROR_CPU_BOUND_S = 3.0


def cycleml(*args: str, cwd: Path, env: dict[str, str] | None = None):
    """``cycleml <args>`` in a subprocess; returns (result, CPU seconds it used)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    before = usage.ru_utime + usage.ru_stime
    result = subprocess.run(
        [sys.executable, "-m", "cycleml", *args],
        cwd=cwd,
        env={**os.environ, "CYCLEML_ROOT": str(cwd), "WANDB_MODE": "offline", **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return result, usage.ru_utime + usage.ru_stime - before


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("command", "override", "expected"),
    [
        ("train", "trainer.max_epochs=abc", "trainer.max_epochs='abc': expected an integer >= -1"),
        ("train", "data.batch_size=sixty", "data.batch_size='sixty': expected an integer >= 1"),
        ("train", "model.optimizer.lr=-1", "model.optimizer.lr=-1: expected a number > 0"),
        ("eval", "trainer.max_epochs=abc", "trainer.max_epochs='abc': expected an integer"),
        ("export", "export.opset=high", "export.opset='high': expected an integer >= 17"),
        ("predict", "batch_size=0", "batch_size=0: expected an integer >= 1"),
        ("serve", "port=http", "port='http': expected an integer in [0, 65535]"),
        ("experiment", "alpha=abc", "alpha='abc': expected a number in (0, 1)"),
        # a value Hydra's grammar cannot read: the line shows the quoting that works
        (
            "monitor",
            "db_url=postgresql+psycopg://u@h/db?options=-csearch_path=x",
            "Hydra cannot read this value as text",
        ),
        ("pipeline", "note=it's fine", 'Hydra receives note="it\'s fine"'),
        ("experiment", "metric.higher_is_better=maybe", "expected true or false"),
        ("experiment", "guardrails.error_status=abc", "expected an integer in [100, 599]"),
    ],
)
def test_wrong_value_is_one_line_naming_key_value_and_expectation(
    command, override, expected, tmp_path
):
    required = {
        "eval": ["ckpt_path=x.ckpt"],
        "export": ["ckpt_path=x.ckpt"],
        "predict": ["bundle=b", "input=i"],
        "serve": ["path=p"],
        "experiment": ["report", "new-cnn"],
    }.get(command, [])
    result, cpu = cycleml(command, *required, override, cwd=tmp_path)
    line = one_line_error(result)
    assert line == f"cycleml {command}: error: {expected}" or expected in line
    assert cpu < ERROR_CPU_BOUND_S, f"{cpu:.2f} s CPU"
    assert not (tmp_path / "logs").exists(), "a run folder was created for a config error"


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [("modle=cnn", "did you mean model=cnn?"), ("model=cnnn", "did you mean model=cnn?")],
)
def test_misspelled_group_or_option_suggests_the_nearest(override, suggestion, tmp_path):
    result, cpu = cycleml("train", override, cwd=tmp_path)
    assert suggestion in one_line_error(result)
    assert cpu < ERROR_CPU_BOUND_S


@pytest.mark.parametrize("command", ["eval", "export", "predict", "serve", "data_gather"])
def test_misspelled_group_in_other_commands(command):
    with pytest.raises(ConfigError, match="did you mean paths.root_dir=x"):
        check_overrides(command, ["pahts.root_dir=x"])


def test_misspelled_option_in_eval():
    with pytest.raises(ConfigError, match="did you mean trainer=cpu"):
        check_overrides("eval", ["trainer=cpuu"])


def test_a_group_set_to_null_says_how_to_leave_it_out(tmp_path):
    # Hydra itself stops with a traceback ("Got NoneType")
    result, _ = cycleml("train", "logger=null", cwd=tmp_path)
    assert "logger=null" in one_line_error(result) and "~logger" in one_line_error(result)
    with pytest.raises(ConfigError, match="callbacks=none"):
        check_overrides("train", ["callbacks=null"])


def test_valid_overrides_pass_the_hints():
    check_overrides(
        "train",
        [
            "model=resnet18",
            "~logger",
            "callbacks=none",
            "model=cnn,resnet18",
            "+extra.key=1",
            "hydra/launcher=parallel",
            "experiment=digits",
            "seed=3",
            "model.optimizer.lr=0.1",
        ],
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "b"], "cycleml train: error: unexpected argument 'b': overrides are "
         "key=value, e.g. trainer.max_epochs=3"),
        (["serve", "foo", "path=p"], "cycleml serve: error: unexpected argument 'foo': "
         "overrides are key=value, e.g. port=8080"),
        (["train", "-m", "seed=1,2", "b"], "unexpected argument 'b'"),
        # past the plain arguments a command names (show <ref>, compare <folder>)
        (["registry", "show", "digits", "extra"], "unexpected argument 'extra'"),
        (["compare", "logs", "more"], "unexpected argument 'more'"),
        # the name typed, not the config's
        (["data", "diff", "a", "b", "c"], "cycleml data diff: error: unexpected argument "
         "'c': overrides are key=value, e.g. limit=20"),
        (["data", "gather", "x"], "cycleml data gather: error: unexpected argument 'x'"),
        (["data", "clean", "x"], "cycleml data clean: error: unexpected argument 'x'"),
        # a value the shell split at a space
        (["registry", "alias", "digits", "champion=3", "reason=first", "release"],
         "cycleml registry: error: unexpected argument 'release': a value with spaces needs "
         "quotes: reason='first release'"),
    ],
)  # fmt: skip
def test_a_plain_word_among_overrides_is_named_with_the_key_value_form(args, expected, tmp_path):
    # Hydra itself stops with its grammar's parse error ("missing EQUAL"), status 1
    result, cpu = cycleml(*args, cwd=tmp_path)
    line = one_line_error(result)
    assert line == expected or expected in line
    assert cpu < ERROR_CPU_BOUND_S, f"{cpu:.2f} s CPU"
    assert not (tmp_path / "logs").exists()


def test_hydra_options_and_override_forms_still_reach_hydra(tmp_path):
    result, _ = cycleml("train", "--cfg", "job", "~logger", "+extra.key=1", "++seed=3",
                        "hydra.job.chdir=false", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["extra"] == {"key": 1} and shown["seed"] == 3 and "logger" not in shown


def test_overrides_and_hydra_options_are_no_plain_words():
    check_no_bare_words(
        ["-m", "seed=1,2", "+extra=1", "++trainer.max_epochs=2", "~logger", "hydra.run.dir=x",
         "--cfg", "job", "-c", "all", "--resolve", "--package", "model", "--info", "config",
         "--config-name", "train", "-cn", "train", "--config-dir", "d", "-cd", "d",
         "--config-path", "p", "-cp", "p", "--experimental-rerun", "f.pickle", "--help",
         "--hydra-help", "-h", "hydra/launcher=parallel", "model@m=cnn", "--run"],
        "key=value",
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"^unexpected argument 'b': overrides are key=value, "
                       r"e.g. seed=1$"):  # fmt: skip
        check_no_bare_words(["--cfg", "job", "b"], "seed=1")
    with pytest.raises(ConfigError, match="unexpected argument ''"):
        check_no_bare_words(["seed=1", ""], "seed=1")


def test_abbreviated_hydra_options_take_their_value(tmp_path):
    """Hydra's argparse takes an unambiguous prefix of a long option (allow_abbrev)."""
    result, _ = cycleml("train", "--config-n", "train", "--pack", "trainer", "--cf", "job",
                        cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)  # the package: the trainer's settings only
    assert "max_epochs" in shown and "model" not in shown


def test_the_value_of_an_abbreviated_option_is_no_plain_word():
    check_no_bare_words(
        ["--config-n", "train", "--pack", "trainer", "--cf", "job", "--i", "config",
         "--config-d", "d", "--experimental", "f.pickle", "--pa", "model"],
        "key=value",
    )  # fmt: skip
    # a flag's prefix takes no value; an ambiguous prefix (argparse refuses it) neither
    for option in ("--res", "--mul", "--c", "--config", "--h"):
        with pytest.raises(ConfigError, match="unexpected argument 'x'"):
            check_no_bare_words([option, "x"], "seed=1")
    # a plain argument after an abbreviated option is its value, not a positional
    assert as_overrides(["--config-n", "compare", "logs"], ["folder"]) == [
        "--config-n", "compare", "folder='logs'"
    ]  # fmt: skip
    assert as_overrides(["--pack", "x", "--so", "y"], ["folder"]) == [
        "--pack", "x", "--so", "folder='y'"
    ]  # fmt: skip


def test_hydra_option_lists_match_hydras_parser():
    from hydra._internal.utils import get_args_parser

    actions = get_args_parser()._actions
    long_options = {o for a in actions for o in a.option_strings if o.startswith("--")}
    with_value = {o for a in actions if a.nargs != 0 for o in a.option_strings}
    assert long_options == HYDRA_LONG_OPTIONS
    assert with_value == HYDRA_VALUE_OPTIONS


def test_a_word_after_an_override_is_named_as_a_split_value():
    with pytest.raises(ConfigError, match=r"^unexpected argument 'big': a value with spaces "
                       r"needs quotes: reason='first big release'$"):  # fmt: skip
        check_no_bare_words(["name=x", "reason=first", "big", "release", "seed=1"], "seed=1")
    with pytest.raises(ConfigError, match=r"needs quotes: \+note='it'\"'\"'s done'$"):
        check_no_bare_words(["+note=it's", "done"], "seed=1")
    # a value already quoted (a plain argument as_overrides named) is no split value
    with pytest.raises(ConfigError, match=r"^unexpected argument 'c': overrides are key=value"):
        check_no_bare_words(["old='a'", "new='b'", "c"], "seed=1")
    with pytest.raises(ConfigError, match=r"^unexpected argument 'x': overrides are key=value"):
        check_no_bare_words(["--cfg=job", "x"], "seed=1")


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_each_primary_config_has_an_example_override_that_composes(name):
    required = {
        "eval": ["ckpt_path=x.ckpt"], "export": ["ckpt_path=x.ckpt"],
        "predict": ["bundle=b", "input=i"], "serve": ["path=p"], "compare": ["folder=logs"],
        "data_diff": ["old=a", "new=b"],
    }.get(name, [])  # fmt: skip
    key, value = OVERRIDE_EXAMPLES[name].split("=", 1)
    cfg = _compose(name, [*required, OVERRIDE_EXAMPLES[name]])
    assert OmegaConf.select(cfg, key) == yaml.safe_load(value)


def _primary_options() -> list[tuple[str, list[str]]]:
    """Every shipped group option, composed with the primary config that uses it."""
    cases: list[tuple[str, list[str]]] = []
    for group in ("model", "data", "trainer", "augment", "callbacks", "logger", "debug"):
        for option in sorted(p.stem for p in (CONFIGS / group).glob("*.yaml")):
            cases.append(("train", [f"{group}={option}"]))
    for option in sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml")):
        cases.append(("train", [f"experiment={option}"]))
    cases.append(("train", ["hparams_search=optuna"]))
    for option in sorted(p.stem for p in (CONFIGS / "trainer").glob("*.yaml")):
        cases.append(("eval", ["ckpt_path=x.ckpt", f"trainer={option}"]))
    for option in sorted(p.stem for p in (CONFIGS / "data").glob("*.yaml")):
        cases.append(("eval", ["ckpt_path=x.ckpt", f"+data={option}"]))
    cases += [
        ("export", ["ckpt_path=x.ckpt"]),
        ("predict", ["bundle=b", "input=i"]),
        ("serve", ["path=p"]),
        ("data_gather", []),
        ("data_clean", []),
        ("data_diff", ["old=a", "new=b"]),
        ("compare", ["folder=logs"]),
        ("monitor", []),
        ("registry", []),
        ("ab", []),
        ("pipeline", ["pipeline=digits"]),
    ]
    # the pipeline composes the training groups as `cycleml train` does
    for group in ("model", "data", "trainer", "augment", "callbacks", "logger"):
        for option in sorted(p.stem for p in (CONFIGS / group).glob("*.yaml")):
            cases.append(("pipeline", [f"{group}={option}"]))
    return cases


@pytest.mark.parametrize(("name", "overrides"), _primary_options(), ids=str)
def test_every_shipped_config_passes_the_schema(name, overrides):
    check_config(_compose(name, overrides), name)


def _compose(name: str, overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return compose(config_name=name, overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.slow
def test_every_schema_key_exists_in_some_shipped_config():
    """A key in the table that no composed config has would never be checked (a typo in
    the table, or a setting renamed in the configs but not here)."""
    composed: dict[str, list[DictConfig]] = {}
    for name, overrides in _primary_options():
        composed.setdefault(name, []).append(_compose(name, overrides))
    never = [
        f"{name}: {key}"
        for name, table in SCHEMAS.items()
        for key in table
        if not any(_has_key(cfg, key) for cfg in composed.get(name, []))
    ]
    assert never == [], "\n".join(never)


def _has_key(cfg: DictConfig, key: str) -> bool:
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    return isinstance(parent, DictConfig) and leaf in parent.keys()  # noqa: SIM118


def test_missing_required_value_is_named(tmp_path):
    result, _ = cycleml("eval", cwd=tmp_path)
    assert "ckpt_path is required: a .ckpt file or a training run folder" in one_line_error(result)


def test_a_sweep_value_is_checked_before_the_first_job(tmp_path):
    result, _ = cycleml("train", "-m", "model.optimizer.lr=1e-3,-1", "debug=fdr", cwd=tmp_path)
    assert "model.optimizer.lr=-1: expected a number > 0" in one_line_error(result)
    assert not list(tmp_path.glob("logs/*/multiruns/*/*/summary.json")), "a job ran"


# ---- impossible setups -------------------------------------------------------------


def test_gpu_trainer_without_a_gpu_says_so_at_once(tmp_path):
    # CUDA_VISIBLE_DEVICES="" hides every GPU, so this holds on GPU machines too
    result, cpu = cycleml("train", "trainer=gpu", cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": ""})
    line = one_line_error(result)
    assert "trainer.accelerator=gpu needs a CUDA GPU" in line and "trainer=cpu" in line
    assert cpu < ERROR_CPU_BOUND_S


def test_cuda_accelerator_and_device_count(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_cuda_devices() == 0
    with pytest.raises(ConfigError, match="accelerator=cuda needs a CUDA GPU"):
        check_gpus({"accelerator": "cuda", "devices": 1})
    check_gpus({"accelerator": "cpu", "devices": 4})
    check_gpus({"accelerator": "gpu", "devices": 0})


@pytest.mark.skipif(not visible_cuda_devices(), reason="needs a CUDA GPU")
def test_visible_gpus_pass_and_too_many_are_named(monkeypatch):
    import torch

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_cuda_devices() == torch.cuda.device_count()
    check_gpus({"accelerator": "gpu", "devices": 1})
    with pytest.raises(ConfigError, match="asks for 999 GPUs"):
        check_gpus({"accelerator": "gpu", "devices": 999})


def test_slurm_launcher_without_slurm_says_so(tmp_path):
    # a PATH without sbatch, whatever this machine has
    env = {"PATH": str(Path(sys.executable).parent)}
    result, cpu = cycleml(
        "train", "-m", "hydra/launcher=slurm", "model.optimizer.lr=1e-3,1e-2", cwd=tmp_path, env=env
    )
    line = one_line_error(result)
    assert "hydra/launcher=slurm submits the trials with sbatch" in line
    assert "hydra/launcher=parallel" in line
    assert cpu < ERROR_CPU_BOUND_S
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("command", ["export", "eval"])
def test_missing_checkpoint_is_named_at_once(command, tmp_path):
    result, cpu = cycleml(command, f"ckpt_path={tmp_path}/no_such.ckpt", cwd=tmp_path)
    assert "no_such.ckpt' does not exist" in one_line_error(result)
    assert cpu < ERROR_CPU_BOUND_S


@pytest.mark.parametrize("command", ["export", "eval"])
def test_baseline_run_is_not_exported_and_says_why(command, tmp_path):
    run = tmp_path / "logs" / "train" / "runs" / "r1"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "baseline.joblib").write_bytes(b"fitted pipeline")
    result, cpu = cycleml(command, f"ckpt_path={run}", cwd=tmp_path)
    line = one_line_error(result)
    assert "scikit-learn baseline run" in line and "not exported to ONNX" in line
    assert "summary.json" in line
    assert cpu < ERROR_CPU_BOUND_S


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("clean.min_width=0", "clean.min_width=0: expected an integer >= 1"),
        ("clean.checks.leakage=delete", "clean.checks.leakage='delete': expected one of"),
        ("clean.hamming=64", "clean.hamming=64: expected"),
    ],
)
def test_data_clean_settings_are_checked_before_the_data_is_read(override, expected, tmp_path):
    result, _ = cycleml("data", "clean", "input=nowhere", override, cwd=tmp_path)
    assert expected in one_line_error(result)
