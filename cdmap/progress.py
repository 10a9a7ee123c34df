"""Progress on stderr: a tqdm bar on a terminal, plain periodic lines otherwise, nothing when quiet."""

from __future__ import annotations

import sys
import time


class Progress:
    """Counts windows (or any unit) and shows rate in MPix/s and an ETA."""

    def __init__(self, total: int, desc: str, *, unit: str = "win", pixels_per_unit: float = 0.0,
                 quiet: bool = False, initial: int = 0, plain_interval: float = 10.0) -> None:
        self.total, self.desc, self.quiet = total, desc, quiet
        self.pixels_per_unit = pixels_per_unit
        self.n = initial
        self._start = time.perf_counter()
        self._start_n = initial
        self._bar = None
        self._last_line = 0.0
        self._interval = plain_interval
        if quiet:
            return
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr,
                             dynamic_ncols=True, smoothing=0.1)

    def _mpix(self) -> float:
        dt = time.perf_counter() - self._start
        return (self.n - self._start_n) * self.pixels_per_unit / 1e6 / dt if dt > 0 else 0.0

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.update(k)
            if self.pixels_per_unit:
                self._bar.set_postfix_str(f"{self._mpix():.2f} MPix/s", refresh=False)
            return
        now = time.perf_counter()
        if now - self._last_line >= self._interval or self.n >= self.total:
            self._last_line = now
            done = self.n - self._start_n
            dt = now - self._start
            eta = (self.total - self.n) * dt / done if done else float("nan")
            print(f"{self.desc}: {self.n}/{self.total} ({100.0 * self.n / max(self.total, 1):.0f}%), "
                  f"{self._mpix():.2f} MPix/s, ETA {eta:.0f} s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
