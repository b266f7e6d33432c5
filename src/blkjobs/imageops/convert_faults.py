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

``-c``: each request is one target cluster (qemu-img's buffer), a short
extent counting as data; ``-B``: what the source's top does not hold above
its own backing file is left to the new backing file, zeroes are written
(a target with a backing file does not start zeroed), past the backing
file's end zeroes are left to it too. The ``-m`` coroutines' window decides
what is written before a read error (:func:`copy_in_order`); a failed write
is ``error while writing at byte N``.
"""
from __future__ import annotations

import errno
import os

from ..errors import CopyError
from ..native.extents import is_zero

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from typing import Any

SECTOR = 512
#: QEMU's BDRV_REQUEST_MAX_SECTORS: the longest block status asked
REQUEST_MAX = (0x7FFFFFFF >> 9) * SECTOR
#: qemu-img convert's buffer (IO_BUF_SIZE): the longest read
BUF = 2 << 20
#: the kinds of a request (qemu-img's BLK_DATA, BLK_ZERO, BLK_BACKING_FILE)
DATA, ZERO, BACKING = 0, 1, 2


def _fail(err: int, what: str, cv: Any, offset: int) -> CopyError:
    """qemu-img's text (``what``), the context kept for --error-format json."""
    e = CopyError(err, what)
    e.path, e.side, e.offset = cv.src, "source", offset
    return e


class _Walk:
    """qemu-img's convert_iteration_sectors over one source: the extent
    from ``pos`` on, asking the block status only where the last one ended.
    ``kind`` of an extent: ``DATA`` (read and written), ``ZERO`` (written as
    zeroes unless the target reads as zeroes) or ``BACKING`` (-B: left
    unallocated, the target's backing file shows through)."""

    def __init__(self, cv: Any):
        self.cv = cv
        self.top = cv.top
        self.size = cv.size
        self.end = -(-cv.size // SECTOR) * SECTOR
        self.align = max(SECTOR, self.top.driver.cluster_size or 0)
        self.next_status = 0
        self.kind = DATA
        #: -c: qemu-img's buffer is one target cluster, and so is each request
        self.cluster = cv.cluster if cv.o.compress else 0
        self.buf = self.cluster or BUF
        #: -B: the extents the source's top holds not, below this depth (the
        #: source's own backing chain: qemu-img's base), are the backing's
        self.backed = bool(cv.o.backing)
        chain = self.top.chain()
        own = next((i for i, n in enumerate(chain) if not n.is_filter), 0)
        self.own_depth = own if len(chain) > own + 1 else None
        #: -B: past the backing file's end zeroes are the backing's too
        self.backing_end = getattr(cv, "backing_size", None)

    def status(self, pos: int) -> tuple[int, int]:
        """(kind, length) of the request starting at ``pos``."""
        n = min(self.end - pos, REQUEST_MAX)
        post_backing_zero = False
        if self.backing_end is not None:
            if pos >= self.backing_end:
                post_backing_zero = True
            elif pos + n > self.backing_end:
                n = self.backing_end - pos
        if self.next_status <= pos:
            o = self.cv.o
            kind = DATA
            while True:
                try:
                    runs = self.top.block_status(pos, min(n, self.size - pos))
                    first = runs[0]
                    count = first["length"]
                    if self.backed and self.own_depth is not None \
                            and first["depth"] > self.own_depth:
                        kind = BACKING       # unallocated above the base
                    elif first["zero"]:
                        kind = BACKING if post_backing_zero else ZERO
                    else:
                        kind = DATA
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
                    kind, count = DATA, SECTOR
                    break
            n = -(-count // SECTOR) * SECTOR
            tail = (pos + n) % self.align
            if n > tail:
                n -= tail
            self.kind = kind
            self.next_status = pos + n
        n = min(n, self.next_status - pos)
        kind = self.kind
        if kind == DATA:
            n = min(n, self.buf)
        if self.cluster:        # -c: whole clusters; a short extent is data
            if n < self.cluster:
                n, kind = min(self.cluster, self.end - pos), DATA
                self.kind = DATA
            else:
                n -= n % self.cluster
        return kind, n


def requests(cv: Any):
    """qemu-img's requests: (offset, length, kind), in its order."""
    walk = _Walk(cv)
    pos = 0
    while pos < walk.end:
        kind, n = walk.status(pos)
        yield pos, n, kind
        pos += max(n, SECTOR)


def copy_in_order(cv: Any) -> None:
    """The copy of :mod:`.convert_nbd`'s converter ``cv``, in qemu-img's
    order (see the module): a walk of the block status, then the copy.

    qemu-img's ``-m`` coroutines (``cv.o.coroutines``) each hold one request:
    all of the first ``m`` are read before any is written, so a read error
    among them leaves nothing written (and each failing one says so); later,
    while one request is read the ``m - 2`` before it are still on their
    way (read, not written: a read error drops them). That is where qemu-img
    7.2's writes stop (in order; with -W its order varies from run to run)."""
    for _ in requests(cv):
        pass
    m = max(1, cv.o.coroutines)
    lag = max(0, m - 2)
    pending: list[tuple[int, int, int, Any]] = []   # read, not yet written
    errors: list[CopyError] = []
    first = True
    for i, (pos, n, kind) in enumerate(requests(cv)):
        if first and i == m:
            if errors:
                break
            first = False
        if not first:       # a coroutine is free for this request
            while len(pending) > lag:
                _write(cv, *pending.pop(0))
            if cv.check:
                cv.check()
            if cv.progress:
                cv.progress(min(cv.done, cv.size), cv.size)
        n = min(n, cv.size - pos)
        mv = None
        if kind == DATA:
            if cv.bucket is not None:       # -r, as the buffer path's pieces
                with cv.lock:
                    wait_ns = cv.bucket.take(n)
                if wait_ns > 0:
                    cv.stop.wait(wait_ns / 1e9)
            mv = memoryview(bytearray(n))
            try:
                _read(cv, pos, mv)
            except CopyError as e:
                errors.append(e)
                if not first:
                    break
                continue
        pending.append((pos, n, kind, mv))
    if errors:
        raise _several(errors)
    for p in pending:
        _write(cv, *p)
        if cv.progress:
            cv.progress(min(cv.done, cv.size), cv.size)


def _several(errors: list[CopyError]) -> CopyError:
    """The first request's error, with a line for each other one that failed
    (qemu-img says each)."""
    e = errors[0]
    if len(errors) > 1:
        e.args = ("\nblkjobs: ".join(str(x) for x in errors),)
    return e


def _write(cv: Any, pos: int, n: int, kind: int, mv: Any) -> None:
    """qemu-img's convert_co_write of one request; a failure said in its
    words (``error while writing at byte N``, N the request's start)."""
    try:
        _write_request(cv, pos, n, kind, mv)
    except CopyError as e:
        if e.side != "target":
            raise
        err = CopyError(e.errno, f"error while writing at byte {pos}")
        err.path, err.side, err.offset = cv.dst, "target", pos
        raise err from None


def overwrites(t: Any, pos: int, n: int) -> bool:
    """A compressed write over a cluster that has host space (data, a
    preallocated zero cluster, a compressed one): QEMU refuses it (EIO)."""
    from ..formats.base import Kind
    return any(m.kind in (Kind.DATA, Kind.COMPRESSED) or m.host_offset is not None
               for m in t.map_host(pos, n))


def _compressed(cv: Any, pos: int, mv: Any) -> None:
    if overwrites(cv.t, pos, len(mv)):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    cv.t.write_compressed(pos, mv)


def _write_request(cv: Any, pos: int, n: int, kind: int, mv: Any) -> None:
    if kind == BACKING:
        pass
    elif kind == ZERO:
        cv._zero(pos, n)
    elif cv.o.compress:
        if cv.o.sparse_size and is_zero(mv):
            cv._zero(pos, n)
        else:
            cv._write(lambda off, b: _compressed(cv, off, b), pos, mv)
            with cv.lock:
                cv.data_bytes += n
                cv.done += n
    else:
        cv._store(mv, pos, n)


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

