"""A one-line progress bar on stderr: images done, rate, time left. Standard library only."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class Progress:
    """``  120/10000 images [#####.....]  43.1 img/s  ETA 3:49`` redrawn in place.

    Shown only when ``enabled`` and ``stream`` is a terminal; otherwise every method is a no-op,
    so logs and pipes stay clean. Redraws at most ``min_interval`` seconds apart.

    Args:
        total: number of inputs to process in this run (skipped inputs excluded).
        stream: where to draw (default ``sys.stderr``).
        enabled: ``False`` for ``--quiet``.
        skipped: inputs already finished by an earlier run (shown, not counted in the rate).
        unit: the noun counted.

    Example:
        >>> with Progress(100, enabled=False) as bar:
        ...     bar.update(10)
    """

    def __init__(
        self,
        total: int,
        *,
        stream: TextIO | None = None,
        enabled: bool = True,
        skipped: int = 0,
        unit: str = "images",
        min_interval: float = 0.1,
        clock=time.monotonic,
    ):
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.active = bool(enabled and isatty is not None and isatty())
        self.total = total
        self.skipped = skipped
        self.unit = unit
        self.done = 0
        self.min_interval = min_interval
        self._clock = clock
        self._start = clock()
        self._last_draw = -float("inf")
        self._width = 0

    def line(self) -> str:
        """The current progress line (without carriage return)."""
        elapsed = max(self._clock() - self._start, 1e-9)
        rate = self.done / elapsed
        total = self.total + self.skipped
        done = self.done + self.skipped
        frac = done / total if total else 1.0
        bar = "#" * int(frac * 20) + "." * (20 - int(frac * 20))
        left = (self.total - self.done) / rate if rate > 0 else None
        eta = _fmt_duration(left) if left is not None else "?"
        text = f"{done:>{len(str(total))}d}/{total} {self.unit} [{bar}] {rate:6.1f}/s"
        text += f"  ETA {eta}" if self.done < self.total else f"  {_fmt_duration(elapsed)}"
        if self.skipped:
            text += f"  ({self.skipped} done before)"
        return text

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.active:
            return
        now = self._clock()
        if now - self._last_draw >= self.min_interval or self.done >= self.total:
            self._draw()
            self._last_draw = now

    def _draw(self) -> None:
        text = self.line()
        pad = " " * max(0, self._width - len(text))
        self._width = len(text)
        self.stream.write("\r" + text + pad)
        self.stream.flush()

    def close(self) -> None:
        if self.active and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0

    def __enter__(self) -> Progress:
        if self.active:
            self._draw()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
