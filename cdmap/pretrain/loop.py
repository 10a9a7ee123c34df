"""The CMID pretraining loop: :func:`pretrain` and :func:`resume` (bit-exact, as training is).

One step (spec 2): masked views to the student, clean views to the EMA teacher, MIM + global + local losses
(unit weights, float32), an AdamW step at the per-step lr, the EMA update of the teacher (after the optimiser
step, spec 3.2), then the teacher keys of B and A are enqueued (gathered over processes under ``torchrun``) and
the DINO centre follows each local-loss call (all-reduced). Every epoch ends with ``last.pt``, ``backbone.pt``
and a ``metrics.csv`` row; only rank 0 writes.

The data order and every window, crop, mask and augmentation depend only on (seed, epoch, sample index), so a
resumed run continues bit-exactly on the same device, thread count and process count.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cdmap.distributed import Dist, init_distributed
from cdmap.errors import OutputError, ResumeError
from cdmap.pretrain.config import PretrainConfig, PretrainResult, PretrainRuntime
from cdmap.train.state import rng_state, set_rng_state, to_cpu

log = logging.getLogger("cdmap")

RUN_FILES = ("last.pt", "backbone.pt", "teacher_backbone.pt", "metrics.csv", "config.json")
LOSS_TERMS = ("loss", "mim_spatial", "mim_freq", "global", "local", "feature_std", "teacher_entropy")
CSV_FIELDS = ("epoch", *LOSS_TERMS, "center_norm", "lr", "ema_momentum", "teacher_temp", "images_per_s", "seconds")


# ----- entry points --------------------------------------------------------------------------------------------
def pretrain(data: list[str | os.PathLike] | str | os.PathLike, run_dir: str | os.PathLike,
             config: PretrainConfig | None = None, runtime: PretrainRuntime | None = None) -> PretrainResult:
    """CMID-pretrain a backbone on the unlabelled images ``data`` (files and folders, see
    :mod:`cdmap.pretrain.sources`) into ``run_dir`` (``backbone.pt``, ``last.pt``, ``metrics.csv``,
    ``config.json``). Under ``torchrun`` (WORLD_SIZE > 1) the student runs in DistributedDataParallel."""
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    return _run([str(p) for p in items], Path(run_dir), config or PretrainConfig(), runtime or PretrainRuntime(),
                None)


def resume(run_dir: str | os.PathLike, runtime: PretrainRuntime | None = None) -> PretrainResult:
    """Continue the run in ``run_dir`` from ``last.pt`` with its stored recipe, data and runtime
    (``stop_after_epoch`` dropped unless ``runtime`` is given)."""
    from cdmap.pretrain.export import STATE_FORMAT, read_payload

    run_dir = Path(run_dir)
    if not (run_dir / "last.pt").exists():
        raise ResumeError("nothing to resume: no last.pt in the run folder", run_dir)
    state = read_payload(run_dir / "last.pt", STATE_FORMAT)
    cfg = PretrainConfig.from_dict(state["config"])
    if state["epoch"] >= cfg.epochs:
        raise ResumeError(f"the run already completed all {cfg.epochs} epochs", run_dir)
    if runtime is None:
        runtime = dataclasses.replace(PretrainRuntime(**state["runtime"]), stop_after_epoch=None, overwrite=False)
    return _run(list(state["data"]), run_dir, cfg, runtime, state)


# ----- the session ---------------------------------------------------------------------------------------------
@dataclass
class Session:
    cfg: PretrainConfig
    rt: PretrainRuntime
    data: list[str]
    run_dir: Path
    dist: Dist
    device: torch.device
    dtype: torch.dtype | None
    sources: list[Any]
    mean: list[float]
    std: list[float]
    student: Any
    net: Any
    teacher: Any
    optimizer: torch.optim.Optimizer
    sampler: Any
    loader: Any
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    start_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def _prepare_run_dir(run_dir: Path, overwrite: bool, main: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputError("run folder path exists and is not a folder", run_dir)
    if (run_dir / "last.pt").exists() and not overwrite:
        raise OutputError("already holds a pretraining run; continue it with --resume or pass --overwrite", run_dir)
    if main:
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create run folder: {exc.strerror or exc}", run_dir) from exc


def _sources(data: list[str], cfg: PretrainConfig, dist: Dist, state: dict | None):
    from cdmap.pretrain.sources import ImageSource, find_images, measure, open_sources

    if state is not None:
        return [ImageSource(**{**s, "valid_origins": [tuple(o) for o in s["valid_origins"]]})
                for s in state["sources"]], list(state["mean"]), list(state["std"])
    result = None
    if dist.main:
        t0 = time.perf_counter()
        sources = open_sources(find_images(data), cfg.crop_size)
        if cfg.mean is not None and len(cfg.mean) != sources[0].bands:
            from cdmap.errors import UsageError

            raise UsageError(f"--mean/--std have {len(cfg.mean)} values but the images have {sources[0].bands} bands")
        mean, std = measure(sources, cfg.window, cfg.stats_windows, cfg.min_valid, cfg.seed)
        if cfg.mean is not None:
            mean, std = list(cfg.mean), list(cfg.std)
        log.info("%d image(s), %d band(s); normalisation from %d windows (%.1f s): mean %s, std %s", len(sources),
                 sources[0].bands, cfg.stats_windows, time.perf_counter() - t0, [round(m, 3) for m in mean],
                 [round(s, 3) for s in std])
        result = (sources, mean, std)
    return dist.gather(result)[0] if dist.world > 1 else result


def _build(data: list[str], run_dir: Path, cfg: PretrainConfig, rt: PretrainRuntime, dist: Dist,
           state: dict | None) -> Session:
    from torch.utils.data import DataLoader

    from cdmap.device import autocast_dtype, resolve_device, resolve_precision
    from cdmap.inference import Normalisation
    from cdmap.pretrain.export import init_weights
    from cdmap.pretrain.model import Student, Teacher, build_full_backbone
    from cdmap.pretrain.sources import WindowSampler
    from cdmap.pretrain.views import CMIDViews
    from cdmap.train.data import EpochSampler
    from cdmap.train.state import seed_worker

    if state is None:
        _prepare_run_dir(run_dir, rt.overwrite, dist.main)
    dist.barrier()
    device = resolve_device(rt.device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
    dtype = autocast_dtype(resolve_precision(cfg.precision, device))
    sources, mean, std = _sources(data, cfg, dist, state)
    bands = sources[0].bands

    torch.manual_seed(cfg.seed)
    backbone = build_full_backbone(cfg.backbone, bands)
    if cfg.init and state is None:
        report = init_weights(backbone, cfg.backbone, cfg.init)
        if dist.main:
            log.info("%s", report)
    student = Student(backbone, cfg, bands)
    teacher = Teacher(student, cfg, torch.Generator().manual_seed(cfg.seed + 1))
    if state is not None:
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
    if device.type == "cuda" and dist.world > 1:  # SyncBN everywhere (spec 7); gloo/CPU has no SyncBN kernel
        student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = torch.nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    student.to(device)
    teacher.to(device)
    teacher.train()
    decay, no_decay = [], []
    for p in student.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)  # biases and norm weights; the 4-D mask token is decayed
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    net = student
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(student, device_ids=[device.index] if device.type == "cuda" else None)

    window_sampler = WindowSampler(sources, cfg.window, cfg.min_valid, cfg.window_tries)
    length = max(cfg.samples_per_epoch or window_sampler.natural_length, cfg.batch_size * dist.world)
    dataset = CMIDViews(window_sampler, Normalisation.of(mean, std), cfg, length)
    sampler = EpochSampler(dataset, dist.world, dist.rank, shuffle=True, seed=cfg.seed, drop_last=True)
    parallel: dict[str, Any] = {"persistent_workers": True, "prefetch_factor": 4} if rt.workers else {}
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, num_workers=rt.workers,
                        pin_memory=device.type == "cuda", worker_init_fn=seed_worker, **parallel)
    steps = len(sampler) // cfg.batch_size
    from cdmap.pretrain.schedule import lr_warmup_steps

    s = Session(cfg, rt, data, run_dir, dist, device, dtype, sources, mean, std, student, net, teacher, optimizer,
                sampler, loader, steps, steps * cfg.epochs, lr_warmup_steps(cfg.lr_warmup, steps * cfg.epochs, steps))
    if state is not None:
        s.start_epoch, s.history = int(state["epoch"]), [dict(r) for r in state["history"]]
        if int(state.get("world_size", 1)) != dist.world and dist.main:
            log.warning("resumed with %d process(es) but the run used %s; the data order changes from here on",
                        dist.world, state.get("world_size", 1))
        if dist.main:
            log.info("resuming %s after epoch %d/%d", run_dir, s.start_epoch, cfg.epochs)
    if dist.main:
        _log_setup(s)
    return s


def _log_setup(s: Session) -> None:
    cfg, device, dtype, dist, steps = s.cfg, s.device, s.dtype, s.dist, s.steps_per_epoch
    log.info("CMID %s on %s%s, %s, batch %d x %d process(es), crop %d (grid %d, %d masked blocks, %d matches), "
             "%d steps/epoch x %d epochs", cfg.backbone, device, f" x{dist.world}" if dist.world > 1 else "",
             str(dtype).replace("torch.", "") if dtype else "fp32", cfg.batch_size, dist.world, cfg.crop_size,
             cfg.grid, cfg.masked_blocks, cfg.matches, steps, cfg.epochs)


def _run(data: list[str], run_dir: Path, cfg: PretrainConfig, rt: PretrainRuntime, state: dict | None):
    dist = init_distributed(rt.device)
    try:
        s = _build(data, run_dir, cfg, rt, dist, state)
        if dist.main:
            (run_dir / "config.json").write_text(json.dumps(
                {"data": data, **cfg.to_dict(), "runtime": rt.to_dict()}, indent=2))
        if state is not None:
            rngs = state["rng_per_rank"]
            set_rng_state(rngs[min(dist.rank, len(rngs) - 1)])
        stop = cfg.epochs if rt.stop_after_epoch is None else min(cfg.epochs, rt.stop_after_epoch)
        for epoch in range(s.start_epoch, stop):
            _epoch(s, epoch)
        done = max(s.start_epoch, stop)
        if done < cfg.epochs and dist.main:
            log.info("stopped after epoch %d/%d; continue with: cdmap pretrain --resume %s", done, cfg.epochs,
                     run_dir)
        return PretrainResult(run_dir, run_dir / "backbone.pt", run_dir / "last.pt", done, done >= cfg.epochs,
                              s.history)
    finally:
        dist.close()


# ----- one step, one epoch -------------------------------------------------------------------------------------
def _all_mean(dist: Dist):
    def mean(t: torch.Tensor) -> torch.Tensor:
        dist.sum(t)
        return t / dist.world

    return mean


def _gather(dist: Dist, t: torch.Tensor) -> torch.Tensor:
    if dist.world <= 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.world)]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def step_losses(s: Session, batch: dict[str, torch.Tensor], teacher_temp: float) -> dict[str, torch.Tensor]:
    """Forward both halves and return every loss term (float32 scalars; ``loss`` is their sum) and indicators."""
    from cdmap.pretrain import losses as L
    from cdmap.pretrain.views import mean_fill

    cfg = s.cfg
    b = {k: v.to(s.device, non_blocking=True) for k, v in batch.items()}
    keep_a, pick_b, _ = L.match_cells(b["loc_a"], b["loc_b"], cfg.matches)
    keep_b, pick_a, _ = L.match_cells(b["loc_b"], b["loc_a"], cfg.matches)
    with torch.autocast(s.device.type, dtype=s.dtype or torch.float32, enabled=s.dtype is not None):
        out = s.net(mean_fill(b["a"], b["mask_a"]), mean_fill(b["b"], b["mask_b"]), b["mask_a"], b["mask_b"],
                    keep_a, keep_b)
        tout = s.teacher(b["a"], b["b"], pick_b, pick_a)
    terms: dict[str, torch.Tensor] = {}
    spatial, freq = [], []
    for v in ("a", "b"):
        pixel = b[f"mask_{v}"].float().repeat_interleave(32, 1).repeat_interleave(32, 2)[:, None]
        pixel = pixel * b[f"valid_{v}"][:, None].float()
        spatial.append(L.focal_l1(out[f"recon_{v}"], b[v], pixel, cfg.focal_alpha, cfg.focal_gamma))
        freq.append(L.focal_frequency(out[f"recon_{v}"], b[v], pixel))
    terms["mim_spatial"] = (spatial[0] + spatial[1]) / 2
    terms["mim_freq"] = (freq[0] + freq[1]) / 2
    queue = s.teacher.queue.clone()
    terms["global"] = (L.info_nce(out["q_a"], tout["k_b"], queue, cfg.nce_temperature)
                       + L.info_nce(out["q_b"], tout["k_a"], queue, cfg.nce_temperature)) / 2
    local, entropy = [], []
    for sv, tv in (("a", "b"), ("b", "a")):
        t_logits = tout[f"local_{tv}"]
        local.append(L.dino(out[f"local_{sv}"], t_logits, s.teacher.center, cfg.student_temperature, teacher_temp))
        with torch.no_grad():
            p = torch.softmax((t_logits.float() - s.teacher.center) / teacher_temp, dim=1)
            entropy.append(-(p * torch.log(p.clamp_min(1e-12))).sum(1).mean())
        L.update_center(s.teacher.center, t_logits, cfg.center_momentum, _all_mean(s.dist))
    terms["local"] = (local[0] + local[1]) / 2
    terms["loss"] = terms["mim_spatial"] + cfg.freq_weight * terms["mim_freq"] + terms["global"] + terms["local"]
    with torch.no_grad():
        terms["feature_std"] = out["q_a"].detach().float().std(dim=0).mean()
        terms["teacher_entropy"] = (entropy[0] + entropy[1]) / 2
    terms["_keys"] = torch.cat([tout["k_b"], tout["k_a"]]).detach().float()
    return terms


def _epoch(s: Session, epoch: int) -> None:
    from cdmap.pretrain.schedule import ema_momentum, learning_rate, teacher_temperature, warmup_epochs
    from cdmap.progress import Progress

    cfg = s.cfg
    t0 = time.perf_counter()
    s.sampler.set_epoch(epoch)
    s.net.train()
    s.teacher.train()
    t_temp = teacher_temperature(epoch, warmup_epochs(cfg.teacher_temp_warmup, cfg.epochs),
                                 *cfg.teacher_temperature)
    sums = torch.zeros(len(LOSS_TERMS), dtype=torch.float64, device=s.device)
    n_img = s.steps_per_epoch * cfg.batch_size * s.dist.world
    bar = Progress(n_img, f"pretrain epoch {epoch + 1}/{cfg.epochs}", unit="img",
                   pixels_per_unit=cfg.crop_size**2, quiet=s.rt.quiet or not s.dist.main, plain_interval=60.0)
    lr = momentum = 0.0
    for i, batch in enumerate(s.loader):
        step = epoch * s.steps_per_epoch + i
        lr = learning_rate(step, s.total_steps, cfg.lr, cfg.min_lr, s.warmup_steps)
        for group in s.optimizer.param_groups:
            group["lr"] = lr
        terms = step_losses(s, batch, t_temp)
        s.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        s.optimizer.step()
        momentum = ema_momentum(step + 1, s.total_steps, cfg.ema_momentum)
        s.teacher.ema_update(s.student, momentum)
        s.teacher.enqueue(_gather(s.dist, terms.pop("_keys")))
        sums += torch.stack([terms[k].detach().double() for k in LOSS_TERMS])
        bar.update(cfg.batch_size * s.dist.world)
    bar.close()
    seconds = time.perf_counter() - t0
    s.dist.sum(sums)
    means = (sums / max(s.steps_per_epoch * s.dist.world, 1)).tolist()
    row: dict[str, float] = {"epoch": epoch + 1, **dict(zip(LOSS_TERMS, means, strict=True)),
                             "center_norm": float(s.teacher.center.norm()), "lr": lr, "ema_momentum": momentum,
                             "teacher_temp": t_temp, "images_per_s": n_img / max(seconds, 1e-9),
                             "seconds": seconds}
    s.history.append(row)
    if not all(map(lambda v: v == v and abs(v) != float("inf"), means)):
        log.warning("epoch %d: a loss term is not finite (%s); lower --lr or check the inputs", epoch + 1,
                    ", ".join(f"{k} {v:.4g}" for k, v in zip(LOSS_TERMS, means, strict=True)))
    rngs = s.dist.gather(to_cpu(rng_state()))
    if s.dist.main:
        _save(s, epoch, rngs)
        log.info("epoch %d/%d: loss %.4f (MIM %.4f + %.4f, global %.4f, local %.4f), feature std %.4f "
                 "(collapse -> 0; healthy ~%.3f), %.1f img/s, %.1f s", epoch + 1, cfg.epochs, row["loss"],
                 row["mim_spatial"], row["mim_freq"], row["global"], row["local"], row["feature_std"],
                 cfg.proj_dim**-0.5, row["images_per_s"], seconds)
    s.dist.barrier()


def _save(s: Session, epoch: int, rngs: list[Any]) -> None:
    from cdmap.pretrain.export import FORMAT_VERSION, STATE_FORMAT, backbone_payload, write_payload

    cfg = s.cfg
    prov = {"epoch": epoch + 1, "epochs": cfg.epochs, "images": len(s.sources), "seed": cfg.seed,
            "crop_size": cfg.crop_size, "world_size": s.dist.world}
    write_payload(backbone_payload(s.student.encoder.backbone, cfg.backbone, s.mean, s.std, prov),
                  s.run_dir / "backbone.pt")
    if cfg.export_teacher:
        write_payload(backbone_payload(s.teacher.encoder.backbone, cfg.backbone, s.mean, s.std,
                                       {**prov, "network": "teacher"}), s.run_dir / "teacher_backbone.pt")
    state = {
        "format": STATE_FORMAT, "format_version": FORMAT_VERSION, "epoch": epoch + 1,
        "config": cfg.to_dict(), "runtime": s.rt.to_dict(), "data": s.data,
        "sources": [dataclasses.asdict(src) for src in s.sources], "mean": s.mean, "std": s.std,
        "student": to_cpu(s.student.state_dict()), "teacher": to_cpu(s.teacher.state_dict()),
        "optimizer": to_cpu(s.optimizer.state_dict()), "rng_per_rank": rngs, "history": s.history,
        "world_size": s.dist.world,
    }
    write_payload(state, s.run_dir / "last.pt")
    tmp = s.run_dir / ".metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in s.history)
    os.replace(tmp, s.run_dir / "metrics.csv")
