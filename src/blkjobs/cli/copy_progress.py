"""The progress of one copy (convert, demo, the job commands' ``-p``): bytes
done of a total, rate and ETA, for humans (one live line on stderr) and
programs (JSON lines). Progress counts completed bytes; the total may grow.
The clock is injectable so rate and ETA can be tested exactly.

(``blkjobs bench`` shows its stages with another kind of line:
:mod:`blkjobs.diskbench.status_line`.)"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import TextIO

from ..units import human


class CopyProgress:
    """Call ``update(done, total)`` as often as you like; output is throttled
    to ``interval`` seconds. ``finish()`` prints the final line."""

    def __init__(self, stream: TextIO = sys.stderr, interval: float = 0.2,
                 now: Callable[[], float] = time.monotonic, json_lines: bool = False,
                 label: str = ""):
        self.stream = stream
        self.interval = interval
        self.now = now
        self.json_lines = json_lines
        self.label = label
        self.start = now()
        self._last = -1e9
        self._samples: list[tuple[float, int]] = []
        self.done = 0
        self.total = 0

    def rate(self) -> float:
        """Bytes/s over the last ~2 s of samples (whole run if shorter)."""
        if len(self._samples) < 2:
            t = self.now() - self.start
            return self.done / t if t > 0 else 0.0
        t0, d0 = self._samples[0]
        t1, d1 = self._samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0

    def eta(self) -> float | None:
        r = self.rate()
        if r <= 0 or self.total <= self.done:
            return None
        return (self.total - self.done) / r

    def update(self, done: int, total: int, force: bool = False) -> None:
        self.done, self.total = done, max(total, done)
        t = self.now()
        self._samples.append((t, done))
        while len(self._samples) > 2 and t - self._samples[0][0] > 2.0:
            self._samples.pop(0)
        if not force and t - self._last < self.interval:
            return
        self._last = t
        self._emit(final=False)

    def line(self) -> str:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = self.eta()
        eta_s = "--:--" if eta is None else f"{int(eta) // 60:02d}:{int(eta) % 60:02d}"
        label = f"{self.label} " if self.label else ""
        return (f"{label}({pct:6.2f}/100%) {human(self.done)} of {human(self.total)}, "
                f"{human(self.rate())}/s, ETA {eta_s}")

    def _emit(self, final: bool) -> None:
        if self.json_lines:
            rec = {"done": self.done, "total": self.total, "rate": round(self.rate()),
                   "elapsed": round(self.now() - self.start, 3), "final": final}
            self.stream.write(json.dumps(rec) + "\n")
        else:
            self.stream.write("\r" + self.line() + ("\n" if final else "\x1b[K"))
        self.stream.flush()

    def finish(self) -> None:
        self._emit(final=True)
