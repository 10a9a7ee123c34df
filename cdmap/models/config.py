"""Architecture configuration (plain data, stored in every checkpoint) and the one backbone registry.

:data:`BACKBONES` maps a backbone name to its :class:`BackboneSpec`: how to build it and, when a package ships
ImageNet weights for it, how to load them. Model validation, the trainer and the CLI help all read it. The
builders are ``module:function`` references resolved on use, so this module (and ``cdmap --help``) does not
import torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from importlib import import_module
from typing import Any


def _resolve(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(import_module(module), name)


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: ``builder(in_channels) -> nn.Module`` and an optional loader of packaged ImageNet weights
    (``loader(model) -> LoadReport``), both as ``module:function`` references."""

    summary: str
    builder: str
    imagenet_loader: str | None = None

    def build(self, in_channels: int) -> Any:
        """A randomly initialised feature extractor for ``in_channels`` bands."""
        return _resolve(self.builder)(in_channels)

    def load_imagenet(self, model: Any) -> Any | None:
        """Load the packaged ImageNet weights into ``model`` (its report), or None when there are none."""
        return None if self.imagenet_loader is None else _resolve(self.imagenet_loader)(model)


_B = "cdmap.models.backbones"
BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec("ResNet-18 (torchvision key names)", f"{_B}:resnet18"),
    "resnet34": BackboneSpec("ResNet-34 (torchvision key names)", f"{_B}:resnet34"),
    "resnet50": BackboneSpec("ResNet-50 (torchvision key names)", f"{_B}:resnet50"),
    "efficientnet_lite0": BackboneSpec("EfficientNet-Lite0 (packaged ImageNet weights)", f"{_B}:efficientnet_lite0",
                                       f"{_B}:load_efficientnet_lite0_imagenet"),
    "efficientnet_lite1": BackboneSpec("EfficientNet-Lite1 (packaged ImageNet weights)", f"{_B}:efficientnet_lite1",
                                       f"{_B}:load_efficientnet_lite1_imagenet"),
    "efficientnet_lite2": BackboneSpec("EfficientNet-Lite2 (packaged ImageNet weights)", f"{_B}:efficientnet_lite2",
                                       f"{_B}:load_efficientnet_lite2_imagenet"),
}
DEFAULT_BACKBONE = "resnet18"


def backbone_names() -> str:
    """The registered backbone names, for messages and help texts: ``"resnet18, resnet34, ..."``."""
    return ", ".join(BACKBONES)


@dataclass(frozen=True)
class ModelConfig:
    """What is needed to rebuild an FSG-Net, independent of its weights.

    ``attention`` selects the STSAM cross-attention kernel: ``"sdpa"`` (default, no N x N map in memory)
    or ``"explicit"`` (the reference's softmax(QK)V, kept for tests and benchmarks). Both give the same result.
    """

    backbone: str = DEFAULT_BACKBONE
    in_channels: int = 3
    num_classes: int = 2
    dropblock_size: int = 7
    dropblock_prob: float = 0.15
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {backbone_names()}")
        if self.in_channels < 1:
            raise ValueError("in_channels must be >= 1")
        if self.num_classes != 2:
            raise ValueError("FSG-Net here predicts 2 classes (no change / change)")
        if self.attention not in ("sdpa", "explicit"):
            raise ValueError("attention must be 'sdpa' or 'explicit'")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
