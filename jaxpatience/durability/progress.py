"""Progress of long work: a tqdm bar on a terminal (a widget in a notebook), plain periodic lines in a log.

tqdm redraws its bar in place with carriage returns; written to a file (`make demo > demo.log`, a SLURM log) that
is thousands of redraws on one line. So when stderr is not a terminal, `bar` returns a `LogBar`: the same calls
(update, set_postfix, close), printed as one line every `every` seconds and once at the end:

    train: 120/600 step (20%), 2.4 step/s, 3m20s left, loss=0.2450
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm.auto import tqdm  # a notebook's widget, a terminal's bar


def bar(total: int, *, desc: str, unit: str, initial: int = 0, enabled: bool = True, every: float = 30.0) -> Any:
    """A progress bar over `total` units: tqdm on a terminal or in a notebook, a LogBar otherwise; disabled, one that
    prints nothing."""
    if enabled and (sys.stderr.isatty() or "ipykernel" in sys.modules):
        return tqdm(total=total, initial=initial, desc=desc, unit=unit)
    return LogBar(total, desc=desc, unit=unit, initial=initial, enabled=enabled, every=every)


class LogBar:
    """tqdm's update / set_postfix / close, as a line on stderr at most every `every` seconds, and at close."""

    def __init__(
        self, total: int, *, desc: str, unit: str, initial: int = 0, enabled: bool = True, every: float = 30.0
    ):
        self.total, self.desc, self.unit, self.enabled, self.every = total, desc, unit, enabled, every
        self.n = self.start_n = initial
        self.postfix = ""
        self.start = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.enabled and time.perf_counter() - self.last >= self.every:
            self._print()

    def set_postfix(self, values: dict | None = None, refresh: bool = True, **kwargs) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in {**(values or {}), **kwargs}.items())

    def close(self) -> None:
        if self.enabled and self.n > self.start_n:
            self._print()
        self.enabled = False  # a second close prints nothing

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        parts = [
            f"{self.desc}: {self.n}/{self.total} {self.unit}" + (f" ({self.n / self.total:.0%})" if self.total else "")
        ]
        if rate > 0:
            parts.append(f"{rate:.1f} {self.unit}/s")
            if self.n < self.total:
                parts.append(f"{_duration((self.total - self.n) / rate)} left")
        return ", ".join(parts + ([self.postfix] if self.postfix else []))

    def _print(self) -> None:
        print(self.line(), file=sys.stderr, flush=True)
        self.last = time.perf_counter()


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"
