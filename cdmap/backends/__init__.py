"""Execution backends behind :class:`cdmap.inference.Predictor`: torch (the reference), ONNX Runtime, OpenVINO.

Torch is the only hard dependency. ``compile`` is torch itself through ``torch.compile`` (inductor, with
freezing): it needs a C++ compiler on CPU, costs 20-50 s of compiling per run and shape (less with inductor's
warm cache), and is checked against eager torch on its first batch; ``auto`` never picks it, since that cost
only pays off on large scenes. ``onnxruntime`` and ``openvino`` (extras ``cdmap[onnx]``,
``cdmap[openvino]``) run the network exported once to ONNX per checkpoint, tile shape and band count and
cached on disk (:mod:`cdmap.backends.export`). Any export or backend failure falls back to torch with one
log line. ``auto`` times every installed candidate (:func:`candidates`) that is fp32-equivalent against torch
on the first real batch (once per checkpoint, tile shape and thread count; cached with the export) and runs the
fastest, if it beats torch; otherwise torch.
"""

from __future__ import annotations

import importlib.util
from typing import Any

BACKENDS = ("auto", "torch", "compile", "onnxruntime", "openvino")
EXPORTED = ("onnxruntime", "openvino")  # run an exported ONNX graph (cdmap.backends.runner)

# Measured order on CPU at fp32-equivalent accuracy, fastest first (benchmarks/RESULTS.md section 5):
# ONNX Runtime and OpenVINO are both ~1.5x torch; ONNX Runtime was ahead at batch 1-4, tile 256.
CPU_FP32_ORDER = ("onnxruntime", "openvino")
# bf16 on a CPU with native bf16: only OpenVINO runs a bf16 graph (ONNX Runtime's CPU provider has no bf16
# kernels for these ops); torch autocast is the fallback.
CPU_BF16_ORDER = ("openvino",)


class BackendUnavailable(RuntimeError):
    """The backend cannot run this model here (not installed, unsupported precision, failed check)."""


def installed(name: str) -> bool:
    """Whether the backend's runtime can be imported (torch always can)."""
    if name == "torch":
        return True
    if name == "compile":  # inductor's CPU code generation needs a C++ compiler
        from cdmap.device import cxx_compiler

        return cxx_compiler() is not None
    module = {"onnxruntime": "onnxruntime", "openvino": "openvino"}.get(name)
    if module is None:
        return False
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available() -> list[str]:
    """The backend names usable here, torch first."""
    return [b for b in BACKENDS[1:] if installed(b)]


def cpu_has_native_bf16() -> bool:
    """x86 AVX512_BF16 or AMX-BF16 (what bf16 inference needs to be fast and what OpenVINO uses)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


def validate(name: str | None) -> str:
    from cdmap.errors import UsageError

    name = (name or "auto").lower()
    if name not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, not {name!r}")
    return name


def candidates(backend: str, device: Any, precision: str) -> list[str]:
    """The backends to try, in order, for ``backend`` (validated) on ``device`` at the resolved ``precision``.

    ``auto``: on CPU the installed ones of :data:`CPU_FP32_ORDER` for fp32 and of :data:`CPU_BF16_ORDER` for
    bf16 on a CPU with native bf16, then torch; torch alone elsewhere. The predictor runs the fastest one that is
    exact and measured faster than torch. An explicit name is returned as is (the caller falls back to torch if
    it cannot be used).
    """
    backend = validate(backend)
    if backend != "auto":
        return [backend]
    if getattr(device, "type", str(device)) != "cpu":
        return ["torch"]
    if precision == "fp32":
        order = CPU_FP32_ORDER
    elif precision == "bf16" and cpu_has_native_bf16():
        order = CPU_BF16_ORDER
    else:
        order = ()
    return [b for b in order if installed(b)] + ["torch"]


def choose(backend: str, device: Any, precision: str) -> str:
    """The first of :func:`candidates`."""
    return candidates(backend, device, precision)[0]
