"""Process plumbing: fd-2 capture, signal guard, blocked signals, the fault-injection hook."""

from __future__ import annotations

import os
import signal

import pytest

from cdmap import process
from cdmap.errors import Interrupted


def test_fd2_capture_holds_back_c_level_stderr():
    cap = process.Fd2Capture().start()
    os.write(2, b"from C\n")
    assert cap.stop(replay=False) == "from C\n"
    assert cap.stop(replay=False) == ""  # idempotent


def test_signal_guard_raises_interrupted_and_blocked_signals_wait():
    with pytest.raises(Interrupted), process.SignalGuard():
        with process.signals_blocked():
            os.kill(os.getpid(), signal.SIGTERM)  # held until the block ends
            reached = True
        raise AssertionError("not interrupted")  # pragma: no cover
    assert reached


def test_fault_point_is_a_no_op_without_the_variable(monkeypatch):
    monkeypatch.delenv(process.FAULT_ENV, raising=False)
    process.fault_point("strip")
    monkeypatch.setenv(process.FAULT_ENV, "other:1")
    process.fault_point("strip")
