"""Building a training session: run folder, device, data, model, optimiser, restored state and loaders.

:func:`build` runs the steps in a fixed order (the RNG is seeded just before the network is built), so a fresh
run and a resumed one construct exactly the same objects.
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdmap.distributed import Dist
from cdmap.errors import InputError, OutputError, UsageError
from cdmap.train.config import TrainConfig, TrainRuntime

RUN_FILES = ("last.pt", "best.pt", "metrics.csv", "config.json")


class Log:
    """Progress lines on stderr (rank 0 only, unless quiet)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(msg, file=sys.stderr, flush=True)


@dataclass
class Optim:
    """Optimiser, cosine schedule, grad scaler (fp16 only) and loss of a run."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    use_scaler: bool
    criterion: torch.nn.Module


@dataclass
class Progress:
    """Where a run stands: the next epoch, the best epoch so far and the per-epoch history."""

    start_epoch: int = 0
    best: dict[str, float] = field(default_factory=lambda: {"f1": -1.0, "epoch": 0, "threshold": 0.5})
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class Session:
    """Everything one training call holds."""

    cfg: TrainConfig
    rt: TrainRuntime
    data_dir: Path
    """The first data folder (``data_dirs`` holds them all)."""
    run_dir: Path
    dist: Dist
    log: Log
    device: torch.device
    autocast_dtype: torch.dtype | None
    channels_last: bool
    splits: Any
    mean: list[float]
    std: list[float]
    mcfg: Any
    model: Any
    """The network itself (``net`` is it, or its DistributedDataParallel wrapper)."""
    net: torch.nn.Module
    optim: Optim
    progress: Progress
    accum: int
    sampler: Any
    train_loader: Any
    val_loader: Any
    predictor: Any
    data_dirs: list[Path] = field(default_factory=list)


def build(data_dir: Path | list[Path], run_dir: Path, cfg: TrainConfig, rt: TrainRuntime, dist: Dist,
          ckpt: Any = None) -> Session:
    """A ready session; ``ckpt`` (a ``last.pt`` with training state) resumes it."""
    from cdmap.inference import Predictor

    log = Log(dist.main and not rt.quiet)
    if ckpt is None:  # refuse first; the run folder is touched only once the data are checked
        check_run_dir(run_dir, rt.overwrite, mutate=False)
    device, dtype, channels_last = _device(cfg, rt, dist)
    splits, cfg, mean, std = _data(data_dir, cfg, rt, ckpt, log)
    _check_inputs_spared(splits, cfg, run_dir)
    if ckpt is None:
        check_run_dir(run_dir, rt.overwrite, mutate=dist.main)
    dist.barrier()
    mcfg, model = _model(cfg, ckpt, dist, device, channels_last, log)
    optim = _optim(model, cfg, dtype)
    progress = _restore(optim, ckpt, dist, run_dir, log) if ckpt is not None else Progress()
    net = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    accum = max(1, math.ceil(cfg.effective_batch / (cfg.batch_size * dist.world)))
    sampler, train_loader, val_loader = _loaders(splits, mean, std, cfg, rt, dist, device)
    predictor = Predictor(model, mean, std, device, cfg.precision)
    dirs = data_dirs(data_dir)
    s = Session(cfg, rt, dirs[0], run_dir, dist, log, device, dtype, channels_last, splits, mean, std, mcfg,
                model, net, optim, progress, accum, sampler, train_loader, val_loader, predictor, dirs)
    _log_setup(s)
    return s


def check_run_dir(run_dir: Path, overwrite: bool, mutate: bool) -> None:
    """Refuse a run folder holding a run (unless ``overwrite``); with ``mutate``, clear and create it."""
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputError("run folder path exists and is not a folder", run_dir)
    if (run_dir / "last.pt").exists() or (run_dir / "best.pt").exists():
        if not overwrite:
            raise OutputError("already holds a training run; continue it with --resume or pass --overwrite",
                              run_dir)
        if not mutate:
            return
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
    if not mutate:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create run folder: {exc.strerror or exc}", run_dir) from exc


def _check_inputs_spared(splits: Any, cfg: TrainConfig, run_dir: Path) -> None:
    """No run file may be (or replace) a tile or the backbone weights (:mod:`cdmap.files`)."""
    from cdmap.files import check_outputs_spare_inputs

    inputs = [f for p in (*splits.train, *splits.val) for f in (p.a, p.b, p.label)]
    inputs += [cfg.backbone_weights] if cfg.backbone_weights else []
    check_outputs_spare_inputs(inputs, [run_dir / n for n in RUN_FILES])


def _device(cfg: TrainConfig, rt: TrainRuntime, dist: Dist) -> tuple[torch.device, torch.dtype | None, bool]:
    """The device of this rank, the autocast dtype (None: float32) and whether to use channels-last."""
    from cdmap.device import autocast_dtype, resolve_device, resolve_precision

    device = resolve_device(rt.device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    channels_last = device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
    return device, autocast_dtype(resolve_precision(cfg.precision, device)), channels_last


def _pretrained_normalisation(path: str | None, bands: int) -> tuple[list[float], list[float]] | None:
    """The per-band mean/std stored in a pretrained backbone file (``cdmap pretrain``'s ``backbone.pt``), if any
    and if it has ``bands`` values; plain ImageNet state dicts carry none."""
    if not path:
        return None
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - unreadable files are reported by the weight loader itself
        return None
    norm = payload.get("normalization") if isinstance(payload, dict) else None
    if not isinstance(norm, dict) or len(norm.get("mean", ())) != bands or len(norm.get("std", ())) != bands:
        return None
    return [float(m) for m in norm["mean"]], [float(s) for s in norm["std"]]


def _data(data_dir: Path | list[Path], cfg: TrainConfig, rt: TrainRuntime, ckpt: Any,
          log: Log) -> tuple[Any, TrainConfig, list[float], list[float]]:
    """Discover the splits; normalisation from the checkpoint, the recipe or measured on train."""
    from cdmap.data import discover
    from cdmap.train.data import compute_stats

    workers = max(1, rt.workers)
    dirs = data_dirs(data_dir)
    parts = [discover(d, val_fraction=cfg.val_fraction, seed=cfg.seed, ignore_index=cfg.ignore_index,
                      workers=workers, expected_bands=cfg.in_channels, label_values=cfg.label_coding) for d in dirs]
    splits = _merge_splits(parts, dirs)
    data_dir = dirs[0]
    bands = splits.bands
    if cfg.in_channels is not None and cfg.in_channels != bands:
        raise InputError(f"--in-channels {cfg.in_channels} given but the images have {bands} bands", data_dir)
    pretrained = _pretrained_normalisation(cfg.backbone_weights, bands) if ckpt is None and cfg.mean is None else None
    if ckpt is not None:
        mean, std = list(ckpt.mean), list(ckpt.std)
    elif pretrained is not None:  # a pretrained backbone expects the statistics it was pretrained with
        mean, std = pretrained
        log(f"normalisation from the pretrained backbone {cfg.backbone_weights}: mean {[round(m, 3) for m in mean]}, "
            f"std {[round(s, 3) for s in std]} (give --mean/--std to override)")
    elif cfg.mean is not None:
        if len(cfg.mean) != bands:
            raise UsageError(f"--mean/--std have {len(cfg.mean)} values but the images have {bands} bands")
        mean, std = list(cfg.mean), list(cfg.std)
    else:
        t0 = time.perf_counter()
        mean, std = compute_stats(splits.train, workers=workers)
        log(f"normalisation from {len(splits.train)} training pairs ({time.perf_counter() - t0:.1f} s): "
            f"mean {[round(m, 3) for m in mean]}, std {[round(s, 3) for s in std]}")
    if ckpt is None:
        cfg = dataclasses.replace(cfg, in_channels=bands, mean=mean, std=std)
    log(f"data {', '.join(map(str, dirs))} ({splits.layout} layout): {len(splits.train)} train / "
        f"{len(splits.val)} val pairs, "
        f"{bands} band(s)")
    return splits, cfg, mean, std


def data_dirs(data_dir: Path | list[Path] | tuple[Path, ...]) -> list[Path]:
    """One or several data folders as a list of absolute paths (stored so a resume works from anywhere)."""
    dirs = list(data_dir) if isinstance(data_dir, list | tuple) else [data_dir]
    if not dirs:
        raise UsageError("a data folder is needed")
    return [Path(d).expanduser().absolute() for d in dirs]


def _merge_splits(parts: list[Any], dirs: list[Path]) -> Any:
    """The pairs of several folders as one training set; names get the folder's name so none collide."""
    if len(parts) == 1:
        return parts[0]
    from cdmap.data import DataSplits

    bands = {p.bands for p in parts}
    if len(bands) > 1:
        listing = ", ".join(f"{d} ({p.bands})" for d, p in zip(dirs, parts, strict=True))
        raise InputError(f"the data folders have different band counts: {listing}", dirs[0])

    def tagged(pairs: list[Any], d: Path) -> list[Any]:
        return [dataclasses.replace(p, name=f"{d.name}/{p.name}") for p in pairs]

    train = [q for p, d in zip(parts, dirs, strict=True) for q in tagged(p.train, d)]
    val = [q for p, d in zip(parts, dirs, strict=True) for q in tagged(p.val, d)]
    return DataSplits("+".join(p.layout for p in parts), train, val, bands.pop())


def _model(cfg: TrainConfig, ckpt: Any, dist: Dist, device: torch.device, channels_last: bool,
           log: Log) -> tuple[Any, Any]:
    """Seed every RNG with the recipe's seed, then build the network and load its weights."""
    from cdmap.models import FSGNet, ModelConfig, load_backbone_weights
    from cdmap.models.config import BACKBONES

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    kwargs: dict[str, Any] = {"backbone": cfg.backbone, "in_channels": cfg.in_channels}
    if cfg.dropblock_prob is not None:
        kwargs["dropblock_prob"] = cfg.dropblock_prob
    mcfg = ckpt.model_config if ckpt is not None else ModelConfig(**kwargs)
    model = FSGNet(mcfg)
    if ckpt is not None:
        model.load_state_dict(ckpt.state_dict)
    elif cfg.backbone_weights:
        log(str(load_backbone_weights(model, cfg.backbone_weights)))
    elif cfg.imagenet:
        report = BACKBONES[cfg.backbone].load_imagenet(model)
        if report is not None:
            log(str(report))
    if dist.rank > 0:
        torch.manual_seed(cfg.seed + dist.rank)  # different DropBlock masks per rank
    model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return mcfg, model


def _param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    backbone, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (backbone if name.startswith("backbone.") else rest).append(p)
    groups = [{"params": rest, "lr": cfg.lr, "name": "head"}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.backbone_lr, "name": "backbone"})
    return groups


def _optim(model: torch.nn.Module, cfg: TrainConfig, dtype: torch.dtype | None) -> Optim:
    from cdmap.train.losses import CEDiceLoss

    optimizer = torch.optim.AdamW(_param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs, eta_min=cfg.min_lr)
    use_scaler = dtype is torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    return Optim(optimizer, scheduler, scaler, use_scaler, CEDiceLoss())


def _restore(optim: Optim, ckpt: Any, dist: Dist, run_dir: Path, log: Log) -> Progress:
    """Optimiser, schedule and scaler states and the run's progress from a ``last.pt``."""
    state = ckpt.training_state
    optim.optimizer.load_state_dict(state["optimizer"])
    optim.scheduler.load_state_dict(state["scheduler"])
    if optim.use_scaler and state.get("scaler"):
        optim.scaler.load_state_dict(state["scaler"])
    progress = Progress(start_epoch=int(state["epoch"]))
    progress.best = dict(state.get("best", progress.best))
    progress.history = [dict(r) for r in state.get("history", [])]
    if int(state.get("world_size", 1)) != dist.world:
        log(f"warning: resumed with {dist.world} process(es) but the run used "
            f"{state.get('world_size', 1)}; the data order changes from here on")
    log(f"resuming {run_dir} after epoch {progress.start_epoch}/{state['config']['epochs']}")
    return progress


def _loaders(splits: Any, mean: list[float], std: list[float], cfg: TrainConfig, rt: TrainRuntime, dist: Dist,
             device: torch.device) -> tuple[Any, Any, Any]:
    """The epoch sampler, the training loader (random crops) and the validation loader (whole tiles)."""
    from torch.utils.data import DataLoader

    from cdmap.data import EvalTiles, size_grouped_batches
    from cdmap.train.augment import AugmentConfig
    from cdmap.train.data import EpochSampler, TrainTiles
    from cdmap.train.state import seed_worker

    augment = AugmentConfig(photometric=cfg.photometric) if cfg.augment else None
    train_ds = TrainTiles(splits.train, mean, std, cfg.crop_size, cfg.seed, augment, cfg.ignore_index,
                          cfg.label_coding)
    sampler = EpochSampler(train_ds, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=cfg.seed,
                           drop_last=False)
    loader_kw: dict[str, Any] = {"num_workers": rt.workers, "pin_memory": device.type == "cuda",
                                 "worker_init_fn": seed_worker}
    if rt.workers > 0:
        loader_kw.update(persistent_workers=True, prefetch_factor=4)
    # A last batch of one sample would break BatchNorm at small crops; drop it (the order is shuffled each epoch).
    drop_last = 1 < cfg.batch_size < len(sampler) and len(sampler) % cfg.batch_size == 1
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=drop_last,
                              generator=torch.Generator().manual_seed(cfg.seed), **loader_kw)
    val_ds = EvalTiles(splits.val, mean, std, cfg.ignore_index, cfg.label_coding)
    val_batches = size_grouped_batches(splits.val, rt.val_batch_size, dist.rank, dist.world)
    val_loader = DataLoader(val_ds, batch_sampler=val_batches,
                            generator=torch.Generator().manual_seed(cfg.seed + 1), **loader_kw)
    return sampler, train_loader, val_loader


def _log_setup(s: Session) -> None:
    cfg, world = s.cfg, s.dist.world
    effective = s.accum * cfg.batch_size * world
    precision = str(s.autocast_dtype).replace("torch.", "") if s.autocast_dtype else "fp32"
    accum = f" x {s.accum} accumulation steps" if s.accum > 1 else ""
    s.log(f"model {cfg.backbone}, device {s.device}{f' x{world}' if world > 1 else ''}, precision "
          f"{precision}, effective batch {effective} (batch {cfg.batch_size}{accum}"
          f"{f' x {world} processes' if world > 1 else ''}), {s.rt.workers} loader workers, crop "
          f"{cfg.crop_size}, {cfg.epochs} epochs")
    if effective != cfg.effective_batch:
        s.log(f"note: effective batch {effective} (asked {cfg.effective_batch}; rounded up to whole micro-batches)")
