"""BatchNorm folding for inference (cdmap.models.fold) and the EfficientNet "same" convolution."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cdmap.checkpoint import Checkpoint
from cdmap.inference import Predictor
from cdmap.models import FSGNet, ModelConfig
from cdmap.models.backbones import _SameConv2d
from cdmap.models.fold import fold_batchnorm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _trained_looking(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (fresh ones fold to the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.4 * torch.rand(n, generator=g) - 0.2)
        for block in model.stsam:
            block.cross.gamma.fill_(0.5)
    return model.eval()


def _batch_norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "efficientnet_lite0"])
def test_folded_network_matches_and_no_batchnorm_is_left(backbone):
    torch.manual_seed(0)
    model = _trained_looking(FSGNet(ModelConfig(backbone=backbone)))
    a, b = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        before = model(a, b)
    count = _batch_norms(model)
    assert fold_batchnorm(model) == count > 0  # every BatchNorm sits right after a known convolution
    assert _batch_norms(model) == 0
    with torch.inference_mode():
        after = model(a, b)
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
    assert not torch.equal(after, before)  # the folded arithmetic really runs


def test_fold_refuses_training_mode_and_leaves_unknown_pairs_alone():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))

    class Undeclared(nn.Module):  # conv and bn attributes, but no declaration of how forward uses them
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.bn(x) if x.shape[1] == 4 else x)

    kept = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), Undeclared()).eval()
    assert fold_batchnorm(kept) == 0
    assert _batch_norms(kept) == 2


def test_checkpoint_predictor_is_folded_live_model_is_not():
    torch.manual_seed(0)
    model = _trained_looking(FSGNet(ModelConfig()))
    ckpt = Checkpoint(ModelConfig(), model.state_dict(), [110.0] * 3, [50.0] * 3, tile_size=64)
    a = torch.rand(1, 3, 64, 64).numpy()
    b = torch.rand(1, 3, 64, 64).numpy()
    pred = Predictor.from_checkpoint(ckpt, "cpu", "fp32", backend="torch")
    assert _batch_norms(pred.model) == 0
    live = ckpt.build_model("cpu")
    live_pred = Predictor(live, ckpt.mean, ckpt.std, "cpu", "fp32")
    assert _batch_norms(live) == _batch_norms(model)  # a network being trained keeps its BatchNorm
    assert (pred.probability(a, b) - live_pred.probability(a, b)).abs().max() <= 1e-5


@pytest.mark.parametrize("size", [15, 16, 31, 64, 65])
@pytest.mark.parametrize(("kernel", "stride"), [(3, 1), (5, 1), (3, 2), (5, 2), (1, 1)])
def test_same_conv_equals_tensorflow_same_padding(size, kernel, stride):
    torch.manual_seed(size)
    conv = _SameConv2d(8, 8, kernel, stride=stride, groups=8, bias=False)
    x = torch.randn(2, 8, size, size + 3)
    ih, iw = x.shape[-2:]
    pad_h = max((math.ceil(ih / stride) - 1) * stride + kernel - ih, 0)
    pad_w = max((math.ceil(iw / stride) - 1) * stride + kernel - iw, 0)
    padded = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    expected = F.conv2d(padded, conv.weight, None, stride, 0, 1, 8)
    got = conv(x)
    assert got.shape == (2, 8, math.ceil(ih / stride), math.ceil(iw / stride))
    assert torch.allclose(got, expected, atol=1e-5)
