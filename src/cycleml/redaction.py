"""Passwords out of everything cycleml writes or prints.

A database URL such as ``postgresql+psycopg://user:PASS@host/db`` may reach a command
line; its password is replaced by ``***`` (as SQLAlchemy's ``safe_url`` shows it) in
the run folder's config files, the logs and error messages. The safer route is to keep
it off the command line: ``PGPASSWORD`` or ``~/.pgpass`` (libpq reads both).
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

HIDDEN = "***"

# scheme://user:password@host — the password runs to the last '@' before the host: one
# inside a password should be written %40, as SQLAlchemy reads it, but a raw one must not
# leave the rest of the password shown; a user name may hold an '@' (user@server, as some
# cloud databases name their users). Hydra writes a multirun's overrides with ':' escaped
# (scheme\://user\:password@)
_URL_PASSWORD = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*\\?://[^\s:/\\]*\\?:)"
    r"(?:[^\s@]|@(?=[^\s@/]*@))+(?=@)"
)
# ...?password=secret&... (libpq and SQLAlchemy query parameters)
_QUERY_PASSWORD = re.compile(r"(?i)(?P<head>[?&](?:password|passwd|pwd)=)[^&\s'\"]+")


def redact(text: str) -> str:
    """``text`` with every URL password replaced by ``***``."""
    # neither pattern can match without these: most lines (a server's access log writes
    # one per request) skip both expressions, 0.2 us instead of 10 us a line
    if "://" not in text and "=" not in text:
        return text
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + HIDDEN, text)
    return _QUERY_PASSWORD.sub(lambda m: m.group("head") + HIDDEN, text)


def redact_values(value: Any) -> Any:
    """A copy of ``value`` (plain dicts, lists, strings) with passwords redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_values(item) for item in value]
    return value


class RedactSecrets(logging.Filter):
    """A logging filter that redacts passwords from every record it passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        hidden = redact(message)
        if hidden != message:
            record.msg, record.args = hidden, None
        return True


def redact_logging() -> None:
    """Put :class:`RedactSecrets` on every handler of the root logger (once each)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())


class RedactingStream:
    """A text stream that redacts passwords from what is written to it; everything else
    (``isatty``, ``fileno``, ``encoding``, …) is the wrapped stream's."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text))
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def redacted_output() -> Iterator[None]:
    """Redact passwords from everything written to stdout and stderr meanwhile (Hydra's
    own messages included, such as a failed override echoing its value)."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


@contextlib.contextmanager
def redacted_argv() -> Iterator[None]:
    """Redact passwords from ``sys.argv`` meanwhile: trackers such as W&B store the
    command line in the run's metadata when the run starts."""
    saved = list(sys.argv)
    sys.argv[1:] = [redact(arg) for arg in saved[1:]]
    try:
        yield
    finally:
        sys.argv[:] = saved
