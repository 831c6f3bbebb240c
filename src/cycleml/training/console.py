"""What a training run shows on the console: little by default, everything with verbose=true."""

from __future__ import annotations

import logging
import sys
import warnings

# ``log.info(..., extra=CONSOLE)``: a line meant for the user, shown also when not verbose
CONSOLE = {"console": True}


class ConsoleFilter(logging.Filter):
    """Passes warnings and errors, and the info lines marked with :data:`CONSOLE`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or getattr(record, "console", False)


# loggers that their libraries give a console handler of their own on import; through the
# root logger (configured by Hydra) their lines would be printed twice
OWN_HANDLER_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "torchmetrics")


def configure_console(verbose: bool) -> None:
    """Print each line once; unless ``verbose``, only warnings, errors and marked lines.

    The log file keeps every info line either way. Deprecation notices are addressed to
    the authors of the libraries, not to the person training, and are shown only when
    ``verbose``.
    """
    root = logging.getLogger()
    if root.handlers:
        for name in OWN_HANDLER_LOGGERS:
            own = logging.getLogger(name)
            for handler in list(own.handlers):
                if type(handler) is logging.StreamHandler:
                    own.removeHandler(handler)
            own.propagate = True
    if verbose:
        return
    terminal = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    consoles = [
        h
        for h in root.handlers
        if isinstance(h, logging.StreamHandler)
        and not isinstance(h, logging.FileHandler)
        and h.stream in terminal
    ]
    for handler in consoles:
        if not any(isinstance(f, ConsoleFilter) for f in handler.filters):
            handler.addFilter(ConsoleFilter())
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    # a resumed run's folder has its checkpoints already: that is the point
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
