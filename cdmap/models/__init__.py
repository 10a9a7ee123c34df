"""FSG-Net model, its configuration, the backbone registry and backbone weight loading.

Names are imported lazily: ``cdmap.models.config`` (and so the CLI help, which lists the backbones) does not
import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "BACKBONES": "cdmap.models.config",
    "BackboneSpec": "cdmap.models.config",
    "ModelConfig": "cdmap.models.config",
    "backbone_names": "cdmap.models.config",
    "FSGNet": "cdmap.models.fsgnet",
    "build_model": "cdmap.models.fsgnet",
    "count_parameters": "cdmap.models.fsgnet",
    "LoadReport": "cdmap.models.backbones",
    "build_backbone": "cdmap.models.backbones",
    "load_backbone_weights": "cdmap.models.backbones",
    "load_efficientnet_lite0_imagenet": "cdmap.models.backbones",
    "load_efficientnet_lite_imagenet": "cdmap.models.backbones",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cdmap.models' has no attribute {name!r}")
