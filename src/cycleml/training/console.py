"""What a training run shows on the console: little by default, everything with verbose=true."""

from __future__ import annotations

import logging

# ``log.info(..., extra=CONSOLE)``: a line meant for the user, shown also when not verbose
CONSOLE = {"console": True}


class ConsoleFilter(logging.Filter):
    """Passes warnings and errors, and the info lines marked with :data:`CONSOLE`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or getattr(record, "console", False)
