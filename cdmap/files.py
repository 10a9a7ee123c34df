"""File identity: the one input-vs-output guard of every command, and the sampled content hash of inputs.

:func:`check_outputs_spare_inputs` is called by every command that writes (predict, vectorize, tiles, train,
evaluate) before it touches anything: no output may be, replace, or sit inside a folder that the command
deletes or fills with, one of its inputs. Files are compared by resolved path (symlinks followed) and by
inode (hard links, bind mounts), so two spellings of one file are one file.

:func:`content_hash` identifies an input by content for ``--resume``: files up to :data:`WHOLE_LIMIT` are
hashed whole; larger ones through their size, the first and last MiB and :data:`SAMPLES` evenly spaced
64 KiB blocks. That reads at most ~18 MiB whatever the scene's size (well under a second, even on network
storage) and changes whenever a GeoTIFF is rewritten by GDAL: its header, tile offsets and byte counts live in
the sampled head and tail, and any re-encoded tile moves or changes bytes the samples see with high
probability. A same-size in-place edit of a few bytes in an unsampled block of a huge file would be missed;
such edits are not what tools that write rasters do.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cdmap.errors import InputError, OutputError

WHOLE_LIMIT = 64 << 20
SAMPLES = 256
_BLOCK = 64 << 10
_END = 1 << 20
#: companion files GDAL reads with a raster (an external mask, overviews, auxiliary metadata)
GDAL_SIDECARS = (".msk", ".ovr", ".aux.xml")


def with_sidecars(path: str | os.PathLike) -> list[Path]:
    """``path`` and the GDAL companion files beside it that exist (``X.tif.msk``, ``X.tif.ovr``...)."""
    path = Path(path)
    return [path] + [p for p in (path.with_name(path.name + s) for s in GDAL_SIDECARS) if p.exists()]


def _identity(path: Path) -> tuple[Path, tuple[int, int] | None]:
    resolved = Path(os.path.realpath(path))
    try:
        st = os.stat(path)
        return resolved, (st.st_dev, st.st_ino)
    except OSError:
        return resolved, None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_outputs_spare_inputs(inputs: Iterable[str | os.PathLike], outputs: Iterable[str | os.PathLike],
                               folders: Iterable[str | os.PathLike] = ()) -> None:
    """Raise :class:`OutputError` (exit 6) when an output is one of ``inputs``.

    ``outputs`` are the files the command creates, replaces or deletes; ``folders`` the folders it deletes or
    fills (everything inside one counts as an output). An input is hit when it is the same file as an output
    (resolved path or inode) or lies inside one of ``folders``.
    """
    outs = [_identity(Path(p)) for p in outputs]
    trees = [Path(os.path.realpath(p)) for p in folders]
    out_inodes = {ino: path for path, ino in outs if ino is not None}
    out_paths = {path for path, _ in outs}
    for raw in inputs:
        path, ino = _identity(Path(raw))
        hit = path in out_paths or (ino is not None and ino in out_inodes)
        if hit or any(_inside(path, t) for t in trees):
            raise OutputError("is an input of this command and would be replaced or deleted by its outputs; "
                              "choose another output location", raw)


def content_hash(path: str | os.PathLike) -> str:
    """A fast content identity of a file (see the module doc): ``blake2b`` hex digest."""
    path = Path(path)
    h = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            h.update(size.to_bytes(8, "little"))
            if size <= WHOLE_LIMIT:
                while block := f.read(1 << 20):
                    h.update(block)
            else:
                step = (size - 2 * _END) // SAMPLES
                offsets = [0] + [_END + i * step for i in range(SAMPLES)] + [size - _END]
                for off in offsets:
                    f.seek(off)
                    h.update(f.read(_END if off in (0, size - _END) else _BLOCK))
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", path) from exc
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """``blake2b`` hex digest of a whole file (the checksum of resume strips)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def text_digest(text: str) -> str:
    """``blake2b`` hex digest of a text (the checksum of a journal line)."""
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


@contextmanager
def replaced_atomically(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary name beside ``path``; on success it is renamed onto ``path`` (signals held), on any
    error or interruption it is removed, so ``path`` is never half-written."""
    from cdmap import process

    path = Path(path)
    tmp = path.with_name(f".{path.name}.cdmap-tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        with process.signals_blocked():
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (renames, removals) to disk; best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
