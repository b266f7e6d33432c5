"""The copy-before-write filter (QEMU ``block/copy-before-write.c``).

Installed on the backup source at job creation. A guest write, write-zeroes
or discard is widened to job clusters; every cluster still set in the job's
copy bitmap is first copied (old contents) from the source to the target,
ignoring the rate limit, and cleared from the bitmap; clusters the
background loop is copying right now are waited for. Only then does the
request reach the source. So the target is the source as it was when the job
started.

On a failed copy: ``break-guest-write`` (default) fails the guest request and
writes nothing; ``break-snapshot`` lets it through and makes the backup fail.
"""
from __future__ import annotations

import errno
from typing import Protocol

from ..errors import CopyError, OSErrorWithContext
from ..graph import Node
from ..graph.frontend import Filter
from ..graph.io import InFlight
from ..native.bitmap import Bitmap
from .blockcopy import Mover, Stats


class Backup(Protocol):
    """What the filter uses of its backup job (``backup.BackupJob``; this
    module does not import it, it imports this one)."""

    cluster: int
    size: int
    inflight: InFlight
    copy_bm: Bitmap
    cbw_mover: Mover

    def landed(self, areas: list[tuple[int, int]], stats: Stats) -> None: ...


class CbwFilter(Filter):
    def __init__(self, backup: Backup, on_cbw_error: str = "break-guest-write"):
        self.b = backup
        self.on_cbw_error = on_cbw_error
        #: First error of a break-snapshot failure: the job fails with it.
        self.snapshot_error: BaseException | None = None

    def before_write(self, node: Node, op: str, offset: int, length: int) -> None:
        b = self.b
        if self.snapshot_error is not None:
            return                      # snapshot already broken: writes pass
        c = b.cluster
        start = offset - offset % c
        end = min(-(-(offset + length) // c) * c, b.size)
        pos = start
        while pos < end:
            # (again after each copy: the lock may have been let go meanwhile
            # and the loop may have claimed more of the range)
            b.inflight.wait_clear(pos, end - pos)
            area = b.copy_bm.next_dirty_area(pos, end - pos)
            if area is None or area[0] >= end:
                break
            a, n = area
            n = min(n, end - a)
            b.copy_bm.reset(a, n)
            # In flight like the loop's copies: the move may let the I/O lock
            # go (it waits for clusters another job has not filled), and a
            # second guest write to the area must wait until the old data is
            # saved, not find its bits clear and go ahead.
            r = b.inflight.add(a, n)
            try:
                stats = b.cbw_mover.move(a, n)
            except (CopyError, OSError, OSErrorWithContext) as e:
                if self.on_cbw_error == "break-snapshot":
                    self.snapshot_error = e
                    return
                b.copy_bm.set(a, n)
                code = getattr(e, "errno", None) or errno.EIO
                raise OSError(code, f"copy-before-write failed: {e}") from e
            finally:
                b.inflight.remove(r)
            b.landed([(a, n)], stats)
            pos = a + n
