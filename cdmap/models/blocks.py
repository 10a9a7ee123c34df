"""FSG-Net building blocks: DropBlock (shared mask), DAWIM, STSAM, LGFU and the FCN head.

Shapes and parameter counts follow the re-implementation notes (``shared/design/fsgnet.md`` §4-§8).
Every block that sees the two dates takes ``(f1, f2)`` and returns a pair of the same shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdmap.models.wavelets import haar_dwt, haar_idwt

ATTENTION_MODES = ("sdpa", "chunked", "explicit")
ATTENTION_CHUNK = 256  # query rows per softmax(QK)V block in "chunked" mode (a few MiB of scores per block)


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 1) -> nn.Sequential:
    """Conv (no bias, 'same' padding for odd kernels) + BatchNorm + ReLU (the reference's Conv1Relu/Conv3Relu)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al. 2018) applied to the two dates with ONE shared mask.

    Deliberate fix of the reference, which draws independent masks for A and B: different masks blank out
    different regions in the two dates, which the |A - B| difference then sees as fake change.

    One Bernoulli(gamma = p / block_size^2) seed mask per sample, shared across channels, dilated to
    ``block_size`` squares by a stride-1 max-pool, inverted, and the kept features rescaled by
    ``numel / sum(mask)``. Identity in eval mode or when ``drop_prob == 0``. ``drop_prob`` may be set at any
    time (the training schedule ramps it).
    """

    def __init__(self, block_size: int = 7, drop_prob: float = 0.0) -> None:
        super().__init__()
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.block_size = int(block_size)
        self.drop_prob = float(drop_prob)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, drop_prob={self.drop_prob}"

    def block_mask(self, x: Tensor) -> Tensor:
        """Keep-mask of shape (B, 1, H, W), float32, 1 = keep, already rescaled."""
        n, _, h, w = x.shape
        gamma = self.drop_prob / self.block_size**2
        seeds = (torch.rand(n, 1, h, w, device=x.device) < gamma).float()
        k = self.block_size
        dropped = F.max_pool2d(seeds, kernel_size=k, stride=1, padding=k // 2)
        if k % 2 == 0:
            dropped = dropped[:, :, :h, :w]
        keep = 1.0 - dropped
        return keep * (keep.numel() / keep.sum().clamp_min(1.0))

    def forward(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        if not self.training or self.drop_prob <= 0.0:
            return a, b
        if a.shape != b.shape:
            raise ValueError(f"DropBlock needs same-shaped dates, got {tuple(a.shape)} and {tuple(b.shape)}")
        mask = self.block_mask(a).to(a.dtype)
        return a * mask, b * mask


def _temporal_conv(conv: nn.Conv3d, x1: Tensor, x2: Tensor) -> Tensor:
    """Apply a depth-2 ``Conv3d`` to the two dates stacked on depth, as one 2-D convolution.

    Conv3d(C, C, (2, k, k)) over ``stack([x1, x2], dim=2)`` equals Conv2d(2C, C, k) over ``cat([x1, x2], 1)``
    with the depth axis folded into the input channels; the 2-D kernels are much faster on CPU.
    The parameter stays a Conv3d so the layout (and the count) matches the reference.
    """
    w = conv.weight  # (C_out, C_in, 2, kh, kw)
    c_out, c_in, depth, kh, kw = w.shape
    w2d = w.transpose(1, 2).reshape(c_out, depth * c_in, kh, kw)
    return F.conv2d(torch.cat((x1, x2), dim=1), w2d, padding=(conv.padding[1], conv.padding[2]))


class BandWeights(nn.Module):
    """SE-style channel weights from avg- and max-pooled statistics: (B, C, h, w) -> (B, C, 1, 1) in (0, 1)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(
            nn.Linear(2 * channels, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat((x.mean(dim=(2, 3)), x.amax(dim=(2, 3))), dim=1)
        return self.fc(pooled)[:, :, None, None]


class DAWIM(nn.Module):
    """Discrepancy-Aware Wavelet Interaction Module (spec §5).

    Haar-decomposes both dates, builds one cross-temporal interaction map per subband (LL: joint 3x3 conv
    over both dates; LH and HL: one shared per-pixel temporal mix; HH: |HH1 - HH2| -> 1x1 conv+BN+ReLU),
    turns each into channel weights w, scales that subband of BOTH dates by (1 + w) and inverts the DWT.
    Needs even H and W.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        c = channels
        self.ll_conv = nn.Conv3d(c, c, kernel_size=(2, 3, 3), padding=(0, 1, 1), bias=False)
        self.lh_hl_conv = nn.Conv3d(c, c, kernel_size=(2, 1, 1), bias=False)
        self.hh_conv = conv_bn_relu(c, c, 1)
        self.band_weights = nn.ModuleList(BandWeights(c) for _ in range(4))  # LL, LH, HL, HH

    def forward(self, f1: Tensor, f2: Tensor) -> tuple[Tensor, Tensor]:
        bands1 = haar_dwt(f1)
        bands2 = haar_dwt(f2)
        interactions = (
            _temporal_conv(self.ll_conv, bands1[0], bands2[0]),
            _temporal_conv(self.lh_hl_conv, bands1[1], bands2[1]),
            _temporal_conv(self.lh_hl_conv, bands1[2], bands2[2]),
            self.hh_conv((bands1[3] - bands2[3]).abs()),
        )
        gains = [1.0 + weigh(i) for weigh, i in zip(self.band_weights, interactions, strict=True)]
        out1 = haar_idwt(*(s * g for s, g in zip(bands1, gains, strict=True)))
        out2 = haar_idwt(*(s * g for s, g in zip(bands2, gains, strict=True)))
        return out1, out2


class CrossTemporalAttention(nn.Module):
    """STSAM branch 1: cross-date attention with learned temporal embeddings and a zero-initialised gate.

    out1[:, :, i] = sum_j softmax_j(Q2[i] . K1[j]) V1[:, :, j] (and symmetrically for date 2), with NO
    1/sqrt(d) scaling, as in the reference; result ``gamma * out_t + F_t``.

    ``attention="sdpa"`` uses ``scaled_dot_product_attention(scale=1.0)``, so no N x N map is stored.
    The fused CPU/CUDA kernels need equal head sizes for Q, K and V, but here Q/K have C/8 channels and V has C,
    so Q and K are zero-padded to C channels: the dot products are unchanged and the fused kernel applies
    (otherwise PyTorch silently falls back to the math path, which does materialise N x N).
    ``attention="chunked"`` computes the same softmax(QK)V exactly, without padding, in blocks of
    ``ATTENTION_CHUNK`` query positions: Q.K runs at its true C/8 width (the padded fused kernel spends about
    44 % of its work on zeros) and only a (block x N) score matrix exists at a time. It is also the form that
    exports to ONNX as plain MatMul/Softmax.
    ``attention="explicit"`` computes softmax(QK)V with two bmm's like the reference (tests, benchmarks).
    """

    def __init__(self, channels: int, attention: str = "sdpa") -> None:
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        c, d = channels, max(1, channels // 8)
        self.attention = attention
        self.embed1 = nn.Parameter(torch.randn(1, c, 1, 1))
        self.embed2 = nn.Parameter(torch.randn(1, c, 1, 1))
        self.query = nn.Conv2d(c, d, 1)
        self.key = nn.Conv2d(c, d, 1)
        self.value = nn.Conv2d(c, c, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, f1: Tensor, f2: Tensor) -> tuple[Tensor, Tensor]:
        n, c, h, w = f1.shape
        # The 1x1 convs are shared and have no normalisation: running both dates as one batch is exact.
        x = torch.cat((f1 + self.embed1, f2 + self.embed2), dim=0)
        q1, q2 = self.query(x).flatten(2).chunk(2, dim=0)  # (B, d, N)
        k1, k2 = self.key(x).flatten(2).chunk(2, dim=0)
        v1, v2 = self.value(x).flatten(2).chunk(2, dim=0)  # (B, C, N)
        if self.attention == "sdpa":
            out1, out2 = self._sdpa(q1, q2, k1, k2, v1, v2)
        elif self.attention == "chunked":
            out1, out2 = self._chunked(q1, q2, k1, k2, v1, v2)
        else:
            out1 = self._explicit(q2, k1, v1)
            out2 = self._explicit(q1, k2, v2)
        return (
            self.gamma * out1.reshape(n, c, h, w) + f1,
            self.gamma * out2.reshape(n, c, h, w) + f2,
        )

    @staticmethod
    def _explicit(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        energy = torch.bmm(q.transpose(1, 2), k)  # (B, N, N): query position i, key position j
        attn = torch.softmax(energy, dim=-1)
        return torch.bmm(v, attn.transpose(1, 2))  # (B, C, N)

    @staticmethod
    def _chunked(q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor, v1: Tensor, v2: Tensor,
                 chunk: int | None = None) -> tuple[Tensor, Tensor]:
        n = q1.shape[0]
        chunk = chunk or ATTENTION_CHUNK
        # Both directions as one batch of 2B: queries of date 2 attend to date 1 and vice versa.
        q = torch.cat((q2, q1), dim=0).transpose(1, 2)  # (2B, N, d)
        k = torch.cat((k1, k2), dim=0)  # (2B, d, N)
        vt = torch.cat((v1, v2), dim=0).transpose(1, 2)  # (2B, N, C)
        length = q.shape[1]
        blocks = []
        for start in range(0, length, chunk):
            energy = torch.bmm(q[:, start : start + chunk], k)  # (2B, chunk, N)
            blocks.append(torch.bmm(torch.softmax(energy, dim=-1), vt))  # (2B, chunk, C)
        out = (blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)).transpose(1, 2)  # (2B, C, N)
        return out[:n], out[n:]

    @staticmethod
    def _sdpa(q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor, v1: Tensor, v2: Tensor) -> tuple[Tensor, Tensor]:
        c = v1.shape[1]
        pad = c - q1.shape[1]
        # Both directions as two "heads" of one call: (B, 2, N, head_dim).
        q = F.pad(torch.stack((q2, q1), dim=1).transpose(-1, -2), (0, pad))
        k = F.pad(torch.stack((k1, k2), dim=1).transpose(-1, -2), (0, pad))
        v = torch.stack((v1, v2), dim=1).transpose(-1, -2).contiguous()
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # (B, 2, N, C)
        out = out.transpose(-1, -2)  # (B, 2, C, N)
        return out[:, 0], out[:, 1]


class CoordinateAttention(nn.Module):
    """STSAM branch 2: coordinate attention (Hou et al. 2021) with ReLU in the shared squeeze."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        mid = max(8, channels // 32)
        self.squeeze = nn.Sequential(nn.Conv2d(channels, mid, 1), nn.BatchNorm2d(mid), nn.ReLU(inplace=True))
        self.attn_h = nn.Conv2d(mid, channels, 1)
        self.attn_w = nn.Conv2d(mid, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2], x.shape[-1]
        pooled_h = x.mean(dim=3, keepdim=True)  # (B, C, H, 1)
        pooled_w = x.mean(dim=2, keepdim=True).transpose(2, 3)  # (B, C, W, 1)
        y = self.squeeze(torch.cat((pooled_h, pooled_w), dim=2))
        y_h, y_w = torch.split(y, [h, w], dim=2)
        a_h = torch.sigmoid(self.attn_h(y_h))  # (B, C, H, 1)
        a_w = torch.sigmoid(self.attn_w(y_w.transpose(2, 3)))  # (B, C, 1, W)
        return x * a_h * a_w


class STSAM(nn.Module):
    """Synergistic Temporal-Spatial Attention Module (spec §6): cross-date attention and coordinate
    attention in parallel, fused per date by one shared 1x1 Conv+BN+ReLU over their concatenation."""

    def __init__(self, channels: int, attention: str = "sdpa") -> None:
        super().__init__()
        self.cross = CrossTemporalAttention(channels, attention)
        self.coord = CoordinateAttention(channels)
        self.fuse = conv_bn_relu(2 * channels, channels, 1)

    @property
    def attention(self) -> str:
        return self.cross.attention

    @attention.setter
    def attention(self, mode: str) -> None:
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {mode!r}")
        self.cross.attention = mode

    def forward(self, f1: Tensor, f2: Tensor) -> tuple[Tensor, Tensor]:
        cross1, cross2 = self.cross(f1, f2)
        out1 = self.fuse(torch.cat((cross1, self.coord(f1)), dim=1))
        out2 = self.fuse(torch.cat((cross2, self.coord(f2)), dim=1))
        return out1, out2


class LGFU(nn.Module):
    """Local-Global Fusion Unit (spec §7): upsample the deep map, project it to the shallow width, and add
    the shallow map gated by a single-channel spatial sigmoid gate."""

    def __init__(self, c_deep: int, c_shallow: int) -> None:
        super().__init__()
        self.project = conv_bn_relu(c_deep, c_shallow, 1)
        self.gate = nn.Sequential(conv_bn_relu(2 * c_shallow, c_shallow, 3), nn.Conv2d(c_shallow, 1, 1))

    def forward(self, deep: Tensor, shallow: Tensor) -> Tensor:
        deep = F.interpolate(deep, size=shallow.shape[-2:], mode="bilinear", align_corners=False)
        deep = self.project(deep)
        gate = torch.sigmoid(self.gate(torch.cat((deep, shallow), dim=1)))
        return deep + gate * shallow


class FCNHead(nn.Module):
    """Conv3x3(C -> C/4, no bias) + BN + ReLU, Dropout(0.2), Conv1x1(C/4 -> classes, bias)."""

    def __init__(self, channels: int = 64, num_classes: int = 2, dropout: float = 0.2) -> None:
        super().__init__()
        mid = channels // 4
        self.block = nn.Sequential(
            conv_bn_relu(channels, mid, 3),
            nn.Dropout(dropout),
            nn.Conv2d(mid, num_classes, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)
