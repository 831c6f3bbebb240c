"""Shared fixtures: configs composed the way `cycleml train` composes them, tiny and on CPU."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from cycleml.configs_path import config_dir

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

FAST_TRAIN = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.enable_model_summary=false",
    "logger=csv",
    "callbacks.progress_bar=null",
]


@contextlib.contextmanager
def root_logging_kept() -> Iterator[None]:
    """Leave the root logger as it was around a Hydra app run in this process.

    Hydra's job logging replaces the root handlers with one writing to ``sys.stdout`` of
    the moment (in a test: its capture, closed when the test ends) and one writing to
    the run's log file. Left in place, every later record of the session (a server
    thread's, an export's) goes to a closed stream: "--- Logging error ---".
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)


def compose_config(name: str, overrides: list[str], tmp_path: Path) -> DictConfig:
    """Compose ``configs/<name>.yaml`` with overrides, as Hydra would for a run in ``tmp_path``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.work_dir = str(tmp_path)
        del cfg["hydra"]
    return cfg


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> None:
    """Tiny models gain nothing from a second thread, and lose much on a busy CPU."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def sigint_as_at_start(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test starts with Python's own Ctrl-C handler, as a command started from a
    shell does, and a test that leaves another behind is named and the handler put
    back: Lightning ignores SIGINT for good once fit was interrupted, and a process
    started meanwhile inherits an ignored SIGINT (a training run it starts would then
    not stop on Ctrl-C)."""
    import signal
    import warnings

    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    left = signal.getsignal(signal.SIGINT)
    if left is not signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        warnings.warn(f"{request.node.nodeid} left the SIGINT handler {left!r}", stacklevel=1)


@pytest.fixture
def make_cfg(tmp_path: Path) -> Iterator[Callable[..., DictConfig]]:
    """``make_cfg("train", "model=resnet18", ...)`` → a fast CPU config writing under tmp_path."""

    def make(name: str = "train", *overrides: str, fast: bool = True) -> DictConfig:
        extra = FAST_TRAIN if fast and name == "train" else []
        return compose_config(name, [*extra, *overrides], tmp_path)

    yield make
    # leave no Hydra state behind for the next test
    HydraConfig.instance().cfg = None
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small deterministic image folder (4 classes × 24 images)."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "make_demo_images.py"
    spec = importlib.util.spec_from_file_location("make_demo_images", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_demo_images(tmp_path_factory.mktemp("images"), per_class=24, seed=0)
