"""A dependency-free progress line for long data jobs (stderr; redrawn in place on a terminal)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human(n: float) -> str:
    """1234567 → '1.2M': compact counts for progress lines."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


class Progress:
    """Throttled progress reports: every ``interval`` s on a terminal, every ``log_interval`` s
    otherwise (so redirected logs stay short). ``enabled=False`` makes it silent."""

    def __init__(
        self,
        label: str,
        total_bytes: int | None = None,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        interval: float = 0.5,
        log_interval: float = 15.0,
    ) -> None:
        self.label = label
        self.total = total_bytes
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if self.tty else log_interval
        self.start = time.perf_counter()
        self._last = self.start
        self._drawn = False

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def update(self, done_bytes: int, **counts: float) -> None:
        """Report ``done_bytes`` of the input plus named counts (documents=..., tokens=...)."""
        now = time.perf_counter()
        if not self.enabled or now - self._last < self.interval:
            return
        self._last = now
        self._draw(self.line(done_bytes, **counts))

    def line(self, done_bytes: int, **counts: float) -> str:
        elapsed = max(self.elapsed(), 1e-9)
        parts = [self.label]
        if self.total:
            parts.append(f"{100 * done_bytes / self.total:3.0f}% {done_bytes / 1e6:,.1f}/"
                         f"{self.total / 1e6:,.1f} MB")
        else:
            parts.append(f"{done_bytes / 1e6:,.1f} MB")
        parts += [f"{human(v)} {k}" for k, v in counts.items()]
        parts.append(f"{done_bytes / 1e6 / elapsed:.1f} MB/s")
        if self.total and done_bytes:
            parts.append(f"ETA {max(0.0, elapsed * (self.total / done_bytes - 1)):.0f}s")
        return "  ".join(parts)

    def message(self, text: str) -> None:
        """A line of its own (a phase change), if enabled."""
        if self.enabled:
            self._draw(f"{self.label}  {text}")
            self.close()

    def _draw(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text)
            self._drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the in-place line (call before printing anything else)."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
