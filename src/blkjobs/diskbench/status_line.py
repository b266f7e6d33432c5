"""``blkjobs bench``'s status line on stderr: which stage and run is going
on, with a free-form detail (bytes done); no rate or ETA (a copy's progress
meter is :mod:`blkjobs.cli.copy_progress`).

On a terminal one line is redrawn in place (at most every ``interval``
seconds for byte counts, at once for a new step) and erased at the end, so
stdout keeps only the table. Elsewhere (a log, a CI job) each step is one
plain line and byte counts are not printed. The clock is passed in so the
throttling is tested without sleeping.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


class StatusLine:
    def __init__(self, stream: TextIO | None = None, *, clock: Callable[[], float] = time.monotonic,
                 interval: float = 0.2, tty: bool | None = None, enabled: bool = True):
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.interval = interval
        self.tty = self.stream.isatty() if tty is None else tty
        self.enabled = enabled
        self._last: float | None = None
        self._shown = False
        self._step = ""

    def _draw(self, text: str) -> None:
        self.stream.write("\r" + text[:159] + "\x1b[K")
        self.stream.flush()
        self._shown = True
        self._last = self.clock()

    def phase(self, text: str) -> None:
        """A new stage ('seqread bs=1M jobs=1 direct'): one line in a log."""
        self._step = text
        if not self.enabled:
            return
        if self.tty:
            self._draw(text)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def step(self, text: str) -> None:
        """A new run inside the stage ('... round 2/6 fio'): on a terminal only."""
        self._step = text
        if self.enabled and self.tty:
            self._draw(text)

    def update(self, text: str) -> None:
        """A detail of the current step (bytes done); throttled."""
        if not self.enabled or not self.tty:
            return
        now = self.clock()
        if self._last is not None and now - self._last < self.interval:
            return
        self._draw(f"{self._step}  {text}")

    def done(self) -> None:
        if self.enabled and self.tty and self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False


class NullStatusLine(StatusLine):
    def __init__(self):
        super().__init__(stream=sys.stderr, tty=False, enabled=False)
