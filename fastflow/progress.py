"""A dependency-free progress bar for training loops."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressBar"]


class ProgressBar:
    """Prints ``label [####....] step/total rate postfix`` in place on ``stream`` (stderr by default)."""

    def __init__(self, total: int, label: str = "", width: int = 30, stream: TextIO | None = None) -> None:
        self.total = max(total, 1)
        self.label = label
        self.width = width
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self._last_draw = 0.0

    def update(self, step: int, postfix: str = "", force: bool = False) -> None:
        """Redraw at ``step`` (at most ten times a second unless ``force``)."""
        now = time.perf_counter()
        if not force and now - self._last_draw < 0.1 and step < self.total:
            return
        self._last_draw = now
        done = int(self.width * step / self.total)
        rate = step / max(now - self.start, 1e-9)
        bar = "#" * done + "." * (self.width - done)
        self.stream.write(f"\r{self.label} [{bar}] {step}/{self.total} {rate:.1f} it/s {postfix}   ")
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line."""
        self.stream.write("\n")
        self.stream.flush()
