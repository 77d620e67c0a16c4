"""A one-line progress bar with rate and ETA, drawn only when its stream is a terminal.

``[##########..........]  512/1000  51%  84.2/s  ETA 0:06  3 failed`` redrawn in place at most
ten times a second. On anything that is not a terminal (a file, a pipe, CI logs) it draws
nothing at all, so redirected output stays clean.
"""

from __future__ import annotations

import shutil
import threading
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
    """Counts finished items out of ``total``; `advance` is safe to call from any thread."""

    def __init__(
        self,
        total: int,
        stream: TextIO,
        *,
        enabled: bool | None = None,
        interval: float = 0.1,
    ) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.stream = stream
        self.enabled = stream.isatty() if enabled is None else enabled
        self._interval = interval
        self._started = time.monotonic()
        self._drawn_at = 0.0
        self._shown = False
        self._lock = threading.Lock()

    def advance(self, *, failed: bool = False) -> None:
        with self._lock:
            self.done += 1
            self.failed += failed
            now = time.monotonic()
            if now - self._drawn_at >= self._interval or self.done == self.total:
                self._draw(now)

    def line(self, now: float | None = None) -> str:
        """The bar as text, fitted to the terminal's width."""
        elapsed = max((now or time.monotonic()) - self._started, 1e-9)
        rate = self.done / elapsed
        percent = 100 * self.done / self.total if self.total else 100.0
        if self.done >= self.total:
            eta = f"in {_clock(elapsed)}"
        elif rate > 0:
            eta = f"ETA {_clock((self.total - self.done) / rate)}"
        else:
            eta = "ETA --:--"
        width = len(str(self.total))
        tail = f" {self.done:>{width}}/{self.total}  {percent:3.0f}%  {rate:.1f}/s  {eta}"
        if self.failed:
            tail += f"  {self.failed} failed"
        columns = shutil.get_terminal_size().columns
        bar_width = max(10, min(40, columns - len(tail) - 3))
        filled = bar_width * self.done // self.total if self.total else bar_width
        return f"[{'#' * filled}{'.' * (bar_width - filled)}]{tail}"

    def _draw(self, now: float) -> None:
        if not self.enabled:
            return
        self._drawn_at = now
        self._shown = True
        self.stream.write("\r" + self.line(now) + "\x1b[K")
        self.stream.flush()

    def clear(self) -> None:
        """Erase the bar (before writing other text to the same terminal)."""
        with self._lock:
            if self.enabled and self._shown:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self._shown = False

    def redraw(self) -> None:
        with self._lock:
            self._draw(time.monotonic())

    def close(self) -> None:
        """Leave the final bar on its own line."""
        with self._lock:
            if self.enabled:
                self._draw(time.monotonic())
                self.stream.write("\n")
                self.stream.flush()
