"""Ctrl-C during training: save the state, so that the run can be resumed."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

log = logging.getLogger(__name__)

# the exit status of a run stopped by Ctrl-C, as a shell reports a SIGINT
INTERRUPTED_EXIT = 130


class CheckpointOnInterrupt(L.Callback):
    """Ctrl-C (SIGINT) during ``fit`` stops at the next batch and saves ``<dirpath>/<filename>.ckpt``.

    The first Ctrl-C only asks to stop: the KeyboardInterrupt is raised between two batches,
    so it never lands inside a checkpoint being written or a library that would swallow it.
    A second Ctrl-C interrupts at once. Only a KeyboardInterrupt during ``fit`` saves: after
    another error the last good checkpoint is worth more than the state that failed.
    """

    def __init__(self, dirpath: str, filename: str = "last") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self._asked = False
        self._previous: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # not at fit start: Lightning notes the handlers after that and puts them back at its end
        self._asked = False
        # a process started with SIGINT ignored (nohup, `&`) keeps ignoring it, and a
        # handler set outside Python (getsignal gives None) could not be put back; any
        # other (Python's own, or one a host program set) is put back at the end
        if threading.current_thread() is threading.main_thread() and signal.getsignal(
            signal.SIGINT
        ) not in (signal.SIG_IGN, None):
            self._previous = signal.signal(signal.SIGINT, self._ask_to_stop)

    def _ask_to_stop(self, signum: int, frame: FrameType | None) -> None:
        if self._asked:
            raise KeyboardInterrupt
        self._asked = True

    def _stop_if_asked(self, *args: Any) -> None:
        if self._asked:
            raise KeyboardInterrupt

    on_train_batch_start = _stop_if_asked
    on_train_batch_end = _stop_if_asked
    on_validation_batch_end = _stop_if_asked

    def _restore_handler(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handler()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handler()
        if not isinstance(exception, KeyboardInterrupt) or trainer.state.fn != TrainerFn.FITTING:
            return
        trainer.save_checkpoint(self.path)
        log.info("interrupted at step %d: saved %s", trainer.global_step, self.path)


def report_interrupt(trainer: L.Trainer, run_dir: Path) -> None:
    """Say where Ctrl-C stopped and the command that continues the run."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        log.warning("interrupted at step %d before any checkpoint was saved", trainer.global_step)
        return
    log.warning(
        "interrupted at step %d (state in %s); resume with: cycleml train ckpt_path=%s",
        trainer.global_step,
        last,
        run_dir,
    )
