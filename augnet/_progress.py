"""A one-line progress bar on stderr: inputs done, rate, time left. Standard library only."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class Progress:
    """``  120/10000 images [#####.....]  43.1/s  ETA 3:49`` redrawn in place.

    Two counts: :meth:`update` counts finished inputs (the number shown), :meth:`advance` counts
    work in the same unit but in fractions (the bar, the rate and the time left), so that the bar
    moves *during* a long batch: the Jacobian's blocks and each input's pictures advance it. With
    ``tick`` a background thread also redraws the line every ``tick`` seconds, so the elapsed
    time moves even while one long block computes.

    Shown only when ``enabled`` and ``stream`` is a terminal; otherwise every method is a no-op,
    so logs and pipes stay clean. Redraws at most ``min_interval`` seconds apart.

    Args:
        total: number of inputs to process in this run (skipped inputs excluded).
        stream: where to draw (default ``sys.stderr``).
        enabled: ``False`` for ``--quiet``.
        skipped: inputs already finished by an earlier run (shown, not counted in the rate).
        unit: the noun counted.
        min_interval: the shortest time between two redraws.
        tick: redraw every ``tick`` seconds from a background thread (``None``: never).

    Example:
        >>> with Progress(100, enabled=False) as bar:
        ...     bar.advance(2.5)
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
        tick: float | None = None,
    ):
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.active = bool(enabled and isatty is not None and isatty())
        self.total = total
        self.skipped = skipped
        self.unit = unit
        self.done = 0
        self.work = 0.0
        self.min_interval = min_interval
        self._clock = clock
        self._start = clock()
        self._last_draw = -float("inf")
        self._width = 0
        self._lock = threading.Lock()
        self._tick = tick
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def line(self) -> str:
        """The current progress line (without carriage return)."""
        elapsed = max(self._clock() - self._start, 1e-9)
        work = max(self.work, float(self.done))
        rate = work / elapsed
        total = self.total + self.skipped
        done = self.done + self.skipped
        frac = (work + self.skipped) / total if total else 1.0
        frac = min(1.0, frac)
        filled = int(frac * 20)
        bar = "#" * filled + "." * (20 - filled)
        left = (self.total - work) / rate if rate > 0 else None
        eta = _fmt_duration(left) if left is not None else "?"
        text = f"{done:>{len(str(total))}d}/{total} {self.unit} [{bar}] {rate:6.1f}/s"
        text += f"  ETA {eta}" if self.done < self.total else f"  {_fmt_duration(elapsed)}"
        if self.skipped:
            text += f"  ({self.skipped} done before)"
        return text

    def update(self, n: int = 1) -> None:
        """``n`` more inputs finished."""
        self.done += n
        self.work = max(self.work, float(self.done))
        self._maybe_draw(force=self.done >= self.total)

    def advance(self, work: float) -> None:
        """``work`` more (a fraction of an input, e.g. one block of a batch's Jacobian)."""
        self.work += max(0.0, float(work))
        self._maybe_draw()

    def _maybe_draw(self, force: bool = False) -> None:
        if not self.active:
            return
        now = self._clock()
        if force or now - self._last_draw >= self.min_interval:
            self._draw()
            self._last_draw = now

    def _draw(self) -> None:
        with self._lock:
            text = self.line()
            pad = " " * max(0, self._width - len(text))
            self._width = len(text)
            self.stream.write("\r" + text + pad)
            self.stream.flush()

    def _ticker(self) -> None:
        while not self._stop.wait(self._tick):
            self._draw()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.active and self._width:
            with self._lock:
                self.stream.write("\n")
                self.stream.flush()
                self._width = 0

    def __enter__(self) -> Progress:
        if self.active:
            self._draw()
            if self._tick:
                self._thread = threading.Thread(target=self._ticker, daemon=True)
                self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
