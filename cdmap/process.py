"""Process plumbing shared by long runs (predict today, training later).

* :class:`SignalGuard`: SIGINT/SIGTERM become :class:`cdmap.errors.Interrupted` in the main thread;
* :func:`signals_blocked`: a block in which SIGINT/SIGTERM wait (renaming outputs into place);
* :class:`Fd2Capture`: file descriptor 2 redirected to a temporary file (C libraries write there directly);
* :func:`fault_point`: the test hook ``CDMAP_FAULT_INJECT=phase:N[:SIGNAL][@RANK]`` (SIGKILL, or SIGNAL, at the
  N-th ``phase`` point, on every rank or only on RANK);
* :func:`worker_errors`: an error re-raised from a DataLoader worker becomes its original one-line message.

Call :func:`fault_point` through the module (``process.fault_point(...)``) so tests can replace it.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import IO

from cdmap.errors import CdmapError, Interrupted

FAULT_ENV = "CDMAP_FAULT_INJECT"
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class SignalGuard:
    """Turns SIGINT/SIGTERM into :class:`Interrupted` in the main thread while the block runs.

    The handlers are installed even where the signal was ignored (a command started in the background of a
    non-interactive shell inherits SIGINT ignored). A forked child (a DataLoader worker) that receives the signal
    raises KeyboardInterrupt, which torch's worker loop ends quietly on: the parent reports the interruption.
    """

    def __enter__(self) -> SignalGuard:
        self._old: dict[int, object] = {}
        self._pid = os.getpid()
        if _in_main_thread():
            for sig in _SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:  # noqa: ARG002
        if os.getpid() != self._pid:
            raise KeyboardInterrupt
        raise Interrupted(signum)

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


@contextmanager
def signals_blocked() -> Iterator[None]:
    """SIGINT/SIGTERM received during the block are held and delivered, to the handlers that were in place,
    when it ends.

    The handlers are swapped for recorders rather than masking the signals: ``pthread_sigmask`` masks only the
    calling thread, and a signal delivered to any other thread (torch's, GDAL's, the reader pool's) would still
    run the Python handler in the main thread inside the block.
    """
    if not _in_main_thread():
        yield
        return
    received: list[int] = []
    old = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in _SIGNALS}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(received):
            signal.raise_signal(sig)


class Fd2Capture:
    """Redirects file descriptor 2 to a temporary file until :meth:`stop`."""

    def __init__(self) -> None:
        self._saved: int | None = None
        self._file: IO[bytes] | None = None

    def start(self) -> Fd2Capture:
        """Begin capturing; when fd 2 cannot be redirected nothing is captured."""
        try:
            sys.stderr.flush()
            self._file = tempfile.TemporaryFile()
            self._saved = os.dup(2)
            os.dup2(self._file.fileno(), 2)
        except (OSError, ValueError):
            self._saved = None
        return self

    def stop(self, replay: bool) -> str:
        """Restore fd 2; with ``replay`` the captured text is written to the real stderr. Idempotent."""
        if self._saved is None or self._file is None:
            return ""
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._saved = None
        self._file.seek(0)
        text = self._file.read().decode(errors="replace")
        self._file.close()
        if replay and text:
            sys.stderr.write(text)
            sys.stderr.flush()
        return text


_fault_lock = threading.Lock()
_fault_counts: dict[str, int] = {}


def fault_point(phase: str) -> None:
    """Test hook: with ``CDMAP_FAULT_INJECT=phase:N`` the process SIGKILLs itself at the N-th ``phase`` point;
    ``phase:N:SIGINT`` (or ``SIGTERM``) sends that signal instead, once.

    Phases: ``start`` (every command, before it runs), ``load`` (a checkpoint was read); predict's read, strip,
    assemble, vectorize, commit; ``window`` (vectorize), ``tile`` (tiles), ``batch`` (train and evaluate).
    ``...@R`` fires only in the process whose ``RANK`` is R.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    spec, _, rank = spec.partition("@")  # phase:N@R: only on rank R of a torchrun job
    if rank and rank != os.environ.get("RANK", "0"):
        return
    want, _, rest = spec.partition(":")
    if want != phase:
        return
    n, _, sig_name = rest.partition(":")
    with _fault_lock:
        _fault_counts[phase] = _fault_counts.get(phase, 0) + 1
        if _fault_counts[phase] == int(n or 1) or (not sig_name and _fault_counts[phase] > int(n or 1)):
            os.kill(os.getpid(), getattr(signal, sig_name) if sig_name else signal.SIGKILL)


def reset_fault_counts() -> None:
    """Forget the points counted so far (in-process tests run several commands in one process)."""
    with _fault_lock:
        _fault_counts.clear()


_WORKER_PREFIX = re.compile(r"^Caught (\w+) in DataLoader worker process \d+\.")


@contextmanager
def worker_errors() -> Iterator[None]:
    """Iterate a DataLoader inside this block: torch re-raises a worker's exception with the worker's whole
    traceback as its message; this keeps only the original message (the traceback's last line)."""
    try:
        yield
    except Exception as exc:
        text = str(exc)
        match = _WORKER_PREFIX.match(text)
        if match is None:
            raise
        # the traceback ends "module.ExcName: message" (a CdmapError has it on one line already)
        marker = f"{match[1]}: "
        original = text[text.rfind(marker) + len(marker):].strip() if text.count(marker) else match[1]
        if isinstance(exc, CdmapError):
            new = type(exc).__new__(type(exc))
            Exception.__init__(new, original)
            new.exit_code = exc.exit_code
            new.path = None
            raise new from None
        raise RuntimeError(f"{match[1]} in a data loader worker: {original}") from None
