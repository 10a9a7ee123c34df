"""What a caller can choose: :class:`PredictOptions` (everything that can change an output byte, recorded in
the resume manifest) and :class:`RunOptions` (how the run behaves, free to differ on ``--resume``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from cdmap.errors import InputError, UsageError
from cdmap.vector.write import check_format_name


@dataclass(frozen=True)
class PredictOptions:
    """Options that decide the outputs; ``None`` means "from the checkpoint" or a documented default.

    ``batch_size`` is here because the windows of a batch go through the network together: batches keep a
    global composition (windows ``[j*B, (j+1)*B)``) so a resume reproduces them, but another batch size can
    change float results in the last bits. ``device``, ``precision`` and ``backend`` likewise (every backend
    matches torch fp32 to about 1e-6, but not to the bit).
    """

    tile_size: int | None = None
    overlap: int | None = None
    batch_size: int = 4
    device: str = "auto"
    precision: str = "auto"
    backend: str = "auto"
    bands: list[int] | None = None
    threshold: float | None = None
    min_area: float = 0.0
    simplify: float = 0.0
    prob_dtype: str = "uint8"
    vector_format: str = "gpkg"
    creation_options: dict[str, str] = field(default_factory=dict)
    cog: bool = False
    align: str = "auto"
    resampling: str = "bilinear"
    allow_no_crs: bool = False

    def check(self) -> None:
        """Raise :class:`UsageError` for a value no run could use (tile sizes are checked by the plan)."""
        if self.prob_dtype not in ("uint8", "float32"):
            raise UsageError(f"--prob-dtype must be uint8 or float32, not {self.prob_dtype!r}")
        check_format_name(self.vector_format, extra=("none",))
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise UsageError(f"--precision must be auto, fp32, bf16 or fp16, not {self.precision!r}")
        from cdmap.backends import validate as validate_backend

        validate_backend(self.backend)
        if self.batch_size < 1:
            raise UsageError("--batch-size must be >= 1")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise UsageError(f"--threshold must be between 0 and 1, not {self.threshold}")
        for name, value in (("--min-area", self.min_area), ("--simplify", self.simplify)):
            if not math.isfinite(value) or value < 0:
                raise UsageError(f"{name} must be a finite number >= 0, not {value}")
        if self.align not in ("auto", "strict"):
            raise UsageError(f"--align must be auto or strict, not {self.align!r}")
        self._check_environment()

    def _check_environment(self) -> None:
        """The checks that need rasterio or torch: resampling name, GDAL creation options, device."""
        from rasterio.enums import Resampling

        from cdmap.device import resolve_device
        from cdmap.raster.write import check_creation_options

        if self.resampling not in Resampling.__members__:
            raise UsageError(f"--resampling {self.resampling!r} is not a GDAL resampling method "
                             "(nearest, bilinear, cubic, average...)")
        check_creation_options(self.creation_options)
        resolve_device(self.device)


@dataclass(frozen=True)
class RunOptions:
    """Options that never change an output byte: reader threads, notes, replacing outputs, resuming, how long a
    rank of a torchrun job waits for the others (``rank_timeout``, seconds), and the outputs made from the
    finished rasters (``report``: preview.png and report.html; ``zones``: a polygon file whose per-zone changed
    area goes to change_by_zone.csv/.gpkg)."""

    workers: int = 2
    quiet: bool = False
    overwrite: bool = False
    resume: bool = False
    rank_timeout: float = 7200.0  # = cdmap.distributed.DEFAULT_TIMEOUT_S (not imported: it pulls in torch)
    report: bool = True
    zones: str | None = None

    def check(self) -> None:
        """Raise :class:`UsageError` for an unusable value."""
        if self.workers < 1:
            raise UsageError("--workers must be >= 1")
        if self.rank_timeout <= 0:
            raise UsageError("--rank-timeout must be > 0 seconds")
        if self.zones is not None and not Path(self.zones).is_file():
            raise InputError("zones file not found", Path(self.zones))


_PREDICT_FIELDS = {f.name for f in fields(PredictOptions)}
_RUN_FIELDS = {f.name for f in fields(RunOptions)}


def split_overrides(options: PredictOptions | None, run: RunOptions | None,
                    overrides: dict[str, Any]) -> tuple[PredictOptions, RunOptions]:
    """``options`` and ``run`` with each keyword of ``overrides`` applied to the class that has the field."""
    unknown = sorted(set(overrides) - _PREDICT_FIELDS - _RUN_FIELDS)
    if unknown:
        raise TypeError(f"predict_scene() got an unexpected keyword argument {unknown[0]!r}")
    opts = replace(options or PredictOptions(), **{k: v for k, v in overrides.items() if k in _PREDICT_FIELDS})
    run = replace(run or RunOptions(), **{k: v for k, v in overrides.items() if k in _RUN_FIELDS})
    return opts, run
