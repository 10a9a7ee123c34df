"""cdmap.allocator: glibc keeps the pages of freed large tensors for the next batch (Linux/glibc only)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings: Linux only")

# Allocate and free 200 MiB twice; print the resident set after the free (MiB) and tune_allocator()'s result.
PROBE = """
import ctypes, sys
from cdmap.allocator import tune_allocator
tuned = tune_allocator() if sys.argv[1] == "tune" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
for _ in range(2):
    p = libc.malloc(200 << 20)
    ctypes.memset(p, 1, 200 << 20)  # touch every page
    libc.free(p)
print(tuned, rss())
"""


def _probe(mode: str, **env: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0], int(out[1])


def _is_glibc() -> bool:
    return bool(os.confstr("CS_GNU_LIBC_VERSION")) if hasattr(os, "confstr") else False


@pytest.mark.skipif(not _is_glibc(), reason="needs glibc")
def test_tuned_allocator_keeps_freed_large_blocks_default_gives_them_back():
    tuned, kept = _probe("tune", CDMAP_TUNE_MALLOC="1")
    default_flag, given_back = _probe("default")
    assert tuned == "True" and default_flag == "False"
    assert kept - given_back >= 150  # the freed 200 MiB stayed in the process instead of a fresh mmap each time


@pytest.mark.skipif(not _is_glibc(), reason="needs glibc")
@pytest.mark.parametrize("env", [{"CDMAP_TUNE_MALLOC": "0"}, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
                                 {"MALLOC_ARENA_MAX_": "2"}])
def test_users_choice_of_allocator_settings_is_left_alone(env):
    tuned, _ = _probe("tune", **env)
    assert tuned == "False"


def test_cli_tunes_the_allocator(monkeypatch, capsys):
    from cdmap import allocator
    from cdmap.cli import main

    calls = []
    monkeypatch.setattr(allocator, "tune_allocator", lambda: calls.append(1) or True)
    try:
        main(["models"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    assert "fsgnet-rgb-v1" in capsys.readouterr().out
    assert calls == [1]
