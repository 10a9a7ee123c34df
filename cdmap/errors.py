"""Exception types with one-line, user-facing messages and documented exit codes.

Every error a user can act on is a :class:`CdmapError`. The CLI prints ``cdmap: error: <message>`` on one
line and exits with ``exit_code``; a traceback appears only with ``--verbose``.

Exit codes (also documented in the README):

====  ==========================================================
 0    success
 1    unexpected internal error (a bug: please report it)
 2    bad command-line usage (unknown option, bad value)
 3    an input file is missing, unreadable, corrupt or unsupported
 4    the two dates (or the data and the model) do not fit together
 5    a checkpoint is not usable (not cdmap, truncated, newer format, pickle payload)
 6    an output cannot be written (exists without --overwrite, not writable, disk full)
 7    --resume refused: the journal does not match this run
 8    another rank of a torchrun job failed or stopped answering (rerun with --resume)
130   interrupted by Ctrl-C (SIGINT)
143   terminated (SIGTERM)
====  ==========================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_INCOMPATIBLE = 4
EXIT_CHECKPOINT = 5
EXIT_OUTPUT = 6
EXIT_RESUME = 7
EXIT_RANK = 8
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class CdmapError(Exception):
    """Base class: ``str(err)`` is a single line naming the file and the problem."""

    exit_code: int = EXIT_INTERNAL

    def __init__(self, message: str, path: object | None = None) -> None:
        message = " ".join(str(message).split())  # always one line
        if path is not None:
            message = f"{path}: {message}"
        super().__init__(message)
        self.path = path


class UsageError(CdmapError):
    """An option value that makes no sense (overlap >= tile size, bands out of range...)."""

    exit_code = EXIT_USAGE


class InputError(CdmapError):
    """An input file is missing, unreadable, corrupt or of an unsupported kind."""

    exit_code = EXIT_INPUT


class IncompatibleInputsError(CdmapError):
    """Inputs that are each fine but do not fit together (CRS, overlap, band counts)."""

    exit_code = EXIT_INCOMPATIBLE


class CheckpointError(CdmapError):
    """A checkpoint file cannot be used."""

    exit_code = EXIT_CHECKPOINT


class OutputError(CdmapError):
    """An output cannot be written."""

    exit_code = EXIT_OUTPUT


class ResumeError(CdmapError):
    """``--resume`` was asked for but the journal does not match this run."""

    exit_code = EXIT_RESUME


class RankError(CdmapError):
    """Another process of a ``torchrun`` job died or stopped answering; finished work is kept for ``--resume``."""

    exit_code = EXIT_RANK


class Interrupted(CdmapError):
    """The run was stopped by a signal (SIGINT: exit 130, SIGTERM: 143); ``hint`` says what was kept."""

    def __init__(self, signum: int, hint: str | None = None) -> None:
        import signal

        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name}" + (f"; {hint}" if hint else ""))
        self.signum = signum
        self.exit_code = EXIT_SIGTERM if signum == signal.SIGTERM else EXIT_SIGINT

    def with_hint(self, hint: str) -> Interrupted:
        """The same interruption with ``hint`` (what was kept, how to continue) in its message."""
        return Interrupted(self.signum, hint)
