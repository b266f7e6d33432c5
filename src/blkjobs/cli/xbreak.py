"""A test hook of the job commands, as the daemon's ``x-blkjobs-blkdebug-*``
commands are one of ``blkjobs serve``: ``BLKJOBS_X_BREAK=IMAGE:EVENT:N`` in
the environment holds the job's ``N``-th request raising the blkdebug
``EVENT`` on the image whose file name is ``IMAGE`` (see
:mod:`blkjobs.jobs.blkdebug`) and says so on stderr, one line::

    blkjobs: x-break: write_aio held at offset 2097152

A test then signals the command knowing that its job is running and how far
it got, without waiting for time. Cancelling the job (Ctrl-C, SIGTERM) lets
the held request go, and so does a line on stdin or its end (the job goes
on). Not a user interface: unset, nothing happens."""
from __future__ import annotations

import os
import sys
import threading

from ..errors import UsageError

ENV = "BLKJOBS_X_BREAK"
TAG = "x-break"


def arm(eng) -> None:
    """Set the break point ``$BLKJOBS_X_BREAK`` asks for (before the job
    starts) and a thread that holds its ``N``-th request."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    try:
        name, event, count = spec.rsplit(":", 2)
        n = int(count)
    except ValueError:
        raise UsageError(f"{ENV}: expected IMAGE:EVENT:N, not '{spec}'") from None
    nodes = [x for x in eng.graph.nodes.values()
             if not x.is_filter and x.filename and os.path.basename(x.filename) == name]
    if not nodes or n < 1:
        raise UsageError(f"{ENV}: no image '{name}' in the job, or N < 1")
    node = nodes[0]
    eng.blkdebug_break(node, event, TAG)

    def hold() -> None:
        try:
            for _ in range(n - 1):
                eng.blkdebug_wait_break(TAG, 3600)
                eng.blkdebug_break(node, event, TAG)
                eng.blkdebug_resume(TAG)
            held = eng.blkdebug_wait_break(TAG, 3600)
        except (TimeoutError, UsageError):
            return          # the job ended first
        sys.stderr.write(f"blkjobs: x-break: {event} held at offset {held.offset}\n")
        sys.stderr.flush()
        if sys.stdin is not None:
            sys.stdin.readline()
        try:
            eng.blkdebug_resume(TAG)
        except UsageError:
            pass            # let go already: cancelled
    threading.Thread(target=hold, name="x-break", daemon=True).start()


def let_go(eng) -> None:
    """Resume whatever is held (the job was cancelled)."""
    if eng.io.breaks is not None:
        eng.io.breaks.close()
