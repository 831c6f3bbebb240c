"""Hydra callbacks of every cycleml command (configs/hydra/default.yaml).

``UserChecks`` looks at the composed config before Hydra creates a run folder: key
types and ranges (``config_schema``), GPUs that are not there, a SLURM launcher without
SLURM. ``RedactedJobFiles`` writes the job's ``.hydra/`` files itself, with passwords
redacted (Hydra's own copies are switched off with ``hydra.output_subdir: null``), so
that a password given on the command line never reaches the disk.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cycleml.accelerators import check_gpus
from cycleml.config_schema import check_config, check_sweep_values
from cycleml.errors import ConfigError, CycleMLError
from cycleml.files import write_atomic
from cycleml.hydra_app import exit_with_user_error, note_run_folder
from cycleml.redaction import redact, redact_logging, redact_values


def check_launcher(cfg: DictConfig) -> None:
    """A :class:`ConfigError` when the multirun launcher cannot work on this machine."""
    target = str(OmegaConf.select(cfg, "hydra.launcher._target_") or "")
    if "submitit" in target and target.endswith("SlurmLauncher"):
        if importlib.util.find_spec("submitit") is None:
            raise ConfigError("hydra/launcher=slurm needs submitit: pip install 'cycleml[sweeps]'")
        if shutil.which("sbatch") is None:
            raise ConfigError(
                "hydra/launcher=slurm submits the trials with sbatch, which is not on this "
                "machine's PATH: start the sweep where SLURM is (a login node), or run the "
                "trials here with hydra/launcher=parallel"
            )


class UserChecks(Callback):
    """Stop a run with one line before anything starts when the config cannot work."""

    def on_run_start(self, config: DictConfig, config_name: str | None = None, **_: Any) -> None:
        redact_logging()
        self._check(config, config_name or "", multirun=False)
        note_run_folder(Path(str(config.hydra.run.dir)))

    def on_multirun_start(
        self, config: DictConfig, config_name: str | None = None, **_: Any
    ) -> None:
        redact_logging()
        self._check(config, config_name or "", multirun=True)

    @staticmethod
    def _check(config: DictConfig, config_name: str, multirun: bool) -> None:
        try:
            check_config(config, config_name)
            check_gpus(config.get("trainer"))
            if multirun:
                check_sweep_values(list(config.hydra.overrides.task), config_name)
                check_launcher(config)
        except CycleMLError as err:
            # no run folder or log file exists yet: the message goes to stderr only
            exit_with_user_error(config_name, err, logged=False)


class RedactedJobFiles(Callback):
    """Write ``<run>/<subdir>/{config,hydra,overrides}.yaml`` with passwords redacted."""

    def __init__(self, subdir: str = ".hydra") -> None:
        self.subdir = subdir

    def on_job_start(self, config: DictConfig, **_: Any) -> None:
        redact_logging()
        output_dir = Path(HydraConfig.get().runtime.output_dir)
        task = OmegaConf.to_container(config, resolve=False)
        assert isinstance(task, dict)
        hydra = task.pop("hydra")
        folder = output_dir / self.subdir
        folder.mkdir(parents=True, exist_ok=True)
        _write_yaml(folder / "config.yaml", task)
        _write_yaml(folder / "hydra.yaml", {"hydra": hydra})
        _write_yaml(folder / "overrides.yaml", hydra["overrides"]["task"])
        if HydraConfig.get().mode.name == "MULTIRUN":
            _redact_file(Path(str(config.hydra.sweep.dir)) / "multirun.yaml")

    def on_job_end(self, config: DictConfig, job_return: Any = None, **_: Any) -> None:
        # Hydra prints these overrides when the job failed
        if job_return is not None and job_return.overrides:
            job_return.overrides = redact_values(list(job_return.overrides))


def _write_yaml(path: Path, values: Any) -> None:
    text = OmegaConf.to_yaml(OmegaConf.create(redact_values(values)))
    write_atomic(path, text)


def _redact_file(path: Path) -> None:
    """Redact a file another part of Hydra wrote (a sweep's multirun.yaml)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return
    hidden = redact(text)
    if hidden != text:
        write_atomic(path, hidden)
