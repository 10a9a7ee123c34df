"""The resume journal of a predict run: which row strips are finished, and for which inputs and options.

Layout under ``OUTDIR/.cdmap-partial/``::

    journal.jsonl          line 1: the run manifest; then one line per finished strip (append-only, fsynced)
    journal.rank3.jsonl    the strip lines of rank 3 of a torchrun job (rank 0 appends to journal.jsonl)
    strips/r000012.npz     the strip's stored probabilities (final dtype) and validity

A strip's file is written under a temporary name, flushed and renamed *before* its journal line is
appended, so a journal line always names a complete file. A torn last line (killed mid-write) is ignored.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from cdmap.errors import OutputError, ResumeError

log = logging.getLogger("cdmap.predict")

WORKDIR_NAME = ".cdmap-partial"
RANK_LINES = "journal.rank{rank}.jsonl"


def _fsync_dir(path: Path) -> None:
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


class Journal:
    """Append-only record of finished strips, with the manifest that a resume must match."""

    def __init__(self, workdir: Path, manifest: dict[str, Any], done: dict[int, dict[str, Any]]) -> None:
        self.workdir = workdir
        self.manifest = manifest
        self.done = done  # grid_row -> record
        self.lines_path = self.path  # where this process appends its strip lines (see for_rank)

    @property
    def path(self) -> Path:
        return self.workdir / "journal.jsonl"

    @property
    def strips_dir(self) -> Path:
        return self.workdir / "strips"

    def for_rank(self, rank: int) -> Journal:
        """This journal, appending its strip lines to ``rank``'s own file: ranks never share a file."""
        if rank > 0:
            self.lines_path = self.workdir / RANK_LINES.format(rank=rank)
        return self

    @classmethod
    def create(cls, workdir: Path, manifest: dict[str, Any]) -> Journal:
        """Start a fresh journal (removing any leftover partial run in ``workdir``)."""
        try:
            if workdir.exists():
                shutil.rmtree(workdir)
            (workdir / "strips").mkdir(parents=True)
            tmp = workdir / "journal.jsonl.tmp"
            with open(tmp, "w") as f:
                f.write(json.dumps({"manifest": manifest}, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, workdir / "journal.jsonl")
            _fsync_dir(workdir)
        except OSError as exc:
            raise OutputError(f"cannot create the run journal: {exc.strerror or exc}", workdir) from exc
        return cls(workdir, manifest, {})

    @classmethod
    def load(cls, workdir: Path) -> Journal | None:
        """The journal in ``workdir``, or None when there is no readable one."""
        path = workdir / "journal.jsonl"
        if not path.is_file():
            return None
        lines = path.read_text().splitlines()
        try:
            manifest = json.loads(lines[0])["manifest"]
        except (IndexError, ValueError, KeyError, TypeError):
            return None
        done: dict[int, dict[str, Any]] = {}
        rank_files = sorted(workdir.glob(RANK_LINES.format(rank="*")))  # any earlier world size
        for strip_lines in [lines[1:]] + [p.read_text().splitlines() for p in rank_files]:
            for line in strip_lines:
                try:
                    rec = json.loads(line)
                except ValueError:
                    break  # torn final line from a kill mid-append
                if (workdir / "strips" / rec["file"]).is_file():
                    done[int(rec["grid_row"])] = rec
        return cls(workdir, manifest, done)

    def check_matches(self, manifest: dict[str, Any]) -> None:
        """Refuse to resume when inputs, checkpoint or options differ from the journal's run."""
        diffs = [k for k in sorted(set(manifest) | set(self.manifest)) if manifest.get(k) != self.manifest.get(k)]
        if diffs:
            shown = "; ".join(f"{k}: was {self.manifest.get(k)!r}, now {manifest.get(k)!r}" for k in diffs[:3])
            raise ResumeError(f"cannot resume, the interrupted run differs ({shown})", self.workdir.parent)

    def finished_rows(self) -> int:
        """Rows [0, n) are finished: the contiguous prefix of strips from the top."""
        n = 0
        for gr in sorted(self.done):
            rec = self.done[gr]
            if rec["row0"] != n:
                break
            n = rec["row1"]
        return n

    def strip_file(self, grid_row: int) -> Path:
        return self.strips_dir / f"r{grid_row:06d}.npz"

    def record_strip(self, grid_row: int, row0: int, row1: int, data: np.ndarray, valid: np.ndarray,
                     stats: dict[str, Any]) -> None:
        """Persist one finished strip, then append its journal line."""
        final = self.strip_file(grid_row)
        tmp = final.with_name(final.stem + ".tmp.npz")
        rec = {"grid_row": grid_row, "row0": row0, "row1": row1, "file": final.name, "stats": stats}
        try:
            with open(tmp, "wb") as f:
                np.savez(f, data=data, valid=np.packbits(valid, axis=None), shape=np.array(valid.shape))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            with open(self.lines_path, "a") as f:
                f.write(json.dumps(rec, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise OutputError(f"cannot write a finished strip: {exc.strerror or exc}", self.workdir) from exc
        self.done[grid_row] = rec

    def read_strip(self, grid_row: int) -> tuple[np.ndarray, np.ndarray]:
        """(data, valid) of a finished strip."""
        with np.load(self.strip_file(grid_row)) as z:
            shape = tuple(int(s) for s in z["shape"])
            valid = np.unpackbits(z["valid"], count=shape[0] * shape[1]).reshape(shape).astype(bool)
            return z["data"], valid

    def remove(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def open_journal(workdir: Path, manifest: dict[str, Any], resume: bool) -> Journal:
    """The journal to continue (``resume`` and a matching one exists) or a fresh one; notes go to the log.

    Raises :class:`ResumeError` when ``resume`` finds a journal of a different run.
    """
    existing = Journal.load(workdir) if workdir.exists() else None
    if resume:
        if existing is not None:
            existing.check_matches(manifest)
            log.info("resuming: %d rows already finished",
                     sum(r["row1"] - r["row0"] for r in existing.done.values()))
            return existing
        log.info("--resume: no interrupted run found here, starting from the beginning")
    elif existing is not None or workdir.exists():
        log.warning("discarding an unfinished earlier run in this directory (use --resume to continue one)")
    return Journal.create(workdir, manifest)
