"""Build an exported-graph runner for one input shape: export (cached), load the runtime, verify once."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cdmap.backends import BackendUnavailable

log = logging.getLogger("cdmap")

# fp32-equivalent: the largest P(change) difference to torch fp32 on the verification input.
EXACT_TOLERANCE = 1e-4
# bf16 is not exact; the check only catches a broken graph (accuracy is guarded in benchmarks/RESULTS.md).
BF16_TOLERANCE = 5e-2
SPEED_REPEATS = 3  # interleaved timed calls per side when a backend's speed against torch is measured


class Runner(Protocol):
    name: str
    precision: str

    def run(self, a: np.ndarray, b: np.ndarray) -> np.ndarray: ...


@dataclass
class BuiltRunner:
    runner: Runner
    setup_s: float
    cache_hit: bool
    max_prob_diff: float
    onnx_path: Path
    speedup: float | None = None  # torch time / this backend's time on the first batch, at this thread count


def _verification_input(bands: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(12345)
    a = rng.standard_normal((1, bands, height, width), dtype=np.float32)
    b = (a + 0.5 * rng.standard_normal(a.shape, dtype=np.float32)).astype(np.float32)
    return a, b


def _torch_reference(model: Any, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    import torch

    was_training = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        with torch.inference_mode():
            logits = model(torch.from_numpy(a).to(dev), torch.from_numpy(b).to(dev))
        return torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy()
    finally:
        model.train(was_training)


def measure_speedup(runner: Runner, torch_forward: Callable[[np.ndarray, np.ndarray], Any], a: np.ndarray,
                    b: np.ndarray, repeats: int = SPEED_REPEATS) -> float:
    """Best torch time over best ``runner`` time on ``(a, b)``, calls interleaved (both warmed up first)."""
    runner.run(a, b)
    torch_forward(a, b)
    best_r = best_t = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        runner.run(a, b)
        best_r = min(best_r, time.perf_counter() - t)
        t = time.perf_counter()
        torch_forward(a, b)
        best_t = min(best_t, time.perf_counter() - t)
    return best_t / best_r


def cached_speedup(name: str, model_hash: str, shape: tuple[int, ...], precision: str, threads: int,
                   cache: Path | None = None) -> float | None:
    """The speed against torch recorded for ``name``/``precision`` on this graph (``shape`` = bands, H, W) and
    thread count, or None when it was never measured or the backend failed its check."""
    from cdmap.backends.export import cache_dir, cache_key, read_meta

    key = cache_key(model_hash, *shape)
    seen = read_meta((cache or cache_dir()) / "models" / f"{key}.json").get("verified", {}).get(f"{name}/{precision}")
    if not seen or not seen.get("ok"):
        return None
    value = (seen.get("speedup") or {}).get(str(threads))
    return float(value) if value is not None else None


def build_runner(name: str, model: Any, model_hash: str, bands: int, height: int, width: int, precision: str,
                 threads: int, cache: Path | None = None,
                 torch_forward: Callable[[np.ndarray, np.ndarray], Any] | None = None,
                 sample: tuple[np.ndarray, np.ndarray] | None = None) -> BuiltRunner:
    """Export (or reuse) the graph for this shape and start ``name`` on it; raises on any failure.

    The first time a (graph, backend, precision) is used it is checked against the torch fp32 model on one
    seeded input; the result is stored in the cache metadata so later runs skip the check (and a graph that
    failed it is refused at once). With ``torch_forward`` (the torch path it would replace) its speed against
    torch is measured too, on ``sample`` (the first real batch; else the check input), once per thread count,
    and kept with the check (:attr:`BuiltRunner.speedup`).
    """
    from cdmap.backends import installed
    from cdmap.backends.export import cache_dir, export_onnx, record_verification

    if not installed(name):
        raise BackendUnavailable(f"{name} is not installed (pip install 'cdmap[{_extra(name)}]')")
    cache = cache or cache_dir()
    t0 = time.perf_counter()
    onnx_path, meta, hit = export_onnx(model, model_hash, bands, height, width, root=cache)
    if name == "onnxruntime":
        from cdmap.backends.onnx import OnnxRuntimeRunner

        runner: Runner = OnnxRuntimeRunner(onnx_path, precision, threads)
    elif name == "openvino":
        from cdmap.backends.openvino import OpenVinoRunner

        runner = OpenVinoRunner(onnx_path, precision, threads, cache)
    else:
        raise BackendUnavailable(f"unknown backend {name!r}")
    tag = f"{name}/{precision}"
    tolerance = EXACT_TOLERANCE if precision == "fp32" else BF16_TOLERANCE
    seen = meta.get("verified", {}).get(tag)
    if seen is None:
        a, b = _verification_input(bands, height, width)
        got = runner.run(a, b)
        ref = _torch_reference(model, a, b)
        diff = float(np.abs(got - ref).max()) if got.shape == ref.shape else float("inf")
        if not np.isfinite(diff):
            diff = float("inf")
        seen = {"max_prob_diff": diff, "ok": diff <= tolerance, "tolerance": tolerance}
        try:
            record_verification(meta, tag, seen)
        except OSError as exc:  # a read-only cache still runs, it just checks again next time
            log.debug("could not record the %s check in the cache: %s", tag, exc)
    if not seen.get("ok"):
        raise BackendUnavailable(
            f"{tag} differs from torch fp32 by {seen.get('max_prob_diff')} in P(change) (tolerance {tolerance})")
    speedup = (seen.get("speedup") or {}).get(str(threads))
    if torch_forward is not None and speedup is None:
        speedup = measure_speedup(runner, torch_forward, *(sample or _verification_input(bands, height, width)))
        seen = {**seen, "speedup": {**(seen.get("speedup") or {}), str(threads): round(speedup, 3)}}
        try:
            record_verification(meta, tag, seen)
        except OSError as exc:
            log.debug("could not record the %s speed in the cache: %s", tag, exc)
    return BuiltRunner(runner, time.perf_counter() - t0, hit, float(seen["max_prob_diff"]), onnx_path, speedup)


def _extra(name: str) -> str:
    return {"onnxruntime": "onnx", "openvino": "openvino"}.get(name, name)
