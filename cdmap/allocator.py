"""The C allocator's settings for large tensors (glibc on Linux): keep freed memory for the next batch.

By default glibc serves every allocation above a dynamic threshold (at most 32 MiB) with a fresh ``mmap`` and
gives it back on free, and trims the heap's free top beyond 128 KiB. A forward pass at batch 4 allocates and
frees activations of 20-50 MiB, so every batch touches tens of thousands of new pages again; on a virtual
machine each page fault is expensive (a 51 MiB padded copy in an EfficientNet block cost 50 ms of page
faults, 8 % of the forward). :func:`tune_allocator` serves allocations below 1 GiB from the heap and stops
trimming it, so the pages of one batch are reused by the next. The peak memory does not change (the same
tensors live at once); what changes is that freed memory stays with the process until it exits.

The CLI applies it to every command; a library user may call it. It is skipped when the user chose an
allocator or its settings (``LD_PRELOAD`` of jemalloc/tcmalloc/mimalloc, ``GLIBC_TUNABLES`` with malloc
settings, ``MALLOC_*_`` variables) or set ``CDMAP_TUNE_MALLOC=0``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys

log = logging.getLogger("cdmap")

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 30  # allocations below this come from the heap, and a free top below it is not trimmed

def _user_chose() -> str | None:
    if os.environ.get("CDMAP_TUNE_MALLOC", "1") == "0":
        return "CDMAP_TUNE_MALLOC=0"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return f"LD_PRELOAD={preload}"
    if "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    named = [k for k in os.environ if k.startswith("MALLOC_") and k.endswith("_")]
    return named[0] if named else None


@functools.cache
def tune_allocator() -> bool:
    """Set glibc's mmap and trim thresholds to :data:`THRESHOLD` once per process; True when they are set.

    A no-op (False) off Linux/glibc, or when the user chose an allocator or its settings (see the module doc).
    """
    reason = _user_chose() if sys.platform.startswith("linux") else "not Linux"
    if reason is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            gnu = libc.gnu_get_libc_version  # glibc only: musl has no mallopt thresholds
            gnu.restype = ctypes.c_char_p
            if libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD):
                log.debug("allocator: glibc %s, mmap and trim thresholds %d MiB", gnu().decode(), THRESHOLD >> 20)
                return True
            reason = "mallopt refused"
        except (OSError, AttributeError) as exc:
            reason = f"no glibc ({exc})"
    log.debug("allocator: left as it is (%s)", reason)
    return False
