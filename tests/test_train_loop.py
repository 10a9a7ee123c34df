"""The trainer: schedule, config, run-folder rules, a short overfit, exact resume, and DDP on 2 CPU processes."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cdmap.checkpoint import load_checkpoint
from cdmap.errors import InputError, OutputError, ResumeError, UsageError
from cdmap.train import TrainConfig, resume, train
from cdmap.train.state import dropblock_schedule, rng_state, set_rng_state

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
REPO = Path(__file__).resolve().parents[1]


def _write_png(path: Path, arr: np.ndarray) -> None:
    import rasterio

    path.parent.mkdir(parents=True, exist_ok=True)
    if arr.ndim == 2:
        arr = arr[None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path, "w", driver="PNG", width=arr.shape[2], height=arr.shape[1], count=arr.shape[0],
                           dtype=arr.dtype) as dst:
            dst.write(arr)


def make_change_set(root: Path, n: int = 4, size: int = 64, seed: int = 0, splits=("train", "val"),
                    val_same: bool = True) -> Path:
    """Dark noisy tiles; a bright 'building' stands in A at one place and in B at another (both are change).

    The two dates have the same global statistics, so the per-date BatchNorm statistics of training match the
    shared running statistics of evaluation even after a few steps.
    """
    rng = np.random.default_rng(seed)
    for split in splits:
        if split != "train" and val_same:
            rng = np.random.default_rng(seed)  # identical tiles: an overfit check
        for i in range(n):
            a = rng.integers(30, 90, (3, size, size), dtype=np.uint8)
            b = np.clip(a.astype(int) + rng.integers(-4, 5, a.shape), 0, 255).astype(np.uint8)
            lab = np.zeros((size, size), np.uint8)
            h, w = (int(x) for x in rng.integers(size // 5, size // 3, 2))
            for img in (a, b):
                r, c = (int(x) for x in rng.integers(0, size - h, 2))
                img[:, r : r + h, c : c + w] = 220
                lab[r : r + h, c : c + w] = 255
            for sub, arr in (("A", a), ("B", b), ("label", lab)):
                _write_png(root / split / sub / f"t{i}.png", arr)
    return root


# ----- small units ---------------------------------------------------------------------------------------------
def test_dropblock_schedule_matches_reference_linear_scheduler():
    ref = np.linspace(0, 0.15, 30)  # dropblock LinearScheduler values, one step after each epoch

    def reference(epoch):  # epoch 0 trains with the initial 0, epoch k with ref[k-1]
        return 0.0 if epoch == 0 else float(ref[min(epoch - 1, 29)])

    for e in range(0, 40):
        assert dropblock_schedule(e, 0.15) == pytest.approx(reference(e)), e


def test_rng_state_roundtrip_is_weights_only_loadable(tmp_path):
    import random

    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.normal()  # has_gauss / cached values exercised
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    expect = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    set_rng_state(loaded)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expect[0], got[0]) and np.array_equal(expect[1], got[1]) and expect[2] == got[2]


def test_config_validation():
    with pytest.raises(UsageError):
        TrainConfig(epochs=0)
    with pytest.raises(UsageError):
        TrainConfig(mean=[1.0])
    with pytest.raises(UsageError):
        TrainConfig(mean=[1.0], std=[0.0])
    cfg = TrainConfig(epochs=3, mean=[1.0, 2.0], std=[3.0, 4.0])
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_recipe_apart_from_runtime():
    from cdmap.train import TrainRuntime

    cfg = TrainConfig(epochs=3)
    assert not {"workers", "device", "quiet", "overwrite", "stop_after_epoch", "val_batch_size"} & set(cfg.to_dict())
    with pytest.warns(DeprecationWarning, match="workers, quiet"):
        old = TrainConfig(epochs=3, workers=0, quiet=True)
    assert old == cfg and old.legacy_runtime == {"workers": 0, "quiet": True}
    assert TrainRuntime().with_overrides({"workers": 1}).workers == 1
    with pytest.raises(TypeError, match="unknown runtime option"):
        TrainRuntime().with_overrides({"epochs": 1})
    with pytest.raises(UsageError, match="--workers"):
        TrainRuntime(workers=-1)
    with pytest.raises(UsageError, match="--precision"):
        TrainConfig(precision="fp8")


def test_backbone_registry_is_the_one_list():
    from cdmap.models import BACKBONES, ModelConfig, build_backbone

    assert list(BACKBONES) == ["resnet18", "resnet34", "resnet50", "efficientnet_lite0", "efficientnet_lite1",
                              "efficientnet_lite2"]
    for name in BACKBONES:
        assert name in TrainConfig(backbone=name).backbone
    assert build_backbone("resnet18", 4).conv1.in_channels == 4
    with pytest.raises(ValueError, match="choose one of resnet18, resnet34, resnet50, efficientnet_lite0, "):
        ModelConfig(backbone="vgg")
    with pytest.raises(UsageError, match="--backbone must be one of resnet18, "):
        TrainConfig(backbone="vgg")
    from cdmap.cli import train as cli_train

    help_text = next(p.help for p in cli_train.train_cmd.__defaults__ if getattr(p, "param_decls", None) == (
        "--backbone",))
    assert all(name in help_text for name in BACKBONES)


def test_run_folder_and_resume_errors(tmp_path):
    with pytest.raises(ResumeError, match="no last.pt"):
        resume(tmp_path / "nope")
    data = make_change_set(tmp_path / "d", n=2, size=32)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pt").write_bytes(b"x")
    with pytest.raises(OutputError, match="already holds a training run"):
        train(data, tmp_path / "run", TrainConfig(epochs=1), workers=0)
    with pytest.raises(InputError, match="--in-channels 4 given but the images have 3 bands"):
        train(data, tmp_path / "run2", TrainConfig(epochs=1, in_channels=4), workers=0)


# ----- training runs -------------------------------------------------------------------------------------------
def test_short_overfit_reaches_f1(tmp_path):
    """4 tiles of 64 px with an easy change, resnet18 from scratch, no augmentation: F1 > 0.9 on its own tiles."""
    from cdmap.evaluate import evaluate_tiles

    data = make_change_set(tmp_path / "d", n=4, size=64)
    cfg = TrainConfig(epochs=14, batch_size=2, effective_batch=2, crop_size=64, augment=False,
                      lr=2e-3, backbone_lr=2e-3)
    result = train(data, tmp_path / "run", cfg, workers=0, val_batch_size=4, quiet=True)
    assert result.finished and result.epochs_completed == 14
    assert (tmp_path / "run" / "metrics.csv").read_text().count("\n") == 15
    ckpt = load_checkpoint(result.best_path)
    assert ckpt.training_state is None and 0 < ckpt.threshold < 1
    assert ckpt.mean == pytest.approx(ckpt.mean) and len(ckpt.std) == 3
    ev = evaluate_tiles(data, result.best_path, split="train", device="cpu")
    assert ev.metrics["f1"] > 0.9, ev.metrics


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).state_dict


def test_exact_resume_matches_uninterrupted_run(tmp_path):
    """Stop after epoch 1 of 2 (CLI), resume (CLI), and get bit-identical weights and optimiser state."""
    from cdmap.cli.app import main

    data = make_change_set(tmp_path / "d", n=3, size=40, val_same=False)
    common = ["--epochs", "2", "--batch-size", "2", "--effective-batch", "4", "--crop-size", "32",
              "--workers", "0", "--seed", "7", "--quiet"]
    main(["train", str(data), "-o", str(tmp_path / "a"), *common, "--stop-after", "1"])
    first = load_checkpoint(tmp_path / "a" / "last.pt")
    assert first.training_state["epoch"] == 1
    assert (tmp_path / "a" / "metrics.csv").read_text().count("\n") == 2
    main(["train", "--resume", str(tmp_path / "a"), "--quiet"])

    full = train(data, tmp_path / "b", TrainConfig(epochs=2, batch_size=2, effective_batch=4, crop_size=32, seed=7),
                 workers=0, quiet=True)
    assert full.epochs_completed == 2
    resumed_ckpt = load_checkpoint(tmp_path / "a" / "last.pt")
    full_ckpt = load_checkpoint(tmp_path / "b" / "last.pt")
    a, b = resumed_ckpt.state_dict, full_ckpt.state_dict
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    oa, ob = resumed_ckpt.training_state["optimizer"], full_ckpt.training_state["optimizer"]
    for pid, st in oa["state"].items():
        for name, t in st.items():
            assert torch.equal(t, ob["state"][pid][name]), (pid, name)
    assert resumed_ckpt.training_state["scheduler"]["last_epoch"] == 2
    rows_a = (tmp_path / "a" / "metrics.csv").read_text().splitlines()
    rows_b = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    assert len(rows_a) == len(rows_b) == 3
    for ra, rb in zip(rows_a[1:], rows_b[1:], strict=True):  # same metrics; timings differ
        assert ra.split(",")[:7] == rb.split(",")[:7]
    with pytest.raises(ResumeError, match="already completed"):
        resume(tmp_path / "a")


DDP_DRIVER = """
import sys, torch
from cdmap.train import TrainConfig, train
data, run, out = sys.argv[1:4]
cfg = TrainConfig(epochs=1, batch_size=2, effective_batch=4, crop_size=32)
res = train(data, run, cfg, workers=0, device="cpu", quiet=True)
import os
torch.save({k: v.detach().clone() for k, v in res.model.state_dict().items()},
           f"{out}/rank{os.environ['RANK']}.pt")
"""


def test_ddp_two_cpu_processes_gloo(tmp_path):
    data = make_change_set(tmp_path / "d", n=4, size=32, val_same=False)
    driver = tmp_path / "driver.py"
    driver.write_text(DDP_DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
           str(data), str(tmp_path / "run"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in w0:
        assert torch.equal(w0[k], w1[k]) or "running" in k or "num_batches" in k, k
    params_equal = all(torch.equal(w0[k], w1[k]) for k in w0 if "running" not in k and "num_batches" not in k)
    assert params_equal
    run = tmp_path / "run"
    assert (run / "best.pt").exists() and (run / "last.pt").exists() and (run / "metrics.csv").exists()
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt.training_state["world_size"] == 2
    assert len(ckpt.training_state["rng_per_rank"]) == 2
    plot = ["training.png"] if importlib.util.find_spec("matplotlib") else []
    assert sorted(p.name for p in run.iterdir()) == sorted(["best.pt", "config.json", "last.pt", "metrics.csv", *plot])


def test_pretrained_backbone_normalisation_is_carried_over(tmp_path):
    """A `cdmap pretrain` backbone.pt brings the statistics it was pretrained with; --mean/--std still win."""
    from cdmap.models.backbones import build_backbone

    data = make_change_set(tmp_path / "d", n=2, size=32)
    weights = tmp_path / "backbone.pt"
    torch.save({"format": "cdmap-backbone", "format_version": 1, "backbone": "resnet18", "in_channels": 3,
                "state_dict": build_backbone("resnet18", 3).state_dict(),
                "normalization": {"mean": [11.0, 22.0, 33.0], "std": [4.0, 5.0, 6.0]}}, weights)
    cfg = TrainConfig(epochs=1, batch_size=2, effective_batch=2, crop_size=32, backbone_weights=str(weights))
    result = train(data, tmp_path / "run", cfg, workers=0, quiet=True)
    ckpt = load_checkpoint(result.last_path)
    assert ckpt.mean == [11.0, 22.0, 33.0] and ckpt.std == [4.0, 5.0, 6.0]
    cfg = dataclasses.replace(cfg, mean=[1.0, 2.0, 3.0], std=[7.0, 8.0, 9.0])
    ckpt = load_checkpoint(train(data, tmp_path / "run2", cfg, workers=0, quiet=True).last_path)
    assert ckpt.mean == [1.0, 2.0, 3.0]
