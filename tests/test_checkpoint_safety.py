"""A checkpoint is read without running code from it: a crafted one is refused, not run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cycleml.errors import ConfigError
from cycleml.models.checkpoint_file import read_checkpoint
from test_config_checks import cycleml


class RunsACommand:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def crafted(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "code-ran"
    path = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"model_config": RunsACommand(marker)}}, path)
    return path, marker


def test_crafted_checkpoint_is_refused_in_process(crafted):
    path, marker = crafted
    with pytest.raises(ConfigError, match="refused: it asks for .*system"):
        read_checkpoint(path)
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["export", "eval"])
def test_crafted_checkpoint_is_refused_by_the_command(command, crafted, tmp_path):
    path, marker = crafted
    result, _ = cycleml(command, f"ckpt_path={path}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "refused" in errors[0] and str(path) in errors[0]
    assert not marker.exists()


def test_a_file_that_is_no_checkpoint_is_named(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(path)
