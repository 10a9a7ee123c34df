"""The FSG-Net trainer: reference recipe by default, exact resume, DistributedDataParallel under torchrun.

Recipe (design notes §9-§10): CE + Dice, AdamW (weight decay 0.01) with lr 1e-3 and 1e-4 for ``backbone.*``
parameters, CosineAnnealingLR(T_max=epochs, eta_min=1e-6) stepped per epoch, 100 epochs, effective batch 32,
DropBlock probability rising linearly from 0 (0-based epoch 1) to 0.15 (epoch 30), reference augmentations.

Deliberate deviations, each documented:

- inputs are normalised per band with mean/std measured on the training split (the reference divides by 255);
- with gradient accumulation the loss of each micro-batch is divided by the number of micro-batches in its
  accumulation group, so the update is the gradient of the mean loss (the reference sums the gradients);
- random crops of ``crop_size`` from larger tiles, never resizing; the scale-crop augmentation and the ±15°
  rotation mark the pixels they invent (padding, corners) as ignored instead of training on them as "no change";
- the data order and every random crop/augmentation depend only on (seed, epoch, sample index), so runs are
  reproducible whatever the number of workers, and ``resume`` continues bit-exactly (same device and threads).

Files in the run folder (written by rank 0 only): ``metrics.csv`` (one row per epoch), ``best.pt``, ``last.pt``
(the full training state for ``resume``) and ``config.json``.

Validation runs whole val tiles at native resolution and accumulates 256-bin histograms of P(change) per class;
``val_precision/recall/f1/iou`` in the CSV are at threshold 0.5 (the reference's argmax), ``val_threshold`` is the
threshold maximising validation F1 and ``val_f1_calibrated`` the F1 there. ``best.pt`` keeps the epoch with the
best ``val_f1_calibrated`` (``select_by="f1"``: best F1 at 0.5, as the reference) and stores its calibrated
threshold, which predict and evaluate use by default; selecting by the F1 the checkpoint will actually be used at
is a deliberate choice (short runs, whose BatchNorm running statistics lag, otherwise pick poorly).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdmap.errors import InputError, OutputError, ResumeError, UsageError

CSV_FIELDS = (
    "epoch", "lr", "train_loss", "val_precision", "val_recall", "val_f1", "val_iou", "seconds", "pairs_per_s",
    "val_threshold", "val_f1_calibrated", "dropblock_p",
)
PLAIN_INTERVAL_S = 60.0
"""Seconds between progress lines within an epoch when stderr is not a terminal."""
RUNTIME_FIELDS = ("workers", "device", "quiet", "stop_after_epoch", "val_batch_size")
"""TrainConfig fields that may change on resume (they do not change the results)."""


@dataclass
class TrainConfig:
    """Every training option; the defaults are the reference recipe. ``None`` means "derive it"."""

    epochs: int = 100
    lr: float = 1e-3
    backbone_lr: float = 1e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.01
    batch_size: int = 32
    effective_batch: int = 32
    crop_size: int = 256
    workers: int = 4
    seed: int = 2025
    backbone: str = "resnet18"
    backbone_weights: str | None = None
    imagenet: bool = True
    in_channels: int | None = None
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool | None = None
    augment: bool = True
    val_fraction: float | None = None
    ignore_index: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    val_batch_size: int = 4
    dropblock_prob: float | None = None
    dropblock_start_epoch: int = 1
    dropblock_end_epoch: int = 30
    hist_bins: int = 256
    select_by: str = "f1_calibrated"
    stop_after_epoch: int | None = None
    quiet: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.lr > 0 and self.backbone_lr >= 0 and self.min_lr >= 0, "learning rates must be > 0"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.effective_batch >= 1, "--effective-batch must be >= 1"),
            (self.crop_size >= 8, "--crop-size must be >= 8"),
            (self.workers >= 0, "--workers must be >= 0"),
            (self.val_batch_size >= 1, "--val-batch-size must be >= 1"),
            (self.in_channels is None or self.in_channels >= 1, "--in-channels must be >= 1"),
            (self.stop_after_epoch is None or self.stop_after_epoch >= 1, "--stop-after must be >= 1"),
            (self.dropblock_prob is None or 0 <= self.dropblock_prob < 1, "dropblock probability must be in [0, 1)"),
            (self.hist_bins >= 2, "hist_bins must be >= 2"),
            (self.select_by in ("f1", "f1_calibrated"), "--select-by must be f1 or f1_calibrated"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(msg)
        if self.batch_size == 1 and self.crop_size < 64:
            raise UsageError("--batch-size 1 needs --crop-size >= 64 (BatchNorm needs more than one value per "
                             "channel at the deepest level)")
        if (self.mean is None) != (self.std is None):
            raise UsageError("--mean and --std must be given together")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise UsageError("--std values must be > 0")
        if self.mean is not None and len(self.mean) != len(self.std):
            raise UsageError("--mean and --std need the same number of values")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class TrainResult:
    """What a training call did."""

    run_dir: Path
    best_path: Path | None
    last_path: Path
    epochs_completed: int
    best_epoch: int
    best_f1: float
    threshold: float
    history: list[dict[str, float]] = field(default_factory=list)
    finished: bool = True
    model: Any = field(default=None, repr=False)
    """The trained network (the final weights, not necessarily the best; on CPU/GPU as trained)."""


# ----- small helpers -------------------------------------------------------------------------------------------
def dropblock_schedule(epoch: int, p_max: float, start: int = 1, end: int = 30) -> float:
    """DropBlock probability for 0-based ``epoch``: 0 up to ``start``, linear to ``p_max`` at ``end``.

    With the defaults this is the reference ``LinearScheduler(0, 0.15, 30)`` stepped once per epoch.
    """
    if epoch <= start:
        return 0.0
    if epoch >= end:
        return float(p_max)
    return float(p_max) * (epoch - start) / (end - start)


def _rng_state() -> dict[str, Any]:
    """Torch, CUDA, numpy and python RNG states as tensors and plain containers (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": int(py_state[0]), "state": [int(x) for x in py_state[1]],
                   "gauss_next": py_state[2]},
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu().to(torch.uint8))


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: seed numpy and python from torch's per-worker seed (itself seeded)."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_name: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    created = False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_name not in ("cpu",)
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        created = True
    return _Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, created=created)


class _Log:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(msg, file=sys.stderr, flush=True)


# ----- the trainer ---------------------------------------------------------------------------------------------
def train(
    data_dir: str | os.PathLike | None,
    run_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    **runtime: Any,
) -> TrainResult:
    """Train FSG-Net on ``data_dir`` (LEVIR-CD layout or flat A/B/label) into ``run_dir``.

    ``runtime`` keywords override the :data:`RUNTIME_FIELDS` of the configuration (``workers``, ``device``,
    ``quiet``, ``stop_after_epoch``, ``val_batch_size``): they change nothing in the results. With
    ``resume=True`` (and no ``config``) the run continues from ``run_dir/last.pt``: model, optimiser, scheduler,
    grad scaler, epoch, RNG states and history are restored and the stored configuration is used; ``data_dir``
    may be None to reuse the stored path. Under ``torchrun`` (WORLD_SIZE > 1) training uses
    DistributedDataParallel (nccl on CUDA, gloo on CPU); only rank 0 writes files and prints.
    """
    run_dir = Path(run_dir)
    unknown = set(runtime) - set(RUNTIME_FIELDS)
    if unknown:
        raise TypeError(f"unknown runtime option(s) {', '.join(sorted(unknown))}; allowed: {', '.join(RUNTIME_FIELDS)}")
    state: dict[str, Any] | None = None
    ckpt = None
    if resume:
        from cdmap.checkpoint import load_checkpoint

        if config is not None:
            raise UsageError("resume uses the stored configuration; pass only runtime keyword overrides")
        last = run_dir / "last.pt"
        if not last.exists():
            raise ResumeError("nothing to resume: no last.pt in the run folder", run_dir)
        ckpt = load_checkpoint(last)
        state = ckpt.training_state
        if not state or "config" not in state:
            raise ResumeError("last.pt holds no training state (was it written by cdmap train?)", last)
        # --stop-after applies to one call only; the other runtime fields persist unless overridden
        cfg = dataclasses.replace(TrainConfig.from_dict(state["config"]), stop_after_epoch=None)
        if data_dir is None:
            data_dir = state.get("data_dir")
        if state["epoch"] >= cfg.epochs:
            raise ResumeError(f"the run already completed all {cfg.epochs} epochs", run_dir)
    else:
        cfg = config or TrainConfig()
        if data_dir is None:
            raise UsageError("a data folder is needed (or resume an existing run)")
    if runtime:
        cfg = dataclasses.replace(cfg, **runtime)
    data_dir = Path(data_dir)
    dist_info = _init_distributed(cfg.device)
    try:
        return _train(data_dir, run_dir, cfg, dist_info, ckpt, state)
    finally:
        if dist_info.created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _check_run_dir(run_dir: Path, cfg: TrainConfig, mutate: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputError("run folder path exists and is not a folder", run_dir)
    if (run_dir / "last.pt").exists() or (run_dir / "best.pt").exists():
        if not cfg.overwrite:
            raise OutputError("already holds a training run; continue it with --resume or pass --overwrite",
                              run_dir)
        if not mutate:
            return
        for name in ("last.pt", "best.pt", "metrics.csv", "config.json"):
            (run_dir / name).unlink(missing_ok=True)
    if not mutate:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create run folder: {exc.strerror or exc}", run_dir) from exc


def _param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    backbone, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (backbone if name.startswith("backbone.") else rest).append(p)
    groups = [{"params": rest, "lr": cfg.lr, "name": "head"}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.backbone_lr, "name": "backbone"})
    return groups


def _write_csv(path: Path, history: list[dict[str, float]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    os.replace(tmp, path)


def _train(data_dir: Path, run_dir: Path, cfg: TrainConfig, dist_info: _Dist, ckpt, state) -> TrainResult:
    from torch.utils.data import DataLoader

    from cdmap.checkpoint import Checkpoint, save_checkpoint
    from cdmap.device import autocast_dtype as _dtype_of
    from cdmap.device import resolve_device, resolve_precision
    from cdmap.metrics import ConfusionCounts, best_threshold
    from cdmap.models import FSGNet, ModelConfig, load_backbone_weights, load_efficientnet_lite0_imagenet
    from cdmap.train.augment import AugmentConfig
    from cdmap.train.data import EpochSampler, EvalTiles, TrainTiles, compute_stats, discover, size_grouped_batches
    from cdmap.train.losses import CEDiceLoss

    log = _Log(dist_info.main and not cfg.quiet)
    if state is None:
        _check_run_dir(run_dir, cfg, mutate=dist_info.main)
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.barrier()

    device = resolve_device(cfg.device)
    if device.type == "cuda" and dist_info.world > 1:
        device = torch.device("cuda", dist_info.local_rank)
    autocast_dtype = _dtype_of(resolve_precision(cfg.precision, device))
    channels_last = device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # ---- data ----
    splits = discover(data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed, ignore_index=cfg.ignore_index,
                      workers=max(1, cfg.workers))
    bands = splits.bands
    if cfg.in_channels is not None and cfg.in_channels != bands:
        raise InputError(f"--in-channels {cfg.in_channels} given but the images have {bands} bands", data_dir)
    if state is not None:
        mean, std = list(ckpt.mean), list(ckpt.std)
    elif cfg.mean is not None:
        if len(cfg.mean) != bands:
            raise UsageError(f"--mean/--std have {len(cfg.mean)} values but the images have {bands} bands")
        mean, std = list(cfg.mean), list(cfg.std)
    else:
        t0 = time.perf_counter()
        mean, std = compute_stats(splits.train, workers=max(1, cfg.workers))
        log(f"normalisation from {len(splits.train)} training pairs ({time.perf_counter() - t0:.1f} s): "
            f"mean {[round(m, 3) for m in mean]}, std {[round(s, 3) for s in std]}")
    if state is None:
        cfg = dataclasses.replace(cfg, in_channels=bands, mean=mean, std=std)
    log(f"data {data_dir} ({splits.layout} layout): {len(splits.train)} train / {len(splits.val)} val pairs, "
        f"{bands} band(s)")

    # ---- model ----
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    mcfg_kwargs: dict[str, Any] = {"backbone": cfg.backbone, "in_channels": bands}
    if cfg.dropblock_prob is not None:
        mcfg_kwargs["dropblock_prob"] = cfg.dropblock_prob
    mcfg = ckpt.model_config if ckpt is not None else ModelConfig(**mcfg_kwargs)
    p_max = mcfg.dropblock_prob
    model = FSGNet(mcfg)
    if state is not None:
        model.load_state_dict(ckpt.state_dict)
    elif cfg.backbone_weights:
        log(str(load_backbone_weights(model, cfg.backbone_weights)))
    elif cfg.backbone == "efficientnet_lite0" and cfg.imagenet:
        log(str(load_efficientnet_lite0_imagenet(model)))
    if dist_info.rank > 0:
        torch.manual_seed(cfg.seed + dist_info.rank)  # different DropBlock masks per rank
    model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    raw_model = model

    optimizer = torch.optim.AdamW(_param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs, eta_min=cfg.min_lr)
    use_scaler = autocast_dtype is torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    criterion = CEDiceLoss()

    start_epoch = 0
    best = {"f1": -1.0, "epoch": 0, "threshold": 0.5}
    history: list[dict[str, float]] = []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if use_scaler and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"])
        best = dict(state.get("best", best))
        history = [dict(r) for r in state.get("history", [])]
        if int(state.get("world_size", 1)) != dist_info.world:
            log(f"warning: resumed with {dist_info.world} process(es) but the run used "
                f"{state.get('world_size', 1)}; the data order changes from here on")
        log(f"resuming {run_dir} after epoch {start_epoch}/{cfg.epochs}")

    if dist_info.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    # ---- loaders ----
    world, rank = dist_info.world, dist_info.rank
    accum = max(1, math.ceil(cfg.effective_batch / (cfg.batch_size * world)))
    effective = accum * cfg.batch_size * world
    train_ds = TrainTiles(splits.train, mean, std, cfg.crop_size, cfg.seed,
                          AugmentConfig() if cfg.augment else None, cfg.ignore_index)
    sampler = EpochSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=False)
    pin = device.type == "cuda"
    loader_kw: dict[str, Any] = {"num_workers": cfg.workers, "pin_memory": pin, "worker_init_fn": _seed_worker}
    if cfg.workers > 0:
        loader_kw.update(persistent_workers=True, prefetch_factor=4)
    # A last batch of one sample would break BatchNorm at small crops; drop it (the order is shuffled each epoch).
    drop_last = 1 < cfg.batch_size < len(sampler) and len(sampler) % cfg.batch_size == 1
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=drop_last,
                              generator=torch.Generator().manual_seed(cfg.seed), **loader_kw)
    val_ds = EvalTiles(splits.val, mean, std, cfg.ignore_index)
    val_batches = size_grouped_batches(splits.val, cfg.val_batch_size, rank, world)
    val_loader = DataLoader(val_ds, batch_sampler=val_batches,
                            generator=torch.Generator().manual_seed(cfg.seed + 1), **loader_kw)
    log(f"model {cfg.backbone}, device {device}{f' x{world}' if world > 1 else ''}, precision "
        f"{str(autocast_dtype).replace('torch.', '') if autocast_dtype else 'fp32'}, batch {cfg.batch_size} x "
        f"{accum} accumulation{f' x {world} processes' if world > 1 else ''} = {effective}, crop {cfg.crop_size}, "
        f"{cfg.epochs} epochs")
    if effective != cfg.effective_batch:
        log(f"note: effective batch {effective} (asked {cfg.effective_batch}; rounded up to whole micro-batches)")

    if dist_info.main:
        (run_dir / "config.json").write_text(json.dumps({"data_dir": str(data_dir), **cfg.to_dict()}, indent=2))
    if state is not None:
        rng = state.get("rng_per_rank") or [state.get("rng")]
        _set_rng_state(rng[min(rank, len(rng) - 1)])

    tty = sys.stderr.isatty() and dist_info.main and not cfg.quiet
    stop_at = cfg.epochs if cfg.stop_after_epoch is None else min(cfg.epochs, cfg.stop_after_epoch)
    best_path = run_dir / "best.pt"
    last_path = run_dir / "last.pt"
    epoch = start_epoch
    for epoch in range(start_epoch, stop_at):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        p_drop = dropblock_schedule(epoch, p_max, cfg.dropblock_start_epoch, cfg.dropblock_end_epoch)
        raw_model.set_dropblock_prob(p_drop)
        lr_now = optimizer.param_groups[0]["lr"]
        model.train()
        n_batches = len(train_loader)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        n_seen = 0
        bar = None
        if tty:
            from tqdm import tqdm

            bar = tqdm(total=n_batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", file=sys.stderr,
                       dynamic_ncols=True, leave=False)
        optimizer.zero_grad(set_to_none=True)
        last_line = t0
        for i, (a, b, label) in enumerate(train_loader):
            a = a.to(device, non_blocking=True)
            b = b.to(device, non_blocking=True)
            label = label.to(device, non_blocking=True)
            if channels_last:
                a = a.contiguous(memory_format=torch.channels_last)
                b = b.contiguous(memory_format=torch.channels_last)
            group = i // accum
            group_size = min(accum, n_batches - group * accum)
            step_now = (i + 1) % accum == 0 or i + 1 == n_batches
            sync_ctx = model.no_sync() if (world > 1 and not step_now) else contextlib.nullcontext()
            with sync_ctx:
                with _autocast(device, autocast_dtype):
                    logits = model(a, b)
                loss = criterion(logits, label)
                scaler.scale(loss / group_size).backward()
            if step_now:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach().double() * a.shape[0]
            n_seen += a.shape[0]
            if bar is None and log.enabled and time.perf_counter() - last_line >= PLAIN_INTERVAL_S:
                last_line = time.perf_counter()
                log(f"epoch {epoch + 1}/{cfg.epochs}: batch {i + 1}/{n_batches}, loss "
                    f"{loss_sum.item() / max(n_seen, 1):.4f}, {n_seen * world / (last_line - t0):.1f} pairs/s")
            if bar is not None:
                bar.update(1)
                if i % 10 == 0 or i + 1 == n_batches:
                    dt = time.perf_counter() - t0
                    bar.set_postfix_str(f"loss {loss_sum.item() / max(n_seen, 1):.4f}, "
                                        f"{n_seen * world / max(dt, 1e-9):.1f} pairs/s", refresh=False)
        if bar is not None:
            bar.close()
        train_seconds = time.perf_counter() - t0
        scheduler.step()

        totals = torch.tensor([loss_sum.item(), float(n_seen)], dtype=torch.float64, device=device)
        if world > 1:  # every rank validates (and rank 0 saves) rank 0's BatchNorm statistics
            import torch.distributed as dist

            for buf in raw_model.buffers():
                dist.broadcast(buf, 0)
        pos, neg = _validate(raw_model, val_loader, device, autocast_dtype, channels_last, cfg.hist_bins)
        if world > 1:
            import torch.distributed as dist

            for t in (totals, pos, neg):
                dist.all_reduce(t)
        pos_np, neg_np = pos.cpu().numpy(), neg.cpu().numpy()
        counts = ConfusionCounts.from_histograms(pos_np, neg_np, cfg.hist_bins // 2)
        thr, calibrated = best_threshold(pos_np, neg_np)
        seconds = time.perf_counter() - t0
        row = {
            "epoch": epoch + 1, "lr": float(lr_now), "train_loss": float(totals[0] / max(totals[1].item(), 1)),
            "val_precision": counts.precision, "val_recall": counts.recall, "val_f1": counts.f1,
            "val_iou": counts.iou, "seconds": seconds, "pairs_per_s": float(totals[1]) / max(train_seconds, 1e-9),
            "val_threshold": thr, "val_f1_calibrated": calibrated.f1, "dropblock_p": p_drop,
        }
        history.append(row)
        score = calibrated.f1 if cfg.select_by == "f1_calibrated" else counts.f1
        improved = score > best["f1"]
        if improved:
            best = {"f1": score, "epoch": epoch + 1, "threshold": thr}

        rng = _rng_state()
        if world > 1:
            import torch.distributed as dist

            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, _to_cpu(rng))
            rng_all = gathered
        else:
            rng_all = [rng]
        if dist_info.main:
            metrics = {"val_f1": counts.f1, "val_precision": counts.precision, "val_recall": counts.recall,
                       "val_iou": counts.iou, "val_oa": counts.oa, "val_kappa": counts.kappa,
                       "val_f1_calibrated": calibrated.f1, "epoch": float(epoch + 1)}
            prov = {"train_data": str(data_dir), "epoch": epoch + 1, "epochs": cfg.epochs, "seed": cfg.seed,
                    "train_pairs": len(splits.train), "val_pairs": len(splits.val), "world_size": world}
            weights = {k: v.detach().cpu().clone() for k, v in raw_model.state_dict().items()}
            if improved:
                save_checkpoint(Checkpoint(mcfg, weights, mean, std, tile_size=cfg.crop_size, threshold=thr,
                                           metrics=metrics, provenance=prov), best_path)
            training_state = {
                "epoch": epoch + 1,
                "config": cfg.to_dict(),
                "data_dir": str(data_dir),
                "optimizer": _to_cpu(optimizer.state_dict()),
                "scheduler": _to_cpu(scheduler.state_dict()),
                "scaler": scaler.state_dict() if use_scaler else {},
                "rng_per_rank": [_to_cpu(r) for r in rng_all],
                "best": best,
                "history": history,
                "world_size": world,
            }
            save_checkpoint(Checkpoint(mcfg, weights, mean, std, tile_size=cfg.crop_size, threshold=thr,
                                       metrics=metrics, provenance=prov, training_state=training_state), last_path)
            _write_csv(run_dir / "metrics.csv", history)
            log(f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}, val P {counts.precision:.4f} "
                f"R {counts.recall:.4f} F1 {counts.f1:.4f} IoU {counts.iou:.4f} (F1 {calibrated.f1:.4f} at "
                f"threshold {thr:.3f}), {row['pairs_per_s']:.1f} pairs/s, {seconds:.1f} s"
                + (" *best*" if improved else ""))
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
    completed = epoch + 1 if stop_at > start_epoch else start_epoch
    finished = completed >= cfg.epochs
    if not finished:
        log(f"stopped after epoch {completed}/{cfg.epochs}; continue with: cdmap train --resume {run_dir}")
    return TrainResult(run_dir=run_dir, best_path=best_path if best_path.exists() else None, last_path=last_path,
                       epochs_completed=completed, best_epoch=int(best["epoch"]), best_f1=float(best["f1"]),
                       threshold=float(best["threshold"]), history=history, finished=finished,
                       model=raw_model)


def _autocast(device, dtype):
    """bf16/fp16 autocast on ``device``, or nothing for float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _validate(model, loader, device, autocast_dtype, channels_last: bool, bins: int):
    """Per-class histograms of P(change) over the validation tiles of this rank (int64 tensors on device)."""
    from cdmap.evaluate import accumulate_histograms, change_probability

    pos = torch.zeros(bins, dtype=torch.int64, device=device)
    neg = torch.zeros(bins, dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for a, b, label, _ in loader:
            a = a.to(device, non_blocking=True)
            b = b.to(device, non_blocking=True)
            label = label.to(device, non_blocking=True)
            prob = change_probability(model, a, b, autocast_dtype, channels_last)
            accumulate_histograms(prob, label, pos, neg)
    model.train(was_training)
    return pos, neg
