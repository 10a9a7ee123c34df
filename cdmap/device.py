"""Device and precision choices shared by predict, train and evaluate."""

from __future__ import annotations

from typing import Any

from cdmap.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(name: str | None = "auto"):
    """``auto`` -> cuda when available, else cpu; validates ``cpu`` and ``cuda[:N]``."""
    import torch

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device {name!r} is not a device (use auto, cpu or cuda[:N])") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda asked for, but torch sees no CUDA GPU (is a CUDA torch installed?)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    elif dev.type != "cpu":
        raise UsageError(f"--device {name!r} is not supported (use auto, cpu or cuda[:N])")
    return dev


def resolve_precision(precision: str | None, device) -> str:
    """The precision name to use: ``auto`` is bf16 on CUDA (when supported), fp32 elsewhere."""
    import torch

    precision = (precision or "auto").lower()
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return precision


def autocast_dtype(precision: str) -> Any:
    """The torch dtype for autocast, or None for plain fp32."""
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def cxx_compiler() -> str | None:
    """The C++ compiler torch.compile's inductor would use on CPU (``$CXX``, g++, c++ or clang++), if any."""
    import os
    import shutil

    for name in (os.environ.get("CXX") or "", "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None
