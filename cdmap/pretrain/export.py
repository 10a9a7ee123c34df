"""Files of a pretraining run: ``backbone.pt`` (what fine-tuning loads), the resumable ``last.pt`` and starting
weights (``--init``). Plain data only, read with ``torch.load(weights_only=True)``.

``backbone.pt``::

    format            "cdmap-backbone"
    format_version    1
    backbone          registered name, e.g. "resnet18"
    in_channels       band count
    state_dict        the student backbone, torchvision key names (ResNet: conv1 ... layer4, no fc)
    normalization     {"mean": [...], "std": [...]}: the per-band statistics it was trained with
    provenance        {"method": "CMID", "epoch", "epochs", "images", "cdmap_version", "torch_version", "created"}

:func:`cdmap.models.load_backbone_weights` reads it directly (``state_dict`` is unwrapped): ``cdmap train
--backbone-weights RUN/backbone.pt`` then reports ``layer4.*`` as unused (FSG-Net uses stages 1-3).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cdmap._version import __version__
from cdmap.errors import CheckpointError, OutputError, UsageError

log = logging.getLogger("cdmap")

BACKBONE_FORMAT = "cdmap-backbone"
STATE_FORMAT = "cdmap-pretrain-state"
FORMAT_VERSION = 1


def write_payload(payload: dict[str, Any], path: Path) -> Path:
    """``torch.save`` to a temporary sibling, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write: {exc.strerror or exc}", path) from exc
    return path


def read_payload(path: Path, fmt: str) -> dict[str, Any]:
    """A file written by :func:`write_payload` with format marker ``fmt``, or a one-line :class:`CheckpointError`."""
    if not path.is_file():
        raise CheckpointError("not found", path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickled objects, truncated archives, other files
        raise CheckpointError(f"cannot load ({type(exc).__name__}); not a {fmt} file or damaged", path) from exc
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise CheckpointError(f"not a {fmt} file (no format marker)", path)
    if int(payload.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"written by a newer cdmap ({fmt} version {payload['format_version']})", path)
    return payload


def backbone_payload(backbone: nn.Module, name: str, mean: list[float], std: list[float],
                     provenance: dict[str, Any]) -> dict[str, Any]:
    prov = {"method": "CMID", "cdmap_version": __version__, "torch_version": torch.__version__.split("+")[0],
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **provenance}
    return {
        "format": BACKBONE_FORMAT,
        "format_version": FORMAT_VERSION,
        "backbone": name,
        "in_channels": len(mean),
        "state_dict": {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()},
        "normalization": {"mean": [float(m) for m in mean], "std": [float(s) for s in std]},
        "provenance": prov,
    }


def load_pretrained(path: str | os.PathLike) -> dict[str, Any]:
    """A ``backbone.pt`` (or the ``backbone.pt`` of a run folder): its payload."""
    p = Path(path)
    return read_payload(p / "backbone.pt" if p.is_dir() else p, BACKBONE_FORMAT)


def init_weights(backbone: nn.Module, name: str, init: str) -> str:
    """Load starting weights into the full backbone: ``imagenet`` (packaged), a weights file or a pretraining run
    folder (its ``backbone.pt``); returns the report text.

    A file of another architecture (a ``backbone.pt`` naming another backbone, tensors of other shapes, or
    fewer than half of the backbone's tensors) is refused with a :class:`CheckpointError`.
    """
    from cdmap.models import load_backbone_weights
    from cdmap.models.config import BACKBONES

    if init == "imagenet":
        report = BACKBONES[name].load_imagenet(backbone)
        if report is None:
            having = ", ".join(n for n, b in BACKBONES.items() if b.imagenet_loader) or "none"
            raise UsageError(f"--init imagenet: no packaged ImageNet weights for {name} (available: {having}); "
                             "use --init FILE")
        return str(report)
    path = Path(init)
    if path.is_dir():  # a pretraining run folder: continue from its backbone
        path = path / "backbone.pt"
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
    except Exception:  # noqa: BLE001 - load_backbone_weights reports unreadable files with their reason
        meta = None
    if isinstance(meta, dict) and meta.get("format") == BACKBONE_FORMAT and meta.get("backbone") != name:
        raise CheckpointError(f"weights are for {meta.get('backbone')}, not {name} (wrong architecture)", path)
    report = load_backbone_weights(backbone, path)
    own = [k for k in backbone.state_dict() if not k.endswith("num_batches_tracked")]
    if report.shape_mismatched or len(report.loaded) < len(own) / 2:
        key, got, want = (report.shape_mismatched or [("-", (), ())])[0]
        raise CheckpointError(
            f"weights do not fit {name} (wrong architecture?): {len(report.loaded)}/{len(own)} tensors usable, "
            f"{len(report.shape_mismatched)} of another shape (e.g. {key}: file {list(got)} vs {list(want)})", path)
    return str(report)
