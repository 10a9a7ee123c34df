"""The CMID networks (spec section 3): the student (backbone with the additive stem mask token, MIM head, global
projector, local prototype head), its EMA teacher (backbone, projector, local head; no mask, no gradient), the
MoCo queue and the DINO centre.

The backbone is cdmap's own (torchvision key names), built whole: ResNet stem and ``layer1``-``layer4``
(stride 32), or EfficientNet-Lite0 blocks 0-15 (stride 32, 320 channels). The mask token is added after the stem:
the ResNet stem is stride 4 with 64 channels (spec 3.1); the EfficientNet-Lite0 stem is stride 2 with 32 channels.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdmap.models.backbones import EfficientNetLiteFeatures, ResNetFeatures
from cdmap.pretrain.config import MODEL_STRIDE, PretrainConfig


def build_full_backbone(name: str, in_channels: int) -> nn.Module:
    """The whole registered backbone (to stride 32): a ResNet with ``layer4``, every EfficientNet-Lite block."""
    from importlib import import_module

    from cdmap.models.config import BACKBONES

    module, _, function = BACKBONES[name].builder.partition(":")
    builder = getattr(import_module(module), function)
    if name.startswith("resnet"):
        return builder(in_channels, layer4=True)
    if name.startswith("efficientnet_lite"):
        return builder(in_channels, full=True)
    raise TypeError(f"CMID pretraining has no recipe for backbone {name!r}")


def stem_and_body(backbone: nn.Module) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor], int, int]:
    """``(stem, body, stem stride, stem channels)``: the mask token is added between the two."""
    if isinstance(backbone, ResNetFeatures):
        b = backbone

        def stem(x: Tensor) -> Tensor:
            return b.maxpool(b.relu(b.bn1(b.conv1(x))))

        def body(x: Tensor) -> Tensor:
            return b.layer4(b.layer3(b.layer2(b.layer1(x))))

        return stem, body, 4, b.conv1.out_channels
    if not isinstance(backbone, EfficientNetLiteFeatures):
        raise TypeError(f"no CMID encoder for {type(backbone).__name__}")
    e = backbone

    def lite_stem(x: Tensor) -> Tensor:
        return e.act(e._bn0(e._conv_stem(x)))

    def lite_body(x: Tensor) -> Tensor:
        for block in e._blocks:
            x = block(x)
        return x

    return lite_stem, lite_body, 2, e._conv_stem.out_channels


class Projector(nn.Module):
    """Global projector: Linear -> ReLU -> Linear, output L2-normalised (spec 3.4, no predictor)."""

    def __init__(self, c_in: int, hidden: int, out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))

    def forward(self, pooled: Tensor) -> Tensor:
        return F.normalize(self.net(pooled), dim=1)


class LocalHead(nn.Module):
    """Local prototype head on ``(B, C, M)`` tokens (spec 3.5): 1x1 conv MLP with BN1d and GELU to a normalised
    bottleneck, then cosines to K unit prototypes (row-normalised weights, no gain): logits ``(B, K, M)``."""

    def __init__(self, c_in: int, hidden: int, bottleneck: int, prototypes: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Conv1d(c_in, hidden, 1), nn.BatchNorm1d(hidden), nn.GELU(),
            nn.Conv1d(hidden, hidden, 1), nn.BatchNorm1d(hidden), nn.GELU(),
            nn.Conv1d(hidden, bottleneck, 1),
        )
        self.prototypes = nn.Parameter(torch.empty(prototypes, bottleneck))
        nn.init.normal_(self.prototypes, std=bottleneck**-0.5)

    def forward(self, tokens: Tensor) -> Tensor:
        z = F.normalize(self.mlp(tokens), dim=1)
        return torch.einsum("kd,bdm->bkm", F.normalize(self.prototypes, dim=1), z)


def gather_cells(fmap: Tensor, index: Tensor) -> Tensor:
    """``(B, C, H, W)`` map and ``(B, M)`` cell indices (row-major) -> tokens ``(B, C, M)``."""
    flat = fmap.flatten(2)
    return torch.gather(flat, 2, index[:, None, :].expand(-1, flat.shape[1], -1))


class Encoder(nn.Module):
    """A backbone run to stride 32, optionally with the additive mask token after the stem."""

    def __init__(self, backbone: nn.Module, with_token: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self._stem, self._body, self.stem_stride, stem_width = stem_and_body(backbone)
        self.mask_token = nn.Parameter(torch.zeros(1, stem_width, 1, 1)) if with_token else None

    def forward(self, x: Tensor, block_mask: Tensor | None = None) -> Tensor:
        s = self._stem(x)
        if block_mask is not None and self.mask_token is not None:
            up = MODEL_STRIDE // self.stem_stride
            m = block_mask.to(s.dtype).repeat_interleave(up, 1).repeat_interleave(up, 2)[:, None]
            s = s + self.mask_token.to(s.dtype) * m
        return self._body(s)


def out_channels(backbone: nn.Module) -> int:
    """Channels of the stride-32 map."""
    if isinstance(backbone, ResNetFeatures):
        last = backbone.layer4[-1]
        return int((last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels)
    return int(backbone._blocks[-1]._bn2.num_features)


class Student(nn.Module):
    """The trained half: one forward computes everything for both masked views (one DDP forward per step).

    Returns, for each view v in (a, b): ``recon_v`` (B, C, S, S), ``q_v`` (B, D) normalised global embeddings,
    ``local_v`` (B, K, M) logits of the kept cells, ``pooled_v`` (B, C) for the collapse indicator.
    """

    def __init__(self, backbone: nn.Module, cfg: PretrainConfig, bands: int) -> None:
        super().__init__()
        self.encoder = Encoder(backbone, with_token=True)
        c = out_channels(backbone)
        self.mim_head = nn.Sequential(nn.Conv2d(c, MODEL_STRIDE**2 * bands, 1), nn.PixelShuffle(MODEL_STRIDE))
        self.projector = Projector(c, cfg.proj_hidden, cfg.proj_dim)
        self.local_head = LocalHead(c, cfg.local_hidden, cfg.local_bottleneck, cfg.prototypes)

    def forward(self, masked_a: Tensor, masked_b: Tensor, mask_a: Tensor, mask_b: Tensor, keep_a: Tensor,
                keep_b: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for v, x, m, keep in (("a", masked_a, mask_a, keep_a), ("b", masked_b, mask_b, keep_b)):
            fmap = self.encoder(x, m)
            pooled = fmap.float().mean(dim=(2, 3)).to(fmap.dtype)
            out[f"recon_{v}"] = self.mim_head(fmap)
            out[f"q_{v}"] = self.projector(pooled)
            out[f"local_{v}"] = self.local_head(gather_cells(fmap, keep))
            out[f"pooled_{v}"] = pooled
        return out


class Teacher(nn.Module):
    """The EMA half: copies of the student's backbone, projector and local head, never trained by gradients.

    It runs in train mode (batch statistics, spec 3.2) on the clean views. Also holds the MoCo queue
    ``(D, Q)`` with its pointer and the DINO centre ``(1, K, 1)``.
    """

    def __init__(self, student: Student, cfg: PretrainConfig, generator: torch.Generator) -> None:
        super().__init__()
        self.encoder = Encoder(copy.deepcopy(student.encoder.backbone), with_token=False)
        self.projector = copy.deepcopy(student.projector)
        self.local_head = copy.deepcopy(student.local_head)
        for p in self.parameters():
            p.requires_grad_(False)
        queue = torch.randn(cfg.proj_dim, cfg.queue_size, generator=generator)
        self.register_buffer("queue", F.normalize(queue, dim=0))  # each column a unit vector (spec 5.3)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("center", torch.zeros(1, cfg.prototypes, 1))

    def pairs(self, student: Student) -> list[tuple[nn.Module, nn.Module]]:
        """(teacher part, student part) pairs the EMA averages: backbone (no mask token), projector, local head."""
        return [(self.encoder.backbone, student.encoder.backbone), (self.projector, student.projector),
                (self.local_head, student.local_head)]

    @torch.no_grad()
    def forward(self, a: Tensor, b: Tensor, pick_b: Tensor, pick_a: Tensor) -> dict[str, Tensor]:
        """``k_v`` (B, D) keys and ``local_v`` (B, K, M) logits at the matched cells ``pick_v`` of view v."""
        out: dict[str, Tensor] = {}
        for v, x, pick in (("a", a, pick_a), ("b", b, pick_b)):
            fmap = self.encoder(x)
            out[f"k_{v}"] = self.projector(fmap.float().mean(dim=(2, 3)).to(fmap.dtype))
            out[f"local_{v}"] = self.local_head(gather_cells(fmap, pick))
        return out

    @torch.no_grad()
    def ema_update(self, student: Student, momentum: float) -> None:
        """theta_t <- m theta_t + (1 - m) theta_s over parameters only (BN running statistics are not averaged)."""
        for t_part, s_part in self.pairs(student):
            t_params = list(t_part.parameters())
            s_params = [p.detach() for p in s_part.parameters()]
            torch._foreach_mul_(t_params, momentum)
            torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """FIFO: write ``keys`` (N, D) at the pointer, wrapping around."""
        n, q = keys.shape[0], self.queue.shape[1]
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % q
        self.queue[:, idx] = keys.detach().to(self.queue.dtype).T
        self.queue_ptr.copy_((self.queue_ptr + n) % q)
