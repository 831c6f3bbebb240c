"""Ctrl-C during training: save the state, so that the run can be resumed."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

log = logging.getLogger(__name__)

# the exit status of a run stopped by Ctrl-C, as a shell reports a SIGINT
INTERRUPTED_EXIT = 130


class CheckpointOnInterrupt(L.Callback):
    """Saves ``<dirpath>/<filename>.ckpt`` when fitting is stopped by Ctrl-C (SIGINT).

    Only a KeyboardInterrupt during ``fit``: after another error the last good
    checkpoint is worth more than the state that failed.
    """

    def __init__(self, dirpath: str, filename: str = "last") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
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
