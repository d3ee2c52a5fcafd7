"""Training progress on stderr: a tqdm bar on a terminal, plain lines every few percent in a log file."""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

__all__ = ["Progress"]


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """Progress of steps ``initial + 1 .. total`` (global step numbers, so a resumed run shows ``101/300``).

    When ``stream`` (stderr by default) is a terminal it is a tqdm bar redrawn in place; otherwise (a log file,
    a pipe) it is one plain line ``label step/total (pct%) rate eta postfix`` each time another
    ``every_percent`` of the run is done and after the last step: no carriage returns, a bounded number of
    lines. ``bar`` forces one mode or the other.
    """

    def __init__(
        self,
        total: int,
        initial: int = 0,
        label: str = "train",
        stream: TextIO | None = None,
        every_percent: float = 5.0,
        bar: bool | None = None,
    ) -> None:
        self.total = max(total, 1)
        self.initial = initial
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.interval = max(1, math.ceil(self.total * every_percent / 100))
        self._start = time.perf_counter()
        use_bar = bar if bar is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self._tqdm = None
        if use_bar:
            from tqdm import tqdm

            self._tqdm = tqdm(
                total=self.total, initial=initial, desc=label, file=self.stream, unit="step", dynamic_ncols=True,
                mininterval=0.1,
            )  # fmt: skip

    def update(self, step: int, postfix: str = "") -> None:
        """Record that global step ``step`` is done; ``postfix`` (e.g. the loss) goes at the end of the line."""
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(postfix, refresh=False)
            self._tqdm.update(step - self._tqdm.n)
            return
        if step % self.interval and step != self.total:
            return
        elapsed = time.perf_counter() - self._start
        rate = (step - self.initial) / max(elapsed, 1e-9)
        eta = f" eta {_duration((self.total - step) / rate)}" if 0 < rate and step < self.total else ""
        percent = 100 * step // self.total
        self.stream.write(f"{self.label} {step}/{self.total} ({percent}%) {rate:.2f} steps/s{eta} {postfix}".rstrip())
        self.stream.write("\n")
        self.stream.flush()

    def write(self, line: str) -> None:
        """Print ``line`` on stdout without breaking the bar."""
        if self._tqdm is not None:
            self._tqdm.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        """End the bar (nothing to do for plain lines)."""
        if self._tqdm is not None:
            self._tqdm.close()
