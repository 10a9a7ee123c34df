"""ONNX Runtime (CPU execution provider) running the exported FSG-Net graph, fp32 only."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cdmap.backends import BackendUnavailable


class OnnxRuntimeRunner:
    """``run(a, b)`` -> P(change) ``(N, H, W)`` float32 for normalised float32 ``(N, bands, H, W)`` dates."""

    name = "onnxruntime"

    def __init__(self, onnx_path: Path, precision: str, threads: int) -> None:
        if precision != "fp32":
            raise BackendUnavailable(f"onnxruntime runs fp32 only here (asked for {precision})")
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, int(threads))
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle pool threads must not spin: predict's reader threads need those cores between batches.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        self.precision = precision
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])

    def run(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self.session.run(["prob"], {"a": a, "b": b})[0]
