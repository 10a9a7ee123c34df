"""Export FSG-Net to ONNX once per (checkpoint, bands, tile shape) and cache it on disk.

Cache: ``$CDMAP_CACHE_DIR`` or ``~/.cache/cdmap``, files ``models/<key>.onnx`` and ``models/<key>.json``
(metadata: what was exported, how long it took, and each backend/precision's verification against torch).
The key hashes the checkpoint's SHA-256 (``Checkpoint.sha256`` when it exists, else the state_dict tensors),
the band count, the tile height and width, the export format version and the torch version. Every file is
written to a temporary name in the same folder and renamed into place, so a reader never sees half a file
and two processes exporting at once both end up with a complete one.

The exported graph takes the two normalised dates ``a``, ``b`` ``(N, bands, H, W)`` float32 (N dynamic) and
returns ``prob`` ``(N, H, W)``: P(change), the softmax included. STSAM runs its ``chunked`` exact attention
in the graph (no zero-padded Q/K, no N x N map), which exports as plain MatMul/Softmax.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger("cdmap")

EXPORT_VERSION = 1
OPSET = 18


def cache_dir() -> Path:
    """``$CDMAP_CACHE_DIR`` or ``~/.cache/cdmap``."""
    env = os.environ.get("CDMAP_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cdmap"


def state_dict_sha256(state_dict: dict[str, Any]) -> str:
    """SHA-256 over the state_dict's names, dtypes, shapes and bytes (sorted by name)."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            h.update(f"{name}={t!r};".encode())
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_sha256(model: Any, ckpt: Any = None) -> str:
    """The checkpoint's hash when it carries one, else the hash of the model's weights and config."""
    digest = getattr(ckpt, "sha256", None) if ckpt is not None else None
    if not digest:
        digest = state_dict_sha256(ckpt.state_dict if ckpt is not None else model.state_dict())
    config = getattr(model, "config", None)
    extra = json.dumps(config.to_dict(), sort_keys=True) if hasattr(config, "to_dict") else ""
    return hashlib.sha256(f"{digest}|{extra}".encode()).hexdigest()


def cache_key(model_hash: str, bands: int, height: int, width: int) -> str:
    import torch

    text = (f"{model_hash}|bands={bands}|{height}x{width}|export={EXPORT_VERSION}|opset={OPSET}"
            f"|torch={torch.__version__}")
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    _atomic_write_bytes(path, json.dumps(meta, indent=2, sort_keys=True).encode())


class _ProbabilityGraph:
    """What is exported: the network with STSAM in chunked mode, softmax and channel 1 (built lazily: torch)."""

    @staticmethod
    def build(model: Any):
        import torch

        from cdmap.backends.torch_backend import set_attention

        net = copy.deepcopy(model).float().cpu().eval()
        set_attention(net, "chunked")

        class Graph(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = net

            def forward(self, a, b):
                return torch.softmax(self.net(a, b), dim=1)[:, 1]

        return Graph().eval()


def export_onnx(model: Any, model_hash: str, bands: int, height: int, width: int,
                root: Path | None = None) -> tuple[Path, dict[str, Any], bool]:
    """The cached ONNX file for this model and input shape, exporting it first if needed.

    Returns ``(onnx_path, meta, cache_hit)``; ``meta`` is the sidecar JSON's content (``meta_path`` in it).
    """
    import io

    import torch

    root = (root or cache_dir()) / "models"
    key = cache_key(model_hash, bands, height, width)
    onnx_path, meta_path = root / f"{key}.onnx", root / f"{key}.json"
    meta = read_meta(meta_path)
    if onnx_path.is_file() and meta.get("key") == key:
        meta["meta_path"] = str(meta_path)
        return onnx_path, meta, True
    graph = _ProbabilityGraph.build(model)
    a = torch.zeros(1, bands, height, width)
    t0 = time.perf_counter()
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph, (a, a.clone()), buf, input_names=["a", "b"], output_names=["prob"], opset_version=OPSET,
            dynamic_axes={"a": {0: "batch"}, "b": {0: "batch"}, "prob": {0: "batch"}}, dynamo=False,
        )
    export_s = time.perf_counter() - t0
    _atomic_write_bytes(onnx_path, buf.getvalue())
    meta = {"key": key, "model_sha256": model_hash, "bands": bands, "height": height, "width": width,
            "export_version": EXPORT_VERSION, "opset": OPSET, "torch": torch.__version__,
            "export_s": round(export_s, 3), "verified": {}}
    write_meta(meta_path, meta)
    log.debug("exported FSG-Net to %s in %.1f s", onnx_path, export_s)
    meta["meta_path"] = str(meta_path)
    return onnx_path, meta, False


def record_verification(meta: dict[str, Any], name: str, result: dict[str, Any]) -> None:
    """Store a backend/precision's check against torch in the sidecar JSON (re-read, merged, atomic)."""
    path = Path(meta["meta_path"])
    current = read_meta(path) or {k: v for k, v in meta.items() if k != "meta_path"}
    current.setdefault("verified", {})[name] = result
    meta.setdefault("verified", {})[name] = result
    write_meta(path, current)
