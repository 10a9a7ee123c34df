"""The one handler that prints the library's log records as ``cdmap: ...`` lines on stderr.

The library only logs (``logging.getLogger("cdmap")``); the CLI decides what is printed: notes (INFO) and
warnings by default, warnings only with ``-q``, debug records with ``-v``.
"""

from __future__ import annotations

import logging
import sys
import warnings

LOGGER = "cdmap"


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"cdmap: error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"cdmap: warning: {msg}"
        return f"cdmap: {msg}"


class _StderrHandler(logging.StreamHandler):
    """Writes to the *current* ``sys.stderr`` (tests and callers may swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr  # not setStream(): that flushes the old stream, which may be closed
        super().emit(record)


def install(verbose: bool = False) -> logging.Handler:
    """Install (once) the stderr handler on the ``cdmap`` logger; INFO by default, DEBUG when verbose."""
    logger = logging.getLogger(LOGGER)
    handler = next((h for h in logger.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        handler.setFormatter(_Formatter())
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    warnings.showwarning = show_warning
    return handler


def show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: object = None, line: str | None = None) -> None:
    """Python warnings (rasterio's ``NotGeoreferencedWarning``...) as one ``cdmap: warning:`` line, without
    the source line Python would print under it."""
    text = " ".join(str(message).split())
    name = category.__name__
    logging.getLogger(f"{LOGGER}.warnings").warning("%s", text if name == "UserWarning" else f"{name}: {text}")


def set_quiet() -> None:
    """Only warnings and errors from now on (``-q``)."""
    logger = logging.getLogger(LOGGER)
    for h in logger.handlers:
        if isinstance(h, _StderrHandler):
            h.setLevel(logging.WARNING)
