"""OpenVINO (CPU plugin) running the exported FSG-Net graph in f32 or bf16 (on CPUs with native bf16)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}


class OpenVinoRunner:
    """``run(a, b)`` -> P(change) ``(N, H, W)`` float32 for normalised float32 ``(N, bands, H, W)`` dates.

    The compiled model is cached by OpenVINO itself under ``<cache>/openvino`` (its key covers the graph
    and the compile settings, so f32 and bf16 compile once each).
    """

    name = "openvino"

    def __init__(self, onnx_path: Path, precision: str, threads: int, cache: Path | None = None) -> None:
        from cdmap.backends import BackendUnavailable

        if precision not in OV_PRECISION:
            raise BackendUnavailable(f"openvino runs fp32 or bf16, not {precision}")
        import openvino as ov

        core = ov.Core()
        if cache is not None:
            (cache / "openvino").mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(cache / "openvino")})
        config = {
            # Explicit: on CPUs with bf16/AMX OpenVINO's own default is bf16, which is not fp32-equivalent.
            "INFERENCE_PRECISION_HINT": OV_PRECISION[precision],
            "INFERENCE_NUM_THREADS": max(1, int(threads)),
            "PERFORMANCE_HINT": "LATENCY",
        }
        self.precision = precision
        self.compiled = core.compile_model(str(onnx_path), "CPU", config)
        self._request = self.compiled.create_infer_request()
        self._output = self.compiled.output(0)

    def run(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        result = self._request.infer({0: a, 1: b})
        return np.array(result[self._output], dtype=np.float32, copy=True)
