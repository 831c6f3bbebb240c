"""Database writes in a child process, so that they take no time from the server's GIL.

The server's writer threads (the prediction log's, the assignment log's) gather what
waits in their buffers and hand it over whole to :meth:`WriterProcess.write`: the batch
is pickled once (protocol 5: its numpy arrays' buffers are written to the pipe as they
are, without a copy, the GIL released while the kernel copies them), and the thread waits
for the child's answer with the GIL released. The child runs the writer that
``factory(db_url)`` builds (the same code the thread ran in the server before: the
features, the parameter binding, the transaction) and answers each message with None
(written) or the reason it failed.

The child is a fresh interpreter (``python -c``, as multiprocessing's ``spawn`` starts
one, never a ``fork`` of the server, which has ONNX Runtime's threads and its own; and,
unlike ``spawn``, without importing the server's ``__main__`` again), started with the
server, with a socket pair as its pipe; it opens the database at once. A child that dies
(or cannot start) fails the write in flight with the reason, and the next write starts
a new one. The child ignores SIGINT (the server drains on Ctrl-C and stops it
afterwards) and exits by itself when the server's end of the pipe closes, also when the
server is killed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Protocol

from cycleml.db import safe_url

log = logging.getLogger(__name__)

# seconds a stopped child is given to exit before it is terminated
_EXIT_WAIT_S = 5.0


class Writer(Protocol):
    """What the child runs: writes one message's payload (raises when it cannot)."""

    def __call__(self, payload: Any) -> None: ...

    def close(self) -> None: ...


class WriterError(Exception):
    """A write the child could not do, or a child that died while writing."""


class WriterProcess:
    """A child process that writes what it is sent through ``factory(db_url)``.

    ``factory`` must be picklable by reference (a module-level class or function). Calls
    to :meth:`write` come from one thread at a time (the writer thread)."""

    def __init__(self, name: str, factory: Callable[[str], Writer], db_url: str) -> None:
        self.name = name
        self.factory = factory
        self.db_url = db_url
        self._process: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._busy = threading.Lock()  # held while a write is in flight
        self._closed = False

    def start(self) -> None:
        """Start the child now (at the server's start-up: its imports and its
        connection cost CPU once, before requests come), instead of on the first write.
        A child that cannot start is logged; the first write tries again."""
        with self._busy:
            try:
                self._connection()
            except Exception as err:
                log.warning("%s: cannot start the writer process (%s)", self.name, err)

    @property
    def pid(self) -> int | None:
        """The child's process id (None: none is running)."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def write(self, payload: Any) -> None:
        """Send ``payload`` to the child and wait until it is written; a WriterError
        says why it was not (the child's error, or the child's death)."""
        with self._busy:
            if self._closed:
                raise WriterError("the writer process is stopped")
            conn = self._connection()
            # arrays travel out of band: pickled as references, their buffers written to
            # the socket as they are (no copy; the GIL released while the kernel copies)
            buffers: list[pickle.PickleBuffer] = []
            head = pickle.dumps(payload, protocol=5, buffer_callback=buffers.append)
            try:
                conn.send((head, len(buffers)))
                for buffer in buffers:
                    conn.send_bytes(buffer.raw())
                failure = conn.recv()
            except (EOFError, OSError) as err:
                self._forget()
                raise WriterError(f"the writer process died ({self._exit_reason()})") from err
            if failure is not None:
                raise WriterError(failure)

    def close(self, timeout: float = _EXIT_WAIT_S) -> None:
        """Stop the child: between writes it closes its writer and exits (within
        ``timeout``, else it is terminated); a write still in flight (a database that
        hangs) is cut short by terminating the child, and fails in the writing thread."""
        self._closed = True
        if not self._busy.acquire(blocking=False):
            _stop(self._process)  # the writing thread reads EOF and forgets the child
            return
        try:
            process, conn = self._process, self._conn
            if process is not None and conn is not None and process.poll() is None:
                with contextlib.suppress(OSError):
                    conn.send(None)  # the child closes its writer and exits
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout)
            _stop(process)
            if conn is not None:
                conn.close()
            self._process = self._conn = None
        finally:
            self._busy.release()

    # -- the child's lifetime ------------------------------------------------------------
    def _connection(self) -> Connection:
        if self._conn is not None and self._process is not None and self._process.poll() is None:
            return self._conn
        self._forget()
        ours, theirs = socket.socketpair()
        try:
            # the child finds the modules where this process does
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
            process = subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                pass_fds=[theirs.fileno()],
                env=env,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # only the child holds it now: its death reads as EOF here
        conn = Connection(ours.detach())
        self._process, self._conn = process, conn
        with contextlib.suppress(OSError):  # a child that died at once: the write says so
            conn.send((self.factory, self.db_url))
        log.info("%s: writing to %s in process %d", self.name, safe_url(self.db_url), process.pid)
        return conn

    def _forget(self) -> None:
        """Drop a dead (or dying) child: its pipe closed, its exit status collected."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(_EXIT_WAIT_S)
            _stop(self._process)

    def _exit_reason(self) -> str:
        process = self._process
        if process is None or process.returncode is None:
            return "no exit status"
        return f"exit status {process.returncode}"


def _stop(process: subprocess.Popen | None) -> None:
    """Terminate ``process`` if it still runs (killed if it does not exit then)."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(_EXIT_WAIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# the child's program: its end of the socket pair is the first argument; Ctrl-C (sent
# to the server's process group) is the server's to handle, from the child's first line
_CHILD = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "from cycleml.serving.writer_process import main; main(int(sys.argv[1]))"
)


def main(fd: int) -> None:
    """The child: its writer's factory and URL come first, then what to write."""
    conn = Connection(fd)
    try:
        factory, db_url = conn.recv()
    except (EOFError, OSError):
        return
    serve(conn, factory, db_url)


def serve(conn: Connection, factory: Callable[[str], Writer], db_url: str) -> None:
    """The child: write each message received, answer None or the reason it failed;
    stop at None or when the server's end closes. The writer is built at once, and on
    each write until a build succeeds (a database that was down at start-up)."""
    writer: Writer | None = None
    with contextlib.suppress(Exception):  # a database down now: the first write says so
        writer = factory(db_url)
    try:
        while True:
            try:
                message = conn.recv()
                if message is None:
                    return
                head, count = message
                # writable copies: the writer may work on the arrays in place
                buffers = [bytearray(conn.recv_bytes()) for _ in range(count)]
            except (EOFError, OSError):
                return
            try:
                if writer is None:
                    writer = factory(db_url)
                writer(pickle.loads(head, buffers=buffers))
            except Exception as err:
                answer: str | None = str(err) or type(err).__name__
            else:
                answer = None
            try:
                conn.send(answer)
            except OSError:
                return
    finally:
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
        conn.close()
