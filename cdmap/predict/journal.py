"""The resume journal of a predict run: which row strips are finished, and for which inputs and options.

Layout under ``OUTDIR/.cdmap-partial/``::

    journal.jsonl          line 1: the run manifest; then one line per finished strip (append-only, fsynced)
    journal.rank3.jsonl    the strip lines of rank 3 of a torchrun job (rank 0 appends to journal.jsonl)
    strips/r000012.npz     the strip's stored probabilities (final dtype) and validity

A strip's file is written under a temporary name, flushed and renamed *before* its journal line is
appended, so a journal line always names a complete file. Every line carries a checksum of itself (``crc``)
and a strip's line the checksum of its file (``digest``). On resume a torn last line (killed mid-write) is
ignored; any other damaged line or strip file is reported in one warning and its strips are computed again.
A damaged first line (the manifest) means the run cannot be identified: it is started again, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from cdmap.errors import OutputError, ResumeError
from cdmap.files import file_digest, fsync_dir, text_digest

log = logging.getLogger("cdmap.predict")

WORKDIR_NAME = ".cdmap-partial"
RANK_LINES = "journal.rank{rank}.jsonl"


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
                f.write(_line({"manifest": manifest}))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, workdir / "journal.jsonl")
            fsync_dir(workdir)
        except OSError as exc:
            raise OutputError(f"cannot create the run journal: {exc.strerror or exc}", workdir) from exc
        return cls(workdir, manifest, {})

    @classmethod
    def load(cls, workdir: Path) -> Journal | None:
        """The journal in ``workdir``, or None when there is none or its manifest line is damaged (logged).

        Damaged strip lines and strip files are left out of ``done`` (so computed again), with one warning.
        """
        path = workdir / "journal.jsonl"
        if not path.is_file():
            return None
        lines = path.read_bytes().decode(errors="replace").splitlines()
        head = _parse(lines[0]) if lines else None
        if head is None or not isinstance(head.get("manifest"), dict):
            log.warning("%s: the journal's first line (the run's inputs and options) is damaged; the "
                        "interrupted run cannot be identified and is started again", path)
            return None
        done: dict[int, dict[str, Any]] = {}
        damaged: list[str] = []
        rank_files = sorted(workdir.glob(RANK_LINES.format(rank="*")))  # any earlier world size
        sources = [(path, lines, 2)] + [(p, p.read_bytes().decode(errors="replace").splitlines(), 1)
                                        for p in rank_files]
        for source, strip_lines, first in sources:
            body = strip_lines[first - 1:]
            for i, line in enumerate(body, start=first):
                rec = _parse(line)
                if rec is None or not _is_strip_record(rec):
                    if i < first + len(body) - 1 or line.endswith("}"):  # a torn last line ends a kill
                        damaged.append(f"{source.name} line {i}")
                    continue
                strip = workdir / "strips" / rec["file"]
                if not strip.is_file() or file_digest(strip) != rec["digest"]:
                    damaged.append(rec["file"])
                    continue
                done[int(rec["grid_row"])] = rec
        if damaged:
            shown = ", ".join(damaged[:4]) + (f" and {len(damaged) - 4} more" if len(damaged) > 4 else "")
            log.warning("%s: %d damaged journal entr%s (%s); those strips are computed again", path,
                        len(damaged), "y" if len(damaged) == 1 else "ies", shown)
        return cls(workdir, manifest=head["manifest"], done=done)

    def check_matches(self, manifest: dict[str, Any]) -> None:
        """Refuse to resume when inputs, checkpoint or options differ from the journal's run."""
        diffs = _differences(self.manifest, manifest)
        if diffs:
            raise ResumeError(f"cannot resume, the interrupted run differs ({'; '.join(diffs[:3])})",
                              self.workdir.parent)

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
            rec["digest"] = file_digest(tmp)
            os.replace(tmp, final)
            with open(self.lines_path, "a") as f:
                f.write(_line(rec))
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise OutputError(f"cannot write a finished strip: {exc.strerror or exc}", self.workdir) from exc
        finally:
            tmp.unlink(missing_ok=True)  # interrupted or failed before the rename
        self.done[grid_row] = rec

    def read_strip(self, grid_row: int) -> tuple[np.ndarray, np.ndarray]:
        """(data, valid) of a finished strip (checked against its digest when the journal was loaded)."""
        path = self.strip_file(grid_row)
        try:
            with np.load(path) as z:
                shape = tuple(int(s) for s in z["shape"])
                valid = np.unpackbits(z["valid"], count=shape[0] * shape[1]).reshape(shape).astype(bool)
                return z["data"], valid
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise OutputError(f"a finished strip changed while the run was using it ({type(exc).__name__}); "
                              "rerun with --resume to compute it again", path) from exc

    def remove(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def _differences(was: Any, now: Any, where: str = "") -> list[str]:
    """Short descriptions of where ``now`` differs from ``was`` (nested dicts and lists by key path)."""
    if isinstance(was, dict) and isinstance(now, dict):
        out: list[str] = []
        for k in sorted(set(was) | set(now), key=str):
            out += _differences(was.get(k), now.get(k), f"{where}.{k}" if where else str(k))
        return out
    if isinstance(was, list) and isinstance(now, list) and len(was) == len(now):
        names = ("before", "after") if where == "inputs" and len(was) == 2 else range(len(was))
        return [d for n, a, b in zip(names, was, now, strict=True) for d in _differences(a, b, f"{where}[{n}]")]
    if was == now:
        return []
    text = f"{where}: was {was!r}, now {now!r}"
    return [text if len(text) <= 160 else f"{where} changed"]


def _line(record: dict[str, Any]) -> str:
    """A journal line: ``record`` with the checksum of its own JSON text."""
    body = json.dumps(record, sort_keys=True)
    return json.dumps({**record, "crc": text_digest(body)}, sort_keys=True) + "\n"


def _parse(line: str) -> dict[str, Any] | None:
    """The record of a journal line, or None when it is not JSON or its checksum does not match."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if not isinstance(rec, dict):
        return None
    crc = rec.pop("crc", None)
    return rec if crc == text_digest(json.dumps(rec, sort_keys=True)) else None


def _is_strip_record(rec: dict[str, Any]) -> bool:
    types = {"grid_row": int, "row0": int, "row1": int, "file": str, "digest": str, "stats": dict}
    return all(isinstance(rec.get(k), t) for k, t in types.items())


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
