"""The one GDAL error vocabulary of :mod:`cdmap.raster`: which exceptions GDAL raises, their text on one
line, and GDAL's complaints about creation options."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from rasterio.errors import RasterioError

try:  # GDAL errors raised directly (rasterio >= 1.3 chains them under RasterioIOError)
    from rasterio._err import CPLE_BaseError
except ImportError:  # pragma: no cover - private module moved
    CPLE_BaseError = RasterioError  # type: ignore[misc,assignment]

__all__ = ["GDAL_ERRORS", "gdal_message", "capture_option_warnings", "option_error"]

#: What a GDAL read or write may raise (catch these, then report :func:`gdal_message`).
GDAL_ERRORS: tuple[type[BaseException], ...] = (RasterioError, CPLE_BaseError, OSError)
MESSAGE_LIMIT = 400

_GDAL_LOGGER = "rasterio._env"
_capture_lock = threading.Lock()


def gdal_message(exc: BaseException, limit: int = MESSAGE_LIMIT) -> str:
    """The informative text of an exception chain on one line (an OSError gives its ``strerror``).

    Texts repeated along the chain and rasterio's "See previous exception" are left out.
    """
    parts: list[str] = []
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        text = cur.strerror if isinstance(cur, OSError) and cur.strerror else " ".join(str(cur).split())
        if text and "See previous exception" not in text and not any(text in q for q in parts):
            parts.append(text)
        cur = cur.__cause__ or cur.__context__
    msg = "; ".join(parts) or type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


class _GdalWarnings(logging.Handler):
    """Collects GDAL warnings that rasterio logs while a dataset is created."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def capture_option_warnings() -> Iterator[list[str]]:
    """Yield a list filled with GDAL's complaints about creation options during the block."""
    logger = logging.getLogger(_GDAL_LOGGER)
    handler = _GdalWarnings()
    with _capture_lock:
        old_level = logger.level
        if logger.getEffectiveLevel() > logging.WARNING:
            logger.setLevel(logging.WARNING)
        logger.addHandler(handler)
        found: list[str] = []
        try:
            yield found
        finally:
            logger.removeHandler(handler)
            logger.setLevel(old_level)
            found.extend(m for m in handler.messages
                         if "creation option" in m or "not recognised" in m or "not recognized" in m
                         or "unexpected value" in m)


def option_error(exc: BaseException, opts: dict[str, str]) -> bool:
    """True when a GDAL failure names one of ``opts`` (a bad creation option rather than an I/O problem)."""
    text = gdal_message(exc).upper()
    return any(f"{k}=" in text or f"{k} " in text for k in opts)
