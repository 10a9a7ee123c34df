"""What a training run is made of: the recipe (:class:`TrainConfig`, stored in every checkpoint), how it runs
(:class:`TrainRuntime`: workers, device, output and stopping; never changes the results) and what it did
(:class:`TrainResult`)."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any

from cdmap.errors import UsageError
from cdmap.models.config import BACKBONES, DEFAULT_BACKBONE, backbone_names

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RUNTIME_FIELDS = ("workers", "device", "quiet", "overwrite", "stop_after_epoch", "val_batch_size")
"""The :class:`TrainRuntime` fields (keyword overrides of :func:`cdmap.train.train` and ``resume``)."""


def _raise_first(checks: list[tuple[bool, str]]) -> None:
    for ok, msg in checks:
        if not ok:
            raise UsageError(msg)


class _Plain:
    """``to_dict``/``from_dict`` (unknown keys ignored) for the dataclasses below."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in known})


def default_workers() -> int:
    """DataLoader processes that fit this machine: one per usable core but one (the main process), at most 8."""
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(0, min(8, cores - 1))


@dataclass
class TrainRuntime(_Plain):
    """How a run executes; none of it changes the results, and all of it may change on resume.

    ``workers`` (DataLoader processes) defaults to :func:`default_workers`. ``stop_after_epoch`` applies to one
    call only (resume drops it); ``overwrite`` replaces a previous run in
    the run folder (ignored by resume). The others persist across resume unless overridden.
    """

    workers: int = field(default_factory=default_workers)
    device: str = "auto"
    quiet: bool = False
    overwrite: bool = False
    stop_after_epoch: int | None = None
    val_batch_size: int = 4

    def __post_init__(self) -> None:
        _raise_first([
            (self.workers >= 0, "--workers must be >= 0"),
            (self.val_batch_size >= 1, "--val-batch-size must be >= 1"),
            (self.stop_after_epoch is None or self.stop_after_epoch >= 1, "--stop-after must be >= 1"),
        ])

    def with_overrides(self, overrides: dict[str, Any]) -> TrainRuntime:
        """A copy with ``overrides`` (``RUNTIME_FIELDS`` keywords) applied; unknown names raise TypeError."""
        unknown = set(overrides) - set(RUNTIME_FIELDS)
        if unknown:
            raise TypeError(f"unknown runtime option(s) {', '.join(sorted(unknown))}; allowed: "
                            f"{', '.join(RUNTIME_FIELDS)}")
        return dataclasses.replace(self, **overrides)


@dataclass
class TrainConfig(_Plain):
    """The training recipe; the defaults are the reference recipe. ``None`` means "derive it".

    Stored in every ``last.pt``; resume reuses it unchanged. The runtime keywords (``workers``, ``device``,
    ``quiet``, ``overwrite``, ``stop_after_epoch``, ``val_batch_size``) are still accepted here for older
    callers, with a DeprecationWarning; pass them to :func:`cdmap.train.train` (or a :class:`TrainRuntime`).
    """

    epochs: int = 100
    lr: float = 1e-3
    backbone_lr: float = 1e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.01
    batch_size: int = 32
    effective_batch: int | None = None
    """Pairs per optimiser update; ``None``: the batch size (no gradient accumulation)."""
    crop_size: int = 256
    seed: int = 2025
    backbone: str = DEFAULT_BACKBONE
    backbone_weights: str | None = None
    imagenet: bool = True
    in_channels: int | None = None
    precision: str = "auto"
    channels_last: bool | None = None
    augment: bool = True
    photometric: float = 0.0
    """Probability of the photometric jitter per date (0: the reference recipe, which has none)."""
    val_fraction: float | None = None
    ignore_index: int | None = None
    label_values: list[int] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    dropblock_prob: float | None = None
    dropblock_start_epoch: int = 1
    dropblock_end_epoch: int = 30
    hist_bins: int = 256
    select_by: str = "f1_calibrated"

    workers: InitVar[int | None] = None
    device: InitVar[str | None] = None
    quiet: InitVar[bool | None] = None
    overwrite: InitVar[bool | None] = None
    stop_after_epoch: InitVar[int | None] = None
    val_batch_size: InitVar[int | None] = None

    def __post_init__(self, *runtime: Any) -> None:
        legacy = {k: v for k, v in zip(RUNTIME_FIELDS, runtime, strict=True) if v is not None}
        if legacy:
            warnings.warn(f"TrainConfig({', '.join(legacy)}=...) is deprecated: pass runtime options to "
                          "cdmap.train.train(..., runtime=TrainRuntime(...)) or as keywords", DeprecationWarning,
                          stacklevel=3)
        self.legacy_runtime: dict[str, Any] = legacy
        if self.effective_batch is None:
            self.effective_batch = self.batch_size
        """Runtime keywords given to the constructor (deprecated); :func:`cdmap.train.train` applies them."""
        checks = [
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.lr > 0 and self.backbone_lr >= 0 and self.min_lr >= 0, "learning rates must be > 0"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.effective_batch >= 1, "--effective-batch must be >= 1"),
            (self.crop_size >= 8, "--crop-size must be >= 8"),
            (self.in_channels is None or self.in_channels >= 1, "--in-channels must be >= 1"),
            (self.dropblock_prob is None or 0 <= self.dropblock_prob < 1, "dropblock probability must be in [0, 1)"),
            (0 <= self.photometric <= 1, "--photometric must be between 0 and 1"),
            (self.hist_bins >= 2, "hist_bins must be >= 2"),
            (self.select_by in ("f1", "f1_calibrated"), "--select-by must be f1 or f1_calibrated"),
            (self.precision in PRECISIONS, f"--precision must be auto, fp32, bf16 or fp16, not {self.precision!r}"),
            (self.backbone in BACKBONES, f"--backbone must be one of {backbone_names()}, not {self.backbone!r}"),
        ]
        _raise_first(checks)
        if self.batch_size == 1 and self.crop_size < 64:
            raise UsageError("--batch-size 1 needs --crop-size >= 64 (BatchNorm needs more than one value per "
                             "channel at the deepest level)")
        if self.label_values is not None:
            from cdmap.labels import parse_label_values

            self.label_values = list(parse_label_values(self.label_values) or ())
        if (self.mean is None) != (self.std is None):
            raise UsageError("--mean and --std must be given together")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise UsageError("--std values must be > 0")
        if self.mean is not None and len(self.mean) != len(self.std):
            raise UsageError("--mean and --std need the same number of values")

    @property
    def label_coding(self) -> tuple[int, int] | None:
        """``label_values`` as (no change, change), or None for 0/1 and 0/255 labels."""
        return None if self.label_values is None else (self.label_values[0], self.label_values[1])


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
