"""FSG-Net (Xie et al., arXiv:2509.06482): siamese backbone, per-scale DAWIM + STSAM, |A - B|, LGFU decoder."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdmap.models.backbones import build_backbone
from cdmap.models.blocks import DAWIM, LGFU, STSAM, DropBlock, FCNHead, conv_bn_relu
from cdmap.models.config import ModelConfig

WIDTHS = (64, 128, 256)  # neck/decoder widths at stride 4/8/16, whatever the backbone
PAD_MULTIPLE = 32  # stride-16 features must still be even for the Haar DWT


class FSGNet(nn.Module):
    """Change-detection network: ``forward(a, b)`` -> 2-class logits ``(B, 2, H, W)`` (float32).

    ``a`` and ``b`` are ``(B, in_channels, H, W)`` of identical shape, any H and W: they are padded
    (reflect, or replicate when too small to reflect) on the bottom/right to a multiple of 32, and the
    logits are cropped back; nothing is resized. Backbone parameters live under ``backbone.`` (the
    trainer gives them a lower learning rate); the channel adapters of ResNet-50/EfficientNet do not.
    """

    def __init__(self, config: ModelConfig | None = None, **overrides: object) -> None:
        super().__init__()
        config = config or ModelConfig()
        if overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.backbone = build_backbone(config.backbone, config.in_channels)
        if tuple(self.backbone.out_channels) != WIDTHS:
            # The reference's ChannelChecker: 1x1 Conv+BN+ReLU to the fixed 64/128/256 widths.
            self.channel_adapter: nn.ModuleList | None = nn.ModuleList(
                conv_bn_relu(c_in, c_out, 1) for c_in, c_out in zip(self.backbone.out_channels, WIDTHS, strict=True)
            )
        else:
            self.channel_adapter = None
        self.dropblock = DropBlock(config.dropblock_size, config.dropblock_prob)
        self.dawim = nn.ModuleList(DAWIM(c) for c in WIDTHS)
        self.stsam = nn.ModuleList(STSAM(c, config.attention) for c in WIDTHS)
        self.decoder3 = LGFU(WIDTHS[2], WIDTHS[1])
        self.decoder2 = LGFU(WIDTHS[1], WIDTHS[0])
        self.head = FCNHead(WIDTHS[0], config.num_classes)

    def set_dropblock_prob(self, p: float) -> None:
        """Set the DropBlock drop probability (0 disables it); called by the training schedule."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropblock probability must be in [0, 1), got {p}")
        self.dropblock.drop_prob = float(p)

    def set_attention(self, mode: str) -> None:
        """Switch every STSAM between ``"sdpa"`` and ``"explicit"`` (same weights, same results)."""
        for block in self.stsam:
            block.attention = mode
        self.config = dataclasses.replace(self.config, attention=mode)

    def _features(self, x: Tensor) -> list[Tensor]:
        feats = self.backbone(x)
        if self.channel_adapter is not None:
            feats = [adapt(f) for adapt, f in zip(self.channel_adapter, feats, strict=True)]
        return feats

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if a.shape != b.shape:
            raise ValueError(f"the two dates must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
        if a.ndim != 4 or a.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected inputs of shape (B, {self.config.in_channels}, H, W), got {tuple(a.shape)}"
            )
        height, width = a.shape[-2], a.shape[-1]
        a, b = _pad_to_multiple(a, PAD_MULTIPLE), _pad_to_multiple(b, PAD_MULTIPLE)
        if self.training:
            # Separate calls: in training BatchNorm normalises each date with its own batch statistics,
            # as in the reference.
            feats_a, feats_b = self._features(a), self._features(b)
        else:
            # Eval BatchNorm uses running statistics, so one call on both dates is exactly the same.
            both = self._features(torch.cat((a, b), dim=0))
            feats_a = [f[: a.shape[0]] for f in both]
            feats_b = [f[a.shape[0] :] for f in both]
        diffs = []
        for i in range(len(WIDTHS)):
            fa, fb = self.dropblock(feats_a[i], feats_b[i])
            fa, fb = self.dawim[i](fa, fb)
            fa, fb = self.stsam[i](fa, fb)
            diffs.append((fa - fb).abs())
        x = self.decoder3(diffs[2], diffs[1])
        x = self.decoder2(x, diffs[0])
        logits = self.head(x)
        logits = F.interpolate(logits, size=a.shape[-2:], mode="bilinear", align_corners=True)
        return logits[:, :, :height, :width].float()


def _pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Pad bottom/right to a multiple of ``multiple``: reflect when possible, else replicate."""
    h, w = x.shape[-2], x.shape[-1]
    pad_h, pad_w = -h % multiple, -w % multiple
    if not pad_h and not pad_w:
        return x
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def build_model(config: ModelConfig | None = None, **overrides: object) -> FSGNet:
    """Build an FSG-Net (randomly initialised) from a :class:`ModelConfig`."""
    return FSGNet(config, **overrides)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``module``."""
    return sum(p.numel() for p in module.parameters())
