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

Files in the run folder (written by rank 0 only): ``metrics.csv`` (one row per epoch), ``training.png`` (its loss
and F1 curves, when matplotlib is installed), ``best.pt``, ``last.pt`` (the full training state for :func:`resume`)
and ``config.json`` (the recipe, the runtime and the absolute data folders).

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
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cdmap import process
from cdmap.distributed import init_distributed
from cdmap.errors import Interrupted, ResumeError, UsageError
from cdmap.files import replaced_atomically
from cdmap.train.build import Session, build, data_dirs
from cdmap.train.config import TrainConfig, TrainResult, TrainRuntime
from cdmap.train.state import dropblock_schedule, rng_state, set_rng_state, to_cpu

CSV_FIELDS = (
    "epoch", "lr", "train_loss", "val_precision", "val_recall", "val_f1", "val_iou", "seconds", "pairs_per_s",
    "val_threshold", "val_f1_calibrated", "dropblock_p",
)
PLAIN_INTERVAL_S = 60.0
"""Seconds between progress lines within an epoch when stderr is not a terminal."""


# ----- the two entry points ------------------------------------------------------------------------------------
def train(
    data_dir: str | os.PathLike | list[str | os.PathLike],
    run_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    runtime: TrainRuntime | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train FSG-Net on ``data_dir`` (LEVIR-CD layout or flat A/B/label; or a list of such folders, trained on
    together) into ``run_dir`` with ``config``.

    ``runtime`` (and keyword ``overrides`` of its fields: ``workers``, ``device``, ``quiet``, ``overwrite``,
    ``stop_after_epoch``, ``val_batch_size``) says how to run; it changes nothing in the results. Under
    ``torchrun`` (WORLD_SIZE > 1) training uses DistributedDataParallel (nccl on CUDA, gloo on CPU); only rank 0
    writes files and prints. Continue a stopped run with :func:`resume`.
    """
    if "resume" in overrides:
        raise TypeError("train() no longer resumes: call cdmap.train.resume(run_dir)")
    if data_dir is None:
        raise UsageError("a data folder is needed (or resume an existing run)")
    cfg = config or TrainConfig()
    rt = (runtime or TrainRuntime()).with_overrides({**cfg.legacy_runtime, **overrides})
    return _run(data_dirs(data_dir), Path(run_dir), cfg, rt, None)


def resume(
    run_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    runtime: TrainRuntime | None = None,
    **overrides: Any,
) -> TrainResult:
    """Continue the run in ``run_dir`` from its ``last.pt``, bit-exactly (same device and threads).

    Model, optimiser, scheduler, grad scaler, epoch, RNG states and history are restored and the stored recipe
    is used. ``data_dir`` defaults to the stored path. The stored runtime is reused (``stop_after_epoch``
    dropped) unless ``runtime`` is given; keyword ``overrides`` change single fields of it.
    """
    from cdmap.checkpoint import load_checkpoint

    run_dir = Path(run_dir)
    last = run_dir / "last.pt"
    if not last.exists():
        raise ResumeError("nothing to resume: no last.pt in the run folder", run_dir)
    ckpt = load_checkpoint(last)
    state = ckpt.training_state
    if not state or "config" not in state:
        raise ResumeError("last.pt holds no training state (was it written by cdmap train?)", last)
    cfg = TrainConfig.from_dict(state["config"])
    if state["epoch"] >= cfg.epochs:
        raise ResumeError(f"the run already completed all {cfg.epochs} epochs", run_dir)
    if runtime is None:  # older runs stored the runtime fields inside the configuration
        stored = TrainRuntime.from_dict(state.get("runtime") or state["config"])
        runtime = dataclasses.replace(stored, stop_after_epoch=None, overwrite=False)
    rt = runtime.with_overrides(overrides)
    data = data_dir if data_dir is not None else state.get("data_dirs") or state.get("data_dir")
    return _run(data_dirs(data), run_dir, cfg, rt, ckpt)


def _run(dirs: list[Path], run_dir: Path, cfg: TrainConfig, rt: TrainRuntime, ckpt: Any) -> TrainResult:
    """Build the session, run its epochs, report."""
    dist = init_distributed(rt.device)
    try:
        s = build(dirs, run_dir, cfg, rt, dist, ckpt)
        if ckpt is not None:
            rng = ckpt.training_state.get("rng_per_rank") or [ckpt.training_state.get("rng")]
            set_rng_state(rng[min(dist.rank, len(rng) - 1)])
        start = s.progress.start_epoch
        stop_at = s.cfg.epochs if rt.stop_after_epoch is None else min(s.cfg.epochs, rt.stop_after_epoch)
        with process.worker_errors():
            for epoch in range(start, stop_at):
                _epoch(s, epoch)
        if stop_at == s.cfg.epochs and s.dist.main and s.splits.val:
            _calibrate_seams(s)
        return _result(s, max(start, stop_at))
    except Interrupted as exc:
        raise exc.with_hint(_interrupted_hint(run_dir)) from None
    finally:
        dist.close()


def _calibrate_seams(s: Session) -> None:
    """Measure the window overlap and margin of the checkpoint to predict with (``best.pt``, else ``last.pt``)
    on validation tiles (:mod:`cdmap.calibrate`)."""
    from cdmap.calibrate import calibrate_file

    best = s.run_dir / "best.pt"
    calibrate_file(best if best.exists() else s.run_dir / "last.pt", s.splits.val, s.device, s.cfg.precision)


def _interrupted_hint(run_dir: Path) -> str:
    """What an interrupted training run kept: ``last.pt`` is only ever replaced whole, after an epoch."""
    last = run_dir / "last.pt"
    if not last.exists():
        return "no epoch had finished, nothing was kept"
    return f"{last} of the last finished epoch kept; continue with: cdmap train --resume {run_dir}"


def _result(s: Session, completed: int) -> TrainResult:
    finished = completed >= s.cfg.epochs
    if not finished:
        s.log(f"stopped after epoch {completed}/{s.cfg.epochs}; continue with: cdmap train --resume {s.run_dir}")
    best, best_path = s.progress.best, s.run_dir / "best.pt"
    return TrainResult(run_dir=s.run_dir, best_path=best_path if best_path.exists() else None,
                       last_path=s.run_dir / "last.pt", epochs_completed=completed, best_epoch=int(best["epoch"]),
                       best_f1=float(best["f1"]), threshold=float(best["threshold"]), history=s.progress.history,
                       finished=finished, model=s.model)


# ----- one epoch: train, validate, save ------------------------------------------------------------------------
def _epoch(s: Session, epoch: int) -> None:
    from cdmap.metrics import ConfusionCounts, best_threshold

    t0 = time.perf_counter()
    s.sampler.set_epoch(epoch)
    p_drop = dropblock_schedule(epoch, s.mcfg.dropblock_prob, s.cfg.dropblock_start_epoch, s.cfg.dropblock_end_epoch)
    s.model.set_dropblock_prob(p_drop)
    lr_now = s.optim.optimizer.param_groups[0]["lr"]
    loss_sum, n_seen = _train_epoch(s, epoch, t0)
    train_seconds = time.perf_counter() - t0
    s.optim.scheduler.step()

    totals = torch.tensor([loss_sum, float(n_seen)], dtype=torch.float64, device=s.device)
    s.dist.broadcast_buffers(s.model)  # every rank validates (and rank 0 saves) rank 0's BatchNorm statistics
    pos, neg = _validate(s)
    s.dist.sum(totals, pos, neg)
    pos_np, neg_np = pos.cpu().numpy(), neg.cpu().numpy()
    counts = ConfusionCounts.from_histograms(pos_np, neg_np, s.cfg.hist_bins // 2)
    thr, calibrated = best_threshold(pos_np, neg_np)
    row = {
        "epoch": epoch + 1, "lr": float(lr_now), "train_loss": float(totals[0] / max(totals[1].item(), 1)),
        "val_precision": counts.precision, "val_recall": counts.recall, "val_f1": counts.f1,
        "val_iou": counts.iou, "seconds": time.perf_counter() - t0,
        "pairs_per_s": float(totals[1]) / max(train_seconds, 1e-9),
        "val_threshold": thr, "val_f1_calibrated": calibrated.f1, "dropblock_p": p_drop,
    }
    s.progress.history.append(row)
    score = calibrated.f1 if s.cfg.select_by == "f1_calibrated" else counts.f1
    improved = score > s.progress.best["f1"]
    if improved:
        s.progress.best = {"f1": score, "epoch": epoch + 1, "threshold": thr}
    rng_all = s.dist.gather(to_cpu(rng_state()) if s.dist.world > 1 else rng_state())
    if s.dist.main:
        metrics = {"val_f1": counts.f1, "val_precision": counts.precision, "val_recall": counts.recall,
                   "val_iou": counts.iou, "val_oa": counts.oa, "val_kappa": counts.kappa,
                   "val_f1_calibrated": calibrated.f1, "epoch": float(epoch + 1)}
        _save(s, epoch, thr, metrics, rng_all, improved)
        s.log(f"epoch {epoch + 1}/{s.cfg.epochs}: loss {row['train_loss']:.4f}, val P {counts.precision:.4f} "
              f"R {counts.recall:.4f} F1 {counts.f1:.4f} IoU {counts.iou:.4f} (F1 {calibrated.f1:.4f} at "
              f"threshold {thr:.3f}), {row['pairs_per_s']:.1f} pairs/s, {row['seconds']:.1f} s"
              + (" *best*" if improved else ""))
    s.dist.barrier()


def _train_epoch(s: Session, epoch: int, t0: float) -> tuple[float, int]:
    """One pass over the training loader with gradient accumulation; the summed loss and the sample count."""
    net, optim, device = s.net, s.optim, s.device
    net.train()
    n_batches = len(s.train_loader)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_seen = 0
    bar = _Bar(s, epoch, n_batches, t0)
    optim.optimizer.zero_grad(set_to_none=True)
    for i, (a, b, label) in enumerate(s.train_loader):
        process.fault_point("batch")
        a = a.to(device, non_blocking=True)
        b = b.to(device, non_blocking=True)
        label = label.to(device, non_blocking=True)
        if s.channels_last:
            a = a.contiguous(memory_format=torch.channels_last)
            b = b.contiguous(memory_format=torch.channels_last)
        group = i // s.accum
        group_size = min(s.accum, n_batches - group * s.accum)
        step_now = (i + 1) % s.accum == 0 or i + 1 == n_batches
        sync_ctx = net.no_sync() if (s.dist.world > 1 and not step_now) else contextlib.nullcontext()
        with sync_ctx:
            with _autocast(device, s.autocast_dtype):
                logits = net(a, b)
            loss = optim.criterion(logits, label)
            optim.scaler.scale(loss / group_size).backward()
        if step_now:
            optim.scaler.step(optim.optimizer)
            optim.scaler.update()
            optim.optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach().double() * a.shape[0]
        n_seen += a.shape[0]
        bar.update(i, loss_sum, n_seen)
    bar.close()
    return loss_sum.item(), n_seen


class _Bar:
    """Within-epoch progress: a tqdm bar on a terminal, else a plain line every :data:`PLAIN_INTERVAL_S`."""

    def __init__(self, s: Session, epoch: int, n_batches: int, t0: float) -> None:
        self.log, self.world, self.n, self.t0, self.last_line = s.log, s.dist.world, n_batches, t0, t0
        self.desc = f"epoch {epoch + 1}/{s.cfg.epochs}"
        self.bar = None
        if sys.stderr.isatty() and s.log.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=n_batches, desc=self.desc, unit="batch", file=sys.stderr, dynamic_ncols=True,
                            leave=False)

    def update(self, i: int, loss_sum: torch.Tensor, n_seen: int) -> None:
        if self.bar is None:
            if self.log.enabled and time.perf_counter() - self.last_line >= PLAIN_INTERVAL_S:
                self.last_line = time.perf_counter()
                self.log(f"{self.desc}: batch {i + 1}/{self.n}, loss {loss_sum.item() / max(n_seen, 1):.4f}, "
                         f"{n_seen * self.world / (self.last_line - self.t0):.1f} pairs/s")
            return
        self.bar.update(1)
        if i % 10 == 0 or i + 1 == self.n:
            dt = time.perf_counter() - self.t0
            self.bar.set_postfix_str(f"loss {loss_sum.item() / max(n_seen, 1):.4f}, "
                                     f"{n_seen * self.world / max(dt, 1e-9):.1f} pairs/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """bf16/fp16 autocast on ``device``, or nothing for float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _validate(s: Session) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class histograms of P(change) over the validation tiles of this rank (int64 tensors on device)."""
    from cdmap.metrics import accumulate_histograms

    bins = s.cfg.hist_bins
    pos = torch.zeros(bins, dtype=torch.int64, device=s.device)
    neg = torch.zeros(bins, dtype=torch.int64, device=s.device)
    for a, b, label, _ in s.val_loader:
        prob = s.predictor.probability(a, b)
        accumulate_histograms(prob, label.to(s.device, non_blocking=True), pos, neg)
    return pos, neg


def _save(s: Session, epoch: int, thr: float, metrics: dict[str, float], rng_all: list[Any],
          improved: bool) -> None:
    """Write ``best.pt`` (when improved), ``last.pt`` with the full training state, and ``metrics.csv``."""
    from cdmap.checkpoint import Checkpoint, save_checkpoint

    cfg, optim = s.cfg, s.optim
    prov = {"train_data": str(s.data_dir), "epoch": epoch + 1, "epochs": cfg.epochs, "seed": cfg.seed,
            "train_pairs": len(s.splits.train), "val_pairs": len(s.splits.val), "world_size": s.dist.world}
    if getattr(s.splits, "gsd_m", None):
        prov["gsd_m"] = s.splits.gsd_m  # the training pixel size range, for predict's fit check
    weights = {k: v.detach().cpu().clone() for k, v in s.model.state_dict().items()}
    common = {"tile_size": cfg.crop_size, "threshold": thr, "metrics": metrics, "provenance": prov}
    if improved:
        save_checkpoint(Checkpoint(s.mcfg, weights, s.mean, s.std, **common), s.run_dir / "best.pt")
    training_state = {
        "epoch": epoch + 1,
        "config": cfg.to_dict(),
        "runtime": s.rt.to_dict(),
        "data_dir": str(s.data_dir),
        "data_dirs": [str(d) for d in s.data_dirs],
        "optimizer": to_cpu(optim.optimizer.state_dict()),
        "scheduler": to_cpu(optim.scheduler.state_dict()),
        "scaler": optim.scaler.state_dict() if optim.use_scaler else {},
        "rng_per_rank": [to_cpu(r) for r in rng_all],
        "best": s.progress.best,
        "history": s.progress.history,
        "world_size": s.dist.world,
    }
    from cdmap.report import TRAINING_PLOT_NAME, write_training_plot

    with process.signals_blocked():  # the run's files change together, never half of them
        save_checkpoint(Checkpoint(s.mcfg, weights, s.mean, s.std, training_state=training_state, **common),
                        s.run_dir / "last.pt")
        _write_csv(s.run_dir / "metrics.csv", s.progress.history)
        with replaced_atomically(s.run_dir / "config.json") as tmp:  # with the first last.pt, not before
            # absolute data paths: ``--resume`` works from any directory
            tmp.write_text(json.dumps({"data_dir": str(s.data_dir), "data_dirs": [str(d) for d in s.data_dirs],
                                       **cfg.to_dict(), "runtime": s.rt.to_dict()}, indent=2))
        # inside the block too: a Ctrl-C raised inside matplotlib's own `except Exception` would be swallowed
        write_training_plot(s.progress.history, s.run_dir / TRAINING_PLOT_NAME)


def _write_csv(path: Path, history: list[dict[str, float]]) -> None:
    with replaced_atomically(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
