"""CMID pretraining under torchrun: 2 CPU processes (gloo), the queue and the centre shared across ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.test_pretrain import _scenes

ARGS = ["--crop-size", "64", "--batch-size", "4", "--epochs", "1", "--samples-per-epoch", "16", "--queue-size", "64",
        "--proj-hidden", "32", "--proj-dim", "16", "--local-hidden", "32", "--local-bottleneck", "16",
        "--prototypes", "32", "--stats-windows", "8", "--workers", "0", "--device", "cpu", "--quiet"]


def test_two_process_gloo_run(tmp_path):
    data = _scenes(tmp_path / "data")
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cdmap", "pretrain", str(data), "-o", str(run), *ARGS]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng_per_rank"]) == 2 and state["epoch"] == 1
    steps = 16 // 2 // 4  # samples / ranks / batch
    # every step enqueues the keys of both views of both ranks: 2 ranks x 2 views x 4 images
    assert int(state["teacher"]["queue_ptr"]) == (steps * 16) % 64
    assert float(state["teacher"]["center"].abs().sum()) > 0
    assert (run / "backbone.pt").exists() and (run / "metrics.csv").read_text().count("\n") == 2
