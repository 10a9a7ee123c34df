"""Progress on stderr: a tqdm bar on a terminal, a plain line every few seconds otherwise, nothing when quiet.

Rates are shown in the unit that keeps three significant digits (Pix/s, kPix/s, MPix/s) next to windows per
second; the ETA comes from an exponentially smoothed rate (time constant :data:`ETA_TAU_S`), so it is shown from
the first batch on and does not jump with each batch.
"""

from __future__ import annotations

import math
import sys
import time

ETA_TAU_S = 20.0
"""Time constant of the rate smoothing behind the ETA (seconds)."""
PLAIN_INTERVAL_S = 5.0
"""Seconds between plain progress lines when stderr is not a terminal."""


def format_rate(per_s: float, unit: str) -> str:
    """``1234.5, "Pix"`` -> ``"1.23 kPix/s"``: an SI prefix and three significant digits."""
    if not math.isfinite(per_s) or per_s <= 0:
        return f"0 {unit}/s"
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, "")):
        if per_s >= factor:
            return f"{per_s / factor:.3g} {prefix}{unit}/s"
    return f"{per_s:.3g} {unit}/s"


def format_duration(seconds: float) -> str:
    """``83`` -> ``"1:23"``, ``3723`` -> ``"1:02:03"``; ``"?"`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class Progress:
    """Counts windows (or any unit) and shows the pixel rate, units per second and a smoothed ETA."""

    def __init__(self, total: int, desc: str, *, unit: str = "win", pixels_per_unit: float = 0.0,
                 quiet: bool = False, initial: int = 0, plain_interval: float = PLAIN_INTERVAL_S) -> None:
        self.total, self.desc, self.quiet, self.unit = total, desc, quiet, unit
        self.pixels_per_unit = pixels_per_unit
        self.n = initial
        self._start = self._last = time.perf_counter()
        self._start_n = initial
        self._rate: float | None = None  # smoothed units per second
        self._bar = None
        self._last_line = -math.inf
        self._interval = plain_interval
        if quiet:
            return
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr,
                             dynamic_ncols=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| "
                             "{n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    @property
    def rate(self) -> float:
        """Smoothed units per second (0 before the first update)."""
        return self._rate or 0.0

    @property
    def eta_s(self) -> float:
        """Seconds left at the smoothed rate (NaN before the first update)."""
        return (self.total - self.n) / self._rate if self._rate else float("nan")

    def _observe(self, k: int, now: float) -> None:
        dt = max(now - self._last, 1e-9)
        inst = k / dt
        if self._rate is None:
            self._rate = inst
        else:
            w = 1.0 - math.exp(-dt / ETA_TAU_S)
            self._rate = w * inst + (1.0 - w) * self._rate
        self._last = now

    def status(self) -> str:
        """``"3.2 kPix/s, 1.5 win/s, ETA 1:23"``."""
        parts = [format_rate(self.rate * self.pixels_per_unit, "Pix")] if self.pixels_per_unit else []
        parts.append(format_rate(self.rate, self.unit))
        parts.append(f"ETA {format_duration(self.eta_s)}")
        return ", ".join(parts)

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.quiet:
            return
        now = time.perf_counter()
        self._observe(k, now)
        if self._bar is not None:
            self._bar.update(k)
            self._bar.set_postfix_str(self.status(), refresh=False)
            return
        if now - self._last_line >= self._interval or self.n >= self.total:
            self._last_line = now
            print(f"{self.desc}: {self.n}/{self.total} ({100.0 * self.n / max(self.total, 1):.0f}%), "
                  f"{self.status()}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
