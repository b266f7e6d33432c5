"""``convert`` from a source under fault injection (a ``blkdebug`` layer:
``blkdebug:CONF:IMG``, ``json:{"driver": "blkdebug", ...}``, ``--image-opts``).

The C copy engine reads the host file, past any injected fault, so such a
source is copied on the buffer path of :mod:`.convert_nbd` (the target side:
creation, locks, writes, clean-up), through the source's drivers, and in
qemu-img convert's own order, one request after the other, so that the
faults are met where qemu-img meets them and said with its words:

* a first walk over the source's block status (qemu-img counts the
  allocated sectors), then the copy, which asks the block status again
  where the last answer ended. Each question covers the rest of the image
  (at most ``REQUEST_MAX`` bytes); the answer's first run is the extent, cut
  back to the source's cluster size (qemu-img's ``src_alignment``);
* a failed block status fails the convert (``error while reading block
  status at offset N``); with ``--salvage`` it is asked again over a quarter
  of the range, down to one sector, which is then warned about and copied
  as data;
* data extents are read in requests of at most ``BUF`` bytes; a failed
  read fails the convert (``error while reading at byte N``, N the start of
  the request); with ``--salvage`` the request is read again sector by
  sector, a sector that fails is warned about and written as zeroes.

Warnings therefore come in qemu-img's order (qemu-img's coroutines take the
extents in order; the reads of one request are in order too).
"""
from __future__ import annotations

import errno

from ..errors import BlkjobsError, CopyError

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from typing import Any

SECTOR = 512
#: QEMU's BDRV_REQUEST_MAX_SECTORS: the longest block status asked
REQUEST_MAX = (0x7FFFFFFF >> 9) * SECTOR
#: qemu-img convert's buffer (IO_BUF_SIZE): the longest read
BUF = 2 << 20


def injects_faults(name: str) -> bool:
    """``name`` is an image name with a ``blkdebug`` layer in it."""
    from ..graph.blockspec import FILTER_DRIVERS, is_spec, parse
    if not is_spec(name):
        return False
    try:
        layer: Any = parse(name).top
    except BlkjobsError:        # a bad name: opening it says what is wrong
        return False
    while layer is not None:
        if layer.driver in FILTER_DRIVERS:
            return True
        layer = layer.child
    return False


def _fail(err: int, what: str, cv: Any, offset: int) -> CopyError:
    """qemu-img's text (``what``), the context kept for --error-format json."""
    e = CopyError(err, what)
    e.path, e.side, e.offset = cv.src, "source", offset
    return e


class _Walk:
    """qemu-img's convert_iteration_sectors over one source: the extent
    from ``pos`` on, asking the block status only where the last one ended."""

    def __init__(self, cv: Any):
        self.cv = cv
        self.top = cv.top
        self.size = cv.size
        self.end = -(-cv.size // SECTOR) * SECTOR
        self.align = max(SECTOR, getattr(self.top.driver, "cluster_size", 0) or 0)
        self.next_status = 0
        self.data = True

    def status(self, pos: int) -> tuple[bool, int]:
        """(data?, length) of the extent starting at ``pos``."""
        n = min(self.end - pos, REQUEST_MAX)
        if self.next_status <= pos:
            o = self.cv.o
            while True:
                try:
                    runs = self.top.block_status(pos, min(n, self.size - pos))
                    first = runs[0]
                    data, count = not first["zero"], first["length"]
                    break
                except OSError as e:
                    err = e.errno or errno.EIO
                    if not o.salvage:
                        raise _fail(err, f"error while reading block status at offset {pos}",
                                    self.cv, pos) from None
                    if n > SECTOR:
                        n = -(-(n // SECTOR) // 4) * SECTOR
                        continue
                    if o.on_status_salvage is not None:
                        o.on_status_salvage(pos, err)
                    data, count = True, SECTOR
                    break
            n = -(-count // SECTOR) * SECTOR
            tail = (pos + n) % self.align
            if n > tail:
                n -= tail
            self.data = data
            self.next_status = pos + n
        n = min(n, self.next_status - pos)
        return self.data, min(n, BUF) if self.data else n


def copy_in_order(cv: Any) -> None:
    """The copy of :mod:`.convert_nbd`'s converter ``cv``, in qemu-img's
    order (see the module): a walk of the block status, then the copy."""
    walk = _Walk(cv)
    pos = 0
    while pos < walk.end:
        pos += walk.status(pos)[1]
    walk = _Walk(cv)
    buf = memoryview(bytearray(BUF))
    pos = 0
    while pos < walk.end:
        data, n = walk.status(pos)
        n = min(n, cv.size - pos)
        if data:
            if cv.bucket is not None:       # -r, as the buffer path's pieces
                with cv.lock:
                    wait_ns = cv.bucket.take(n)
                if wait_ns > 0:
                    cv.stop.wait(wait_ns / 1e9)
            mv = buf[:n]
            _read(cv, pos, mv)
            cv._store(mv, pos, n)
        else:
            cv._zero(pos, n)
        pos += max(n, SECTOR)
        if cv.check:
            cv.check()
        if cv.progress:
            cv.progress(min(cv.done, cv.size), cv.size)


def _read(cv: Any, off: int, mv: memoryview) -> None:
    """qemu-img's convert_co_read: the request at once; when it fails and
    --salvage is given, sector by sector (zeroes where one fails)."""
    try:
        cv.top.readinto(off, mv)
        return
    except OSError as e:
        if not cv.o.salvage:
            raise _fail(e.errno or errno.EIO, f"error while reading at byte {off}",
                        cv, off) from None
    for pos in range(0, len(mv), SECTOR):
        sector = mv[pos:pos + SECTOR]
        try:
            cv.top.readinto(off + pos, sector)
        except OSError as e:
            sector[:] = bytes(len(sector))
            if cv.o.on_salvage is not None:
                cv.o.on_salvage(off + pos, e.errno or errno.EIO)

