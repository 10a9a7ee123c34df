"""Architecture configuration: plain data, stored in every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

BACKBONES = ("resnet18", "resnet34", "resnet50", "efficientnet_lite0")


@dataclass(frozen=True)
class ModelConfig:
    """What is needed to rebuild an FSG-Net, independent of its weights.

    ``attention`` selects the STSAM cross-attention kernel: ``"sdpa"`` (default, no N x N map in memory)
    or ``"explicit"`` (the reference's softmax(QK)V, kept for tests and benchmarks). Both give the same result.
    """

    backbone: str = "resnet18"
    in_channels: int = 3
    num_classes: int = 2
    dropblock_size: int = 7
    dropblock_prob: float = 0.15
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
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
