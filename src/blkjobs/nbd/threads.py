"""Threads of the NBD server started without waiting for them."""
from __future__ import annotations

import _thread
import threading
from collections.abc import Callable


class Thread:
    """A thread started without waiting for it to run: ``threading.Thread.
    start`` waits until the new thread holds the GIL and has begun, which on
    a loaded host is a scheduling delay -- milliseconds -- on the path of a
    client's next connection (the accept loop) and of its first reply (the
    reaper, started with the first read; benchmarks/README.md, "Per-session
    cost, nbdsess"). ``join`` as threading's (timeout in seconds)."""

    def __init__(self, target: Callable[[], object]):
        self._target = target
        self._done = threading.Event()
        self._started = False

    def start(self) -> None:
        self._started = True
        _thread.start_new_thread(self._run, ())

    def _run(self) -> None:
        try:
            self._target()
        finally:
            self._done.set()

    def join(self, timeout: float | None = None) -> None:
        if self._started:
            self._done.wait(timeout)

    def is_alive(self) -> bool:
        return self._started and not self._done.is_set()
