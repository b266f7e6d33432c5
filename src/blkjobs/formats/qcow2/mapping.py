"""qcow2 reads: :meth:`Reads.map_host` (this layer's runs of a guest range),
:meth:`Reads.host_run` (the fast path for one plain data cluster) and the
reads built on them; :meth:`Reads.map_for_read` and the read pins
(:class:`ReadPins`) for reads of the host bytes outside the caller's lock.

Part of the :class:`.driver.Qcow2` class (a mixin); the design notes are in
:mod:`.driver`.
"""
from __future__ import annotations

import _thread
import itertools
import struct

from ...errors import ImageError, UsageError
from ..base import Kind, Mapping
from .debug import io as _dbg_io
from .tables import (ALL_ALLOC, COMPRESSED, COPIED, OFFSET_MASK, STD_RESERVED, ZERO,
                     L2Tables, _zero)
from ...native import dio
from ...native import qcow2 as _nq

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from typing import Any

#: the C mapper's kinds (native.qcow2 *_RUN: Kind's values) as Kind
_KINDS = (Kind.DATA, Kind.ZERO, Kind.UNALLOCATED)


class ReadPins:
    """Reads of this image's host clusters being done outside the graph's
    I/O lock (:meth:`Reads.map_for_read`). A cluster an L2 entry stopped
    referencing is freed (made reusable) only by ``Refcounts.apply_frees``
    at a flush, and the flush first drains the pins taken before it
    (:meth:`drain`), so a cluster such a read maps is never handed out
    again, and written with other data, while the read is in flight. Closing
    the image drains them too (their descriptor stays open). Its own small
    lock: a reader unpins without the I/O lock, so a flush or close holding
    that lock can wait here."""

    def __init__(self) -> None:
        # Every read pins and unpins: both are single operations under the
        # GIL (a counter's next(), a set's add/discard), without a lock. The
        # lock and condition serve drain()'s waits: a drainer counts itself
        # in ``_waiters`` before it looks at the pins, an unpin drops its
        # ticket before it looks at ``_waiters`` (so one of them sees the
        # other; see graph/inflight.py Reads). The condition is made by the
        # first drain(), under the lock and before it counts itself in (an
        # unpin that sees a waiter finds it): opening an image does not
        # import threading (~1 ms of every qcow2 convert's start-up).
        self._lock = _thread.allocate_lock()
        self._cond: Any = None
        self._tickets = itertools.count()
        self._live: set[int] = set()
        self._waiters = 0

    def _condition(self) -> Any:
        """The condition drain() waits on (made on first use)."""
        if self._cond is None:
            import threading
            self._cond = threading.Condition(self._lock)
        return self._cond

    def pin(self) -> int:
        t = next(self._tickets)
        self._live.add(t)
        return t

    def unpin(self, ticket: int) -> None:
        self._live.discard(ticket)
        if self._waiters:
            with self._lock:
                self._cond.notify_all()

    def drain(self) -> None:
        """Wait for the pins taken before this call (not for later ones:
        those mapped after the frees, and cannot reach a freed cluster)."""
        if not self._live:      # none in flight (a pin taken from now on is a later one)
            return
        with self._lock:
            cond = self._condition()
            self._waiters += 1
            last = next(self._tickets)
            try:
                while any(t < last for t in list(self._live)):
                    cond.wait(1.0)
            finally:
                self._waiters -= 1


class Reads(L2Tables):
    """map_host and reads for :class:`.driver.Qcow2`."""

    #: set by ``Qcow2.__init__`` (driver.py)
    read_pins: ReadPins

    def map_for_read(self, offset: int, length: int) -> list[list] | None:
        """This layer's runs of [offset, offset+length) for a reader that
        ``pread``s the DATA runs from :attr:`data_fd` itself, later, outside
        the lock it maps under (the caller pins the image first:
        :attr:`read_pins`). None where the host bytes are not the guest's
        plain data or reading them has side effects: an encrypted image, a
        blkdebug layer below. ZERO runs read as zeroes, UNALLOCATED ones
        from the backing chain, COMPRESSED ones through :meth:`readinto`.
        The runs are ``[start, length, kind, host]`` lists (no
        :class:`Mapping` objects: this is every NBD read's path)."""
        if self.encrypted or self.blkdebug is not None:
            return None
        return self._map_runs(offset, length).out

    def read_segments(self, reqs: list[tuple[int, int]], unalloc_zero: bool
                      ) -> list[Any] | None:
        """:meth:`map_for_read` of many reads at once, for the NBD export's
        C data path (csrc/qcow2.c ``bj_qcow2_read_segs``): per read its
        segments as that path takes them (``native.qcow2.Segments``: DATA
        clusters as data of :attr:`data_fd`, ZERO clusters -- and
        UNALLOCATED ones with ``unalloc_zero``, no backing node -- as zeroes),
        or None where the read is the caller's: an entry the C mapper does
        not take (compressed, corrupt, past the file...), an unallocated
        cluster that reads from a backing node, a read across two L2 tables
        or past the end, an L2 table that cannot be loaded. The caller's
        path (:meth:`map_for_read`) classifies and diagnoses those as ever.
        None for all of them: an image the C mapper does not know (encrypted,
        blkdebug below, extended L2 entries, an external data file, closed).
        The caller pins the image (:attr:`read_pins`) as for map_for_read."""
        if (self.encrypted or self.blkdebug is not None or self.extended
                or self.external or self._closed):
            return None
        cb, l2e, size = self.cb, self.l2e, self.size
        out: list[Any] = [None] * len(reqs)
        tables: dict[int, list[int]] = {}
        for i, (off, n) in enumerate(reqs):
            if 0 < n and 0 <= off and off + n <= size:
                t = (off >> cb) // l2e
                if ((off + n - 1) >> cb) // l2e == t:
                    tables.setdefault(t, []).append(i)
        if not tables:
            return out
        limit = self._host_limit()
        v3, fd = self.header.version >= 3, self.data_fd
        for l1i, idx in tables.items():
            try:
                l2off = self._l2_offset(l1i)
                table = self._l2(l2off) if l2off else None
            except (ImageError, OSError):
                continue            # the caller's path reports it
            got = _nq.read_segments(table, l2e, (l1i * l2e) << cb, cb, limit, v3, unalloc_zero,
                                    fd, [reqs[i] for i in idx])
            for i, g in zip(idx, got, strict=True):
                out[i] = g
        return out

    def _host_limit(self) -> int:
        """Where host offsets stop being plausible for the C mappers: the
        end of the file, or of the clusters the refcounts hand out (the
        file may not have grown to them yet)."""
        if self.rc is None:
            return self.file_size
        return max(self.file_size, self.rc.end << self.cb)

    def host_run(self, offset: int, length: int, for_write: bool = False) -> int | None:
        """Inside one plain data cluster (standard L2 entries only); for_write:
        with COPIED set (refcount 1, overwritable in place). Anything else --
        compressed, zero, unallocated, suspicious -- is None: the general path
        classifies (and diagnoses) it."""
        cb = self.cb
        if (self.extended or length <= 0 or offset < 0 or offset + length > self.size
                or offset >> cb != (offset + length - 1) >> cb or self._closed):
            return None
        if for_write and (self.read_only or not self._write_prepared):
            return None
        _, _, e, _ = self._entry(offset >> cb)
        h = e & OFFSET_MASK
        if self.external:
            if (e & (COMPRESSED | ZERO | STD_RESERVED) or not e & COPIED
                    or h != (offset >> cb) << cb):
                return None
        elif (not h or e & (COMPRESSED | ZERO | STD_RESERVED) or h & (self.cluster_size - 1)
                or (for_write and not e & COPIED)
                or (h >= self.file_size and not self._may_extend(h))):
            return None
        if for_write:
            self._check_overlap(h)
            # the caller writes there (past this driver): the persistent
            # bitmaps must see it as every other write does
            self._check_writable(offset, length)
        return h + (offset & (self.cluster_size - 1))

    # ------------------------------------------------------------------
    # map_host
    def map_host(self, offset: int, length: int) -> list[Mapping]:
        """Runs of this layer, coalesced (DATA runs contiguous in the file).
        ZERO runs carry the host offset of a preallocated zero cluster
        (``qemu-img map`` prints it); the C copy engine uses DATA runs only."""
        return self._map_runs(offset, length).mappings()

    def _map_runs(self, offset: int, length: int) -> _Runs:
        if self._closed:        # every read starts here: no stale answers
            raise ImageError(f"'{self.filename}': image is closed")
        end = min(offset + length, self.size)
        runs = _Runs()
        table_span = self.l2e * self.cluster_size      # guest bytes one L2 table maps
        pos = offset
        while pos < end:
            l1i = (pos >> self.cb) // self.l2e
            span_end = min(end, (l1i + 1) * table_span)
            self._map_table(runs, l1i, pos, span_end)
            pos = span_end
        return runs

    def _map_table(self, runs: _Runs, l1i: int, pos: int, span_end: int) -> None:
        """map_host for [pos, span_end), all in the guest range of L2 table
        ``l1i``: the C mapper takes the well-formed standard entries, the
        rest (and extended L2 entries) one by one in Python."""
        cb, l2e, esz = self.cb, self.l2e, self.esz
        l2off = self._l2_offset(l1i)
        if not l2off:
            runs.emit(pos, span_end - pos, Kind.UNALLOCATED)
            return
        t = self._l2(l2off)
        gc0, gc1 = pos >> cb, (span_end - 1) >> cb
        i0, i1 = (gc0 % l2e) * esz, (gc1 % l2e + 1) * esz
        if t[i0:i1].count(0) == i1 - i0:
            runs.emit(pos, span_end - pos, Kind.UNALLOCATED)
            return
        if not self.extended and not self.external:    # (the C mapper knows no data file)
            self._map_fast(runs, t, l1i, pos, span_end)
            return
        n = gc1 - gc0 + 1
        vals = struct.unpack_from(f">{(2 if self.extended else 1) * n}Q", t, i0)
        for k in range(n):
            gc = gc0 + k
            cstart = gc << cb
            s = max(pos, cstart)
            e_ = min(span_end, cstart + self.cluster_size)
            if self.extended:
                self._map_entry(runs, gc, vals[2 * k], vals[2 * k + 1], s, e_)
            else:
                self._map_entry(runs, gc, vals[k], 0, s, e_)

    def _map_fast(self, runs: _Runs, t: bytearray, l1i: int, pos: int, span_end: int) -> None:
        """[pos, span_end) of standard L2 table ``l1i``: the C mapper turns
        the well-formed entries into runs in one call; it stops at anything
        unusual, whose cluster goes through :meth:`_map_entry` (which
        classifies it, and diagnoses a corrupt entry), and goes on after."""
        cb, l2e, kinds, out, unpack = self.cb, self.l2e, _KINDS, runs.out, struct.unpack_from
        v3 = self.header.version >= 3
        table_guest = (l1i * l2e) << cb
        while pos < span_end:
            limit = self._host_limit()  # (again: _map_entry may have refreshed it)
            flat, stop = self._l2map.map(t, table_guest, pos, span_end, cb, limit, v3)
            if flat:
                runs.emit(flat[0], flat[1], kinds[flat[2]], flat[3] or None)
                out += [[flat[j], flat[j + 1], kinds[flat[j + 2]], flat[j + 3] or None]
                        for j in range(4, len(flat), 4)]
            if stop >= span_end:
                return
            # Python takes that entry, and the compressed ones right after it
            # (in a compressed image, all of them: a C call each costs more)
            gc, s = stop >> cb, stop
            while True:
                e_ = min(span_end, (gc + 1) << cb)
                self._map_entry(runs, gc, unpack(">Q", t, (gc % l2e) * 8)[0], 0, s, e_)
                gc, s = gc + 1, e_
                if s >= span_end or not unpack(">Q", t, (gc % l2e) * 8)[0] & COMPRESSED:
                    break
            pos = s

    def _map_entry(self, runs: _Runs, gc: int, e: int, bm: int, s: int, e_: int) -> None:
        """map_host for [s, e_) inside guest cluster ``gc`` whose L2 entry is
        ``e`` (``bm``: the subcluster bitmap of an extended entry)."""
        cstart = gc << self.cb
        if e == 0 and bm == 0:
            runs.emit(s, e_ - s, Kind.UNALLOCATED)
            return
        kind, h = self._classify(gc, e, bm)
        if isinstance(kind, Kind):      # else "ext": h is (host, alloc, zero) bits
            runs.emit(s, e_ - s, kind, (h + s - cstart) if h or kind == Kind.DATA else None)
            return
        h, alloc, zero = h
        if self._has_host(e):
            h = h or cstart          # external data file: guest cluster 0 at host 0
        if alloc == ALL_ALLOC:
            runs.emit(s, e_ - s, Kind.DATA, h + s - cstart)
            return
        if zero == ALL_ALLOC:
            runs.emit(s, e_ - s, Kind.ZERO, (h + s - cstart) if h else None)
            return
        scs = self.scs
        for j in range((s - cstart) // scs, (e_ - 1 - cstart) // scs + 1):
            a = max(s, cstart + j * scs)
            b = min(e_, cstart + (j + 1) * scs)
            if alloc >> j & 1:
                runs.emit(a, b - a, Kind.DATA, h + a - cstart)
            elif zero >> j & 1:
                runs.emit(a, b - a, Kind.ZERO, (h + a - cstart) if h else None)
            else:   # QEMU reports the host cluster of such subclusters too
                runs.emit(a, b - a, Kind.UNALLOCATED,
                          (h + a - cstart) if self._has_host(e) else None)

    # ------------------------------------------------------------------
    # reads
    def _read_compressed(self, gc: int) -> bytes:
        if self._comp_cache[0] == gc:
            return self._comp_cache[1]
        _, _, e, bm = self._entry(gc)
        off, nbytes = self._compressed_span(gc, e)
        _dbg_io(self.blkdebug, "read", off, nbytes)
        raw = dio.pread(self.fd, nbytes, off)
        from .compress import decompress     # (zlib: not imported unless needed)
        data = decompress(self.ctype, raw, self.cluster_size)
        self._comp_cache = (gc, data)
        return data

    def _pread_into(self, mv: memoryview, host: int) -> None:
        done = 0
        while done < len(mv):
            n = dio.preadinto(self.data_fd, mv[done:], host + done)
            if n <= 0:
                _zero(mv, done, len(mv))   # preallocated clusters past EOF read as zeroes
                return
            done += n

    def readinto(self, offset: int, buf) -> None:
        mv = memoryview(buf).cast("B")
        n = len(mv)
        if offset + n > self.size:
            raise UsageError(f"read beyond the end of the image ({offset}+{n} > {self.size})")
        for m in self.map_host(offset, n):
            a, b = m.start - offset, m.start - offset + m.length
            if m.kind == Kind.DATA:
                assert m.host_offset is not None
                # a blkdebug layer below sees the file's offsets (QEMU's sector)
                _dbg_io(self.blkdebug, "read", m.host_offset, m.length)
                self._pread_into(mv[a:b], m.host_offset)
            elif m.kind == Kind.COMPRESSED:
                pos = m.start
                while pos < m.start + m.length:
                    gc = pos >> self.cb
                    cend = min((gc + 1) << self.cb, m.start + m.length)
                    data = self._read_compressed(gc)
                    ci = pos - (gc << self.cb)
                    mv[pos - offset:cend - offset] = data[ci:ci + cend - pos]
                    pos = cend
            else:
                _zero(mv, a, b)

    def read(self, offset: int, length: int) -> bytes:
        b = bytearray(length)
        self.readinto(offset, b)
        return bytes(b)


class _Runs:
    """The runs map_host builds, in guest order: a run continuing the last
    one (same kind, adjacent, and for a host offset contiguous in the file
    too) extends it."""

    def __init__(self) -> None:
        self.out: list[list] = []      # [start, length, kind, host]

    def emit(self, s: int, n: int, kind: Kind, host: int | None = None) -> None:
        out = self.out
        if out:
            p = out[-1]
            if p[2] == kind and p[0] + p[1] == s and (
                    (host is None and p[3] is None)
                    or (host is not None and p[3] is not None and p[3] + p[1] == host)):
                p[1] += n
                return
        out.append([s, n, kind, host])

    def mappings(self) -> list[Mapping]:
        return [Mapping(s, n, k, h) for s, n, k, h in self.out]
