"""The CMID recipe (:class:`PretrainConfig`, stored in ``last.pt``), how a run executes (:class:`PretrainRuntime`)
and what it did (:class:`PretrainResult`). Plain data: importing this module does not import torch.

Every field of :class:`PretrainConfig` is a ``cdmap pretrain`` option (its ``help`` metadata is the help text).
``None`` means "derived": from the crop size (grid, matches, masked blocks), from the run length (warm-ups, given
as fractions of the run) or from the data (normalisation). :data:`PRESETS` holds the CPU default and a GPU-sized
configuration (spec section 12).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdmap.errors import UsageError
from cdmap.models.config import BACKBONES, backbone_names

MODEL_STRIDE = 32
"""The stride of the last feature map: the crop size must be a multiple of it (one mask block per cell)."""


def _opt(default: Any, help: str) -> Any:  # noqa: A002 - the option's help text
    return field(default=default, metadata={"help": help})


@dataclass
class PretrainConfig:
    """The CMID recipe; defaults are the CPU-sized configuration. See ``docs``: spec ``cmid.md`` sections 3-7."""

    backbone: str = _opt("resnet18", f"Backbone: {backbone_names()}.")
    init: str | None = _opt(None, "Start from 'imagenet' (packaged, EfficientNet-Lite0/1/2), a weights file or a run.")
    epochs: int = _opt(20, "Epochs (every schedule is a fraction of the run).")
    samples_per_epoch: int | None = _opt(None, "Windows per epoch (default: the inputs' area in windows, >= batch).")
    batch_size: int = _opt(16, "Images per step and process.")
    crop_size: int = _opt(128, "Crop side after the random resized crop; a multiple of 32.")
    window_size: int | None = _opt(None, "Side of the random valid window read from a scene (default: crop size).")
    min_valid: float = _opt(0.75, "Least valid fraction of a window; up to --window-tries draws are made.")
    window_tries: int = _opt(10, "Random window draws before falling back to a window known to be valid.")
    crop_scale: tuple[float, float] = _opt((0.3, 1.0), "Random resized crop area range (fraction of the window).")
    mask_ratio: float = _opt(0.6, "Fraction of the 32 px blocks masked per crop (ceil(ratio x blocks)).")
    num_matches: int | None = _opt(None, "Matched cells per crop pair (default: round(0.41 x cells)).")
    queue_size: int = _opt(1024, "MoCo queue length (negatives).")
    proj_hidden: int = _opt(1024, "Global projector hidden width.")
    proj_dim: int = _opt(128, "Global projector output width.")
    local_hidden: int = _opt(512, "Local prototype head hidden width.")
    local_bottleneck: int = _opt(128, "Local head bottleneck width.")
    prototypes: int = _opt(512, "Number of local prototypes K.")
    nce_temperature: float = _opt(0.2, "InfoNCE temperature.")
    student_temperature: float = _opt(0.1, "DINO student temperature.")
    teacher_temperature: tuple[float, float] = _opt((0.04, 0.07), "DINO teacher temperature: start, final.")
    teacher_temp_warmup: float = _opt(0.2, "Teacher-temperature warm-up as a fraction of the epochs (>= 1 epoch).")
    center_momentum: float = _opt(0.9, "DINO centre momentum.")
    ema_momentum: float = _opt(0.996, "Teacher EMA momentum at step 0 (cosine to 1 at the end).")
    focal_alpha: float = _opt(0.2, "Focal-L1 alpha.")
    focal_gamma: float = _opt(1.0, "Focal-L1 gamma.")
    freq_weight: float = _opt(1.0, "Weight of the focal frequency loss in the MIM loss.")
    lr: float = _opt(1e-3, "Peak learning rate (AdamW).")
    min_lr: float = _opt(1e-6, "Cosine floor of the learning rate.")
    weight_decay: float = _opt(0.02, "AdamW weight decay (not on biases and norm weights).")
    lr_warmup: float = _opt(0.05, "Linear lr warm-up as a fraction of the steps (>= one epoch's steps).")
    seed: int = _opt(322, "Seed of the weights, the data order, windows, crops, masks and augmentation.")
    precision: str = _opt("auto", "auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16; losses always in fp32.")
    mean: list[float] | None = _opt(None, "Per-band means (default: measured on sampled windows).")
    std: list[float] | None = _opt(None, "Per-band standard deviations (default: measured).")
    stats_windows: int = _opt(256, "Windows sampled to measure the normalisation and find valid windows.")
    export_teacher: bool = _opt(False, "Also write teacher_backbone.pt (the EMA teacher's backbone).")
    legacy_location: bool = _opt(False, "Match cells as the original code did (offsets ignored); comparisons only.")

    def __post_init__(self) -> None:
        self.crop_scale = tuple(float(v) for v in self.crop_scale)  # type: ignore[assignment]
        self.teacher_temperature = tuple(float(v) for v in self.teacher_temperature)  # type: ignore[assignment]
        checks = [
            (self.backbone in BACKBONES, f"--backbone must be one of {backbone_names()}, not {self.backbone!r}"),
            (self.crop_size >= MODEL_STRIDE and self.crop_size % MODEL_STRIDE == 0,
             f"--crop-size must be a positive multiple of {MODEL_STRIDE} (one mask block per cell), "
             f"got {self.crop_size}"),
            (self.window_size is None or self.window_size >= 8, "--window-size must be >= 8"),
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.batch_size >= 2, "--batch-size must be >= 2 (BatchNorm, in-batch contrast)"),
            (self.samples_per_epoch is None or self.samples_per_epoch >= 1, "--samples-per-epoch must be >= 1"),
            (0 < self.mask_ratio < 1, "--mask-ratio must be between 0 and 1"),
            (0 < self.min_valid <= 1, "--min-valid must be in (0, 1]"),
            (self.window_tries >= 1, "--window-tries must be >= 1"),
            (len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
             "--crop-scale must be two values 0 < lo <= hi <= 1"),
            (len(self.teacher_temperature) == 2 and min(self.teacher_temperature) > 0,
             "--teacher-temperature must be two values > 0"),
            (self.queue_size >= self.batch_size, "--queue-size must be >= --batch-size"),
            (min(self.proj_hidden, self.proj_dim, self.local_hidden, self.local_bottleneck, self.prototypes) >= 1,
             "head widths must be >= 1"),
            (self.lr > 0 and self.min_lr >= 0 and self.weight_decay >= 0, "learning rates must be > 0"),
            (0 <= self.lr_warmup < 1 and 0 <= self.teacher_temp_warmup <= 1, "warm-up fractions must be in [0, 1)"),
            (0 <= self.ema_momentum <= 1 and 0 <= self.center_momentum < 1, "momenta must be in [0, 1]"),
            (self.precision in ("auto", "fp32", "bf16"), "--precision must be auto, fp32 or bf16"),
            (self.stats_windows >= 1, "--stats-windows must be >= 1"),
            ((self.mean is None) == (self.std is None), "--mean and --std must be given together"),
            (self.std is None or all(s > 0 for s in self.std), "--std values must be > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(msg)
        cells = self.grid**2
        if self.num_matches is not None and not 1 <= self.num_matches <= cells:
            raise UsageError(f"--num-matches must be between 1 and {cells} (the cells of a {self.crop_size} px crop)")

    # ----- derived values ----------------------------------------------------------------------------------------
    @property
    def grid(self) -> int:
        """Cells per side of the stride-32 map (= mask blocks per side)."""
        return self.crop_size // MODEL_STRIDE

    @property
    def matches(self) -> int:
        return self.num_matches if self.num_matches is not None else max(1, round(0.41 * self.grid**2))

    @property
    def masked_blocks(self) -> int:
        return math.ceil(self.mask_ratio * self.grid**2)

    @property
    def window(self) -> int:
        return self.window_size or self.crop_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PretrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> PretrainConfig:
        """The ``cpu`` (default) or ``gpu`` configuration with ``overrides`` applied."""
        if name not in PRESETS:
            raise UsageError(f"--preset must be one of {', '.join(PRESETS)}, not {name!r}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {},
    "gpu": {"backbone": "resnet34", "crop_size": 192, "batch_size": 64, "epochs": 100, "queue_size": 16384,
            "proj_hidden": 2048, "proj_dim": 256, "local_hidden": 2048, "local_bottleneck": 256,
            "prototypes": 2048, "lr": 2e-3, "stats_windows": 1024},
}
"""Spec section 12: the CPU smoke-test column (R18 at 128 px) and the small-GPU-run column (R34 at 192 px)."""


@dataclass
class PretrainRuntime:
    """How a run executes; none of it changes the results. ``stop_after_epoch`` applies to one call only."""

    workers: int = 2
    device: str = "auto"
    quiet: bool = False
    overwrite: bool = False
    stop_after_epoch: int | None = None

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise UsageError("--workers must be >= 0")
        if self.stop_after_epoch is not None and self.stop_after_epoch < 1:
            raise UsageError("--stop-after must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PretrainResult:
    """What a pretraining call did."""

    run_dir: Path
    backbone_path: Path
    last_path: Path
    epochs_completed: int
    finished: bool
    history: list[dict[str, float]] = field(default_factory=list)
