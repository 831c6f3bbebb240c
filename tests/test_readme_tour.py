"""The README cannot go stale: every command of its ``bash`` blocks is checked.

* each ``cycleml`` command is taken apart as the CLI takes it (the command, the plain
  arguments of ``compare`` and ``data diff`` as overrides) and its config is composed
  with those overrides, so a renamed option, group or key fails here (sweeps compose
  with the first value of each swept override);
* every other command must be listed in ``NOT_CYCLEML`` with the test that covers it or
  why it is not run, so a new command in the README fails until it is covered;
* a slow test walks the README's journey for real with tiny settings: gather, clean,
  diff, train, eval, compare, export, predict, and the ``--help`` / ``--cfg job`` lines.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from cycleml.cli import COMMANDS
from cycleml.cli_args import as_overrides
from cycleml.configs_path import config_dir
from cycleml.experiments.cli import experiment_overrides
from cycleml.monitoring.cli import monitor_overrides
from cycleml.registry.cli import registry_overrides

README = Path(__file__).resolve().parents[1] / "README.md"

# commands that are not `cycleml …`: what covers each, or why it is not run here
NOT_CYCLEML = {
    "make train": "the Makefile's train target: the tour's `cycleml train` (slow test)",
    "make test": "the Makefile's test target runs this suite",
    "python scripts/make_demo_text.py": "run by the slow journey below",
    "curl": "the serving routes are tested over real HTTP in tests/test_serving_*.py",
    "docker": "needs Docker; the image's entry point is `cycleml`",
    "open": "opens a report in the browser; the report is written by tests/test_monitoring_*.py",
}
# the config of each command (`cycleml data <sub>` → data_<sub>)
CONFIG_OF = {"train": "train", "eval": "eval", "compare": "compare", "export": "export",
             "predict": "predict", "serve": "serve", "monitor": "monitor",
             "pipeline": "pipeline"}  # fmt: skip
# placeholders the README uses for a user's own run or file
PLACEHOLDERS = {"<run>": "RUN", "<file.ckpt>": "best.ckpt"}


def readme_commands() -> list[str]:
    """Every command line of the README's ``bash`` blocks, continuations joined,
    comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


def cycleml_words(command: str) -> list[str] | None:
    words = shlex.split(command)
    return words[1:] if words[0] == "cycleml" else None


def config_and_overrides(args: list[str], tmp_path: Path) -> tuple[str, list[str]] | None:
    """The config a `cycleml` command composes and its overrides; None for `--help`."""
    if not args or args[0] in ("--help", "-h"):
        return None
    command, rest = args[0], args[1:]
    assert command in COMMANDS, f"README uses an unknown command: {command}"
    if command == "data":
        command, rest = f"data_{rest[0]}", rest[1:]
        if command == "data_diff":
            rest = as_overrides(rest, ["old", "new"])
    elif command == "registry":
        command, rest = "registry", registry_overrides(rest[0], rest[1:])
    elif command == "experiment":
        command, rest = "ab", experiment_overrides(rest[0], rest[1:])
    else:
        if command == "monitor":
            rest = monitor_overrides(rest)
        command = CONFIG_OF[command]
    if command == "compare":
        rest = as_overrides(rest, ["folder"], {"--sort": "sort", "--metrics": "metrics"})
    overrides, index = [], 0
    while index < len(rest):
        arg = rest[index]
        if arg in ("--help", "-h"):
            return None
        if arg == "--config-dir":  # a user's config folder: made here with the named group
            folder = tmp_path / rest[index + 1]
            (folder / "gather").mkdir(parents=True, exist_ok=True)
            example = Path(config_dir()) / "gather" / "example.yaml"
            for option in [o.split("=", 1)[1] for o in rest if o.startswith("gather=")]:
                (folder / "gather" / f"{option}.yaml").write_text(example.read_text())
            overrides.append(f"hydra.searchpath=[file://{folder}]")
            index += 2
            continue
        if arg in ("--cfg", "-c"):
            index += 2
            continue
        if arg in ("-m", "--multirun"):
            index += 1
            continue
        for placeholder, value in PLACEHOLDERS.items():
            arg = arg.replace(placeholder, value)
        overrides.append(arg)
        index += 1
    return command, [_first_of_sweep(o) for o in overrides]


def _first_of_sweep(override: str) -> str:
    """A swept override (``a=1,2``, ``tag(log, interval(…))``) as one value: parsed
    (so a typo fails), then the first choice, or dropped for a search space."""
    parsed = OverridesParser.create().parse_override(override)
    if not parsed.is_sweep_override():
        return override
    choices = list(parsed.sweep_iterator()) if parsed.is_discrete_sweep() else []
    return f"{parsed.get_key_element()}={choices[0]}" if choices else ""


def test_every_readme_command_is_covered() -> None:
    commands = readme_commands()
    assert len(commands) > 30  # the parser found the tour
    others = [c for c in commands if cycleml_words(c) is None]
    uncovered = [c for c in others if not any(c.startswith(k) for k in NOT_CYCLEML)]
    assert not uncovered, f"README commands no test covers (add them to NOT_CYCLEML): {uncovered}"
    stale = [k for k in NOT_CYCLEML if not any(c.startswith(k) for c in others)]
    assert not stale, f"NOT_CYCLEML lists commands the README no longer has: {stale}"


@pytest.mark.parametrize("command", [c for c in readme_commands() if cycleml_words(c)])
def test_readme_command_composes(command: str, tmp_path: Path) -> None:
    found = config_and_overrides(cycleml_words(command) or [], tmp_path)
    if found is None:  # a --help line: the slow journey runs it
        return
    name, overrides = found
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(name, overrides=[o for o in overrides if o], return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    assert cfg.task_name


def cycleml(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "cycleml.cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, f"cycleml {' '.join(args)}:\n{result.stderr[-3000:]}"
    return result


TINY = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2", "logger=csv", "callbacks.progress_bar=null",
        "torch_threads=1"]  # fmt: skip


@pytest.mark.slow
def test_the_readme_journey_runs(tmp_path: Path) -> None:
    """The tour's path for a new user, in a fresh folder, with tiny settings."""
    work = tmp_path
    help_text = cycleml("--help", cwd=work).stdout
    assert all(f"  {c} " in help_text for c in COMMANDS)
    assert "data" in cycleml("train", "--help", cwd=work).stdout
    assert "model:" in cycleml("train", "--cfg", "job", cwd=work).stdout

    cycleml("data", "gather", "sources.digits.limit=300", "progress=false", cwd=work)
    cleaned = cycleml("data", "clean", "input=data/gathered", "progress=false", cwd=work).stdout
    assert "near-duplicate threshold" in cleaned and (work / "data/gathered-clean").is_dir()
    cycleml("data", "diff", "data/gathered", "data/gathered-clean", cwd=work)
    cycleml("train", "data=gathered", "data.path=data/gathered-clean", "data.channels=1",
            "data.mean=[0.5]", "data.std=[0.5]", *TINY, cwd=work)  # fmt: skip

    cycleml("train", *TINY, cwd=work)
    runs = sorted((work / "logs/train/runs").iterdir())
    run = runs[-1]
    cycleml("eval", f"ckpt_path={run}", cwd=work)
    cycleml("compare", "logs/train", cwd=work)
    cycleml("compare", "logs/train", "--sort", "val/f1", "--metrics", "test/acc,val/f1", cwd=work)
    cycleml("export", f"ckpt_path={run}", cwd=work)
    assert (work / "bundles/digits/1/bundle.json").is_file()

    subprocess.run(
        [sys.executable, str(README.parent / "scripts/make_demo_text.py"), "--rows", "300"],
        cwd=work, check=True, timeout=120,
    )  # fmt: skip
    cycleml("train", "experiment=text_sentiment", *TINY, cwd=work)
    text_run = sorted((work / "logs/train/runs").iterdir())[-1]
    cycleml("export", f"ckpt_path={text_run}", cwd=work)
    assert (work / "bundles/reviews/1/bundle.json").is_file()

    photos = work / "photos"
    photos.mkdir()
    for path in sorted((work / "data/gathered/files").rglob("*.png"))[:5]:
        (photos / path.name).write_bytes(path.read_bytes())
    cycleml("predict", "bundle=bundles/digits/1", "input=photos/",
            "db_url=sqlite:///predictions.db", "progress=false", cwd=work)  # fmt: skip
    assert (work / "predictions.db").is_file()
    assert "path:" in cycleml("serve", "path=bundles/digits", "--cfg", "job", cwd=work).stdout
