"""Reproducibility helpers of the trainer: the DropBlock schedule, RNG states and worker seeding."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def dropblock_schedule(epoch: int, p_max: float, start: int = 1, end: int = 30) -> float:
    """DropBlock probability for 0-based ``epoch``: 0 up to ``start``, linear to ``p_max`` at ``end``.

    With the defaults this is the reference ``LinearScheduler(0, 0.15, 30)`` stepped once per epoch.
    """
    if epoch <= start:
        return 0.0
    if epoch >= end:
        return float(p_max)
    return float(p_max) * (epoch - start) / (end - start)


def rng_state() -> dict[str, Any]:
    """Torch, CUDA, numpy and python RNG states as tensors and plain containers (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": int(py_state[0]), "state": [int(x) for x in py_state[1]],
                   "gauss_next": py_state[2]},
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu().to(torch.uint8))


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor detached and moved to the CPU (nested dicts, lists, tuples)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: seed numpy and python from torch's per-worker seed (itself seeded)."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)
