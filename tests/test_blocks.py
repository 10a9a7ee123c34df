"""FSG-Net blocks: exact parameter counts, SDPA == explicit attention, shared-mask DropBlock, shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from cdmap.models import count_parameters
from cdmap.models.blocks import DAWIM, LGFU, STSAM, DropBlock, FCNHead, _temporal_conv

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pair(c: int, h: int, w: int, b: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g), torch.randn(b, c, h, w, generator=g)


@pytest.mark.parametrize(("c", "expected"), [(64, 89_216), (128, 356_608), (256, 1_425_920)])
def test_dawim_parameter_count(c, expected):
    assert count_parameters(DAWIM(c)) == expected


@pytest.mark.parametrize(("c", "expected"), [(64, 15_337), (128, 57_273), (256, 221_017)])
def test_stsam_parameter_count(c, expected):
    assert count_parameters(STSAM(c)) == expected


@pytest.mark.parametrize(("deep", "shallow", "expected"), [(256, 128, 328_321), (128, 64, 82_241)])
def test_lgfu_parameter_count(deep, shallow, expected):
    assert count_parameters(LGFU(deep, shallow)) == expected


def test_fcn_head_parameter_count_and_shape():
    head = FCNHead(64, 2)
    assert count_parameters(head) == 9_282
    assert head(torch.randn(1, 64, 8, 8)).shape == (1, 2, 8, 8)


def test_temporal_conv_equals_conv3d_on_stacked_dates():
    conv = torch.nn.Conv3d(8, 8, kernel_size=(2, 3, 3), padding=(0, 1, 1), bias=False)
    x1, x2 = _pair(8, 6, 10)
    expected = conv(torch.stack((x1, x2), dim=2)).squeeze(2)
    assert torch.allclose(_temporal_conv(conv, x1, x2), expected, atol=1e-5)


def test_dawim_shapes_and_gain_bounds():
    torch.manual_seed(0)
    block = DAWIM(64).eval()
    f1, f2 = _pair(64, 8, 12)
    o1, o2 = block(f1, f2)
    assert o1.shape == f1.shape and o2.shape == f2.shape
    # Per-band gains lie in (1, 2) and Haar is orthonormal: the energy grows by a factor in (1, 4).
    ratio = (o1**2).sum() / (f1**2).sum()
    assert 1.0 < ratio < 4.0


def _stsam_pair(c: int, gamma: float = 0.7, seed: int = 0) -> tuple[STSAM, STSAM]:
    torch.manual_seed(seed)
    sdpa = STSAM(c, attention="sdpa")
    with torch.no_grad():
        sdpa.cross.gamma.fill_(gamma)
    explicit = STSAM(c, attention="explicit")
    explicit.load_state_dict(sdpa.state_dict())
    return sdpa.eval(), explicit.eval()


@pytest.mark.parametrize("c", [64, 128])
def test_stsam_sdpa_equals_explicit_both_directions(c):
    sdpa, explicit = _stsam_pair(c)
    f1, f2 = _pair(c, 12, 10)
    s1, s2 = sdpa.cross(f1, f2)
    e1, e2 = explicit.cross(f1, f2)
    assert (s1 - e1).abs().max() <= 1e-5
    assert (s2 - e2).abs().max() <= 1e-5
    # the attention path really contributes (gamma != 0) and the directions differ
    assert (s1 - f1).abs().max() > 1e-2 and (s2 - f2).abs().max() > 1e-2
    o_s, o_e = sdpa(f1, f2), explicit(f1, f2)
    for a, b in zip(o_s, o_e, strict=True):
        assert (a - b).abs().max() <= 1e-5


def test_stsam_sdpa_gradients_equal_explicit():
    sdpa, explicit = _stsam_pair(64, gamma=0.5, seed=1)
    f1, f2 = _pair(64, 8, 8, seed=3)
    grads = []
    for module in (sdpa, explicit):
        x1, x2 = f1.clone().requires_grad_(), f2.clone().requires_grad_()
        o1, o2 = module.cross(x1, x2)
        (o1.square().mean() + 2 * o2.mean()).backward()
        grads.append((x1.grad, x2.grad, module.cross.query.weight.grad, module.cross.gamma.grad))
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_stsam_sdpa_runs_on_fused_kernel():
    """With only the flash backend allowed, the call must not fail, i.e. no silent fallback to the math
    path that materialises the N x N map (Q/K are padded to V's head size for this)."""
    sdpa, _ = _stsam_pair(64)
    f1, f2 = _pair(64, 8, 8)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.no_grad():
        sdpa.cross(f1, f2)


def test_stsam_cross_branch_is_identity_at_init():
    torch.manual_seed(0)
    block = STSAM(64)
    f1, f2 = _pair(64, 8, 8)
    c1, c2 = block.cross(f1, f2)
    assert torch.equal(c1, f1) and torch.equal(c2, f2)


def test_stsam_bf16_autocast_forward_backward():
    sdpa, _ = _stsam_pair(64)
    sdpa.train()
    f1, f2 = (t.requires_grad_() for t in _pair(64, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o1, o2 = sdpa(f1, f2)
    (o1.float().sum() + o2.float().sum()).backward()
    assert torch.isfinite(f1.grad).all() and torch.isfinite(sdpa.cross.gamma.grad).all()


def test_stsam_rejects_unknown_attention():
    with pytest.raises(ValueError):
        STSAM(64, attention="flash")


def test_lgfu_shapes():
    unit = LGFU(128, 64)
    out = unit(torch.randn(2, 128, 5, 7), torch.randn(2, 64, 10, 14))
    assert out.shape == (2, 64, 10, 14)


def test_dropblock_same_mask_on_both_dates():
    torch.manual_seed(0)
    drop = DropBlock(block_size=7, drop_prob=0.3).train()
    a, b = _pair(4, 32, 32)
    a, b = a.abs() + 0.1, b.abs() + 0.1  # no zeros before dropping
    oa, ob = drop(a, b)
    dropped_a, dropped_b = oa == 0, ob == 0
    assert dropped_a.any(), "p=0.3 on 32x32 should drop something"
    assert torch.equal(dropped_a, dropped_b)
    assert torch.equal(dropped_a, dropped_a[:, :1].expand_as(dropped_a))  # shared across channels
    assert torch.allclose(oa / a, ob / b)  # identical rescaling too


def test_dropblock_rescales_to_keep_the_mean():
    torch.manual_seed(1)
    drop = DropBlock(7, 0.2).train()
    ones = torch.ones(2, 3, 24, 24)
    oa, _ = drop(ones, ones)
    assert oa.mean().item() == pytest.approx(1.0, abs=1e-5)


def test_dropblock_blocks_are_block_size_squares():
    torch.manual_seed(2)
    drop = DropBlock(block_size=5, drop_prob=0.05).train()
    keep = drop.block_mask(torch.ones(1, 1, 40, 40)) > 0
    dropped = (~keep).float()
    # every dropped pixel belongs to some fully dropped 5x5 square (erosion then dilation restores it)
    eroded = -F.max_pool2d(-dropped, 5, stride=1, padding=2)
    reopened = F.max_pool2d(eroded, 5, stride=1, padding=2)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))  # borders are clipped squares
    assert torch.equal(reopened[inner], dropped[inner])


def test_dropblock_identity_in_eval_and_at_zero():
    a, b = _pair(4, 16, 16)
    drop = DropBlock(7, 0.5).eval()
    oa, ob = drop(a, b)
    assert oa is a and ob is b
    drop.train()
    drop.drop_prob = 0.0
    oa, ob = drop(a, b)
    assert oa is a and ob is b


@pytest.mark.parametrize(("c", "chunk"), [(64, 7), (64, 1000), (128, 32)])
def test_stsam_chunked_equals_explicit(c, chunk, monkeypatch):
    """The unpadded chunked attention (any block size, also one not dividing N) gives the reference result."""
    monkeypatch.setattr("cdmap.models.blocks.ATTENTION_CHUNK", chunk)
    sdpa, explicit = _stsam_pair(c)
    sdpa.attention = "chunked"
    f1, f2 = _pair(c, 12, 10)
    with torch.no_grad():
        for a, b in zip(sdpa(f1, f2), explicit(f1, f2), strict=True):
            assert (a - b).abs().max() <= 1e-5
