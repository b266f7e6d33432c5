"""A guest read through a chain, mapped under the I/O lock and done outside
it (:meth:`~.io.BlockIO.guest_read`).

:func:`plan` runs with the I/O lock held. It walks the node's chain as
``Node.readinto`` does and sorts each run of the request:

* a node whose driver reads change no state of it (``parallel_reads``: raw
  files, NBD nodes) is read later, whole, by its driver;
* a qcow2 node (``map_for_read``) is mapped now, from its L2 cache: its
  DATA runs become ``pread``s of host bytes done later (the image pinned
  meanwhile: ``formats.qcow2.mapping.ReadPins``), ZERO runs zero fills,
  UNALLOCATED runs are planned in the backing node (zeroes past its end);
  a compressed cluster is read now, through the driver (it decompresses,
  and keeps a cache);
* any other node (encrypted, blkdebug, other formats) is read now, under
  the lock, as before.

:meth:`ReadPlan.run` then does the deferred work without the lock and
:meth:`ReadPlan.release` unpins. Why that is safe (the caller tracks the
read on every node of the chain meanwhile): docs/architecture.md, "Reads in
flight".
"""
from __future__ import annotations

import threading
from typing import Any

from ..errors import BlkjobsError, UsageError
from ..formats.base import Kind
from ..formats.raw import Raw
from ..native import dio
from .node import Node

_ZEROES = bytes(1 << 20)
DATA, UNALLOCATED, COMPRESSED = Kind.DATA, Kind.UNALLOCATED, Kind.COMPRESSED


def _zero(mv: memoryview) -> None:
    pos, n = 0, len(mv)
    while pos < n:
        k = min(n - pos, len(_ZEROES))
        mv[pos:pos + k] = _ZEROES[:k]
        pos += k


def _pread(fd: int, mv: memoryview, host: int) -> None:
    """All of ``mv`` from ``fd`` at ``host``; bytes past the end of the
    file read as zeroes (clusters preallocated past EOF)."""
    done, n = 0, len(mv)
    while done < n:
        k = dio.preadinto(fd, mv[done:], host + done)      # O_DIRECT too
        if k <= 0:
            _zero(mv[done:])
            return
        done += k


class ReadPlan:
    """What is left of one read once the I/O lock is let go (see the
    module docstring)."""

    __slots__ = ("preads", "reads", "zeroes", "pins")

    def __init__(self) -> None:
        #: (fd, host offset, destination): qcow2 DATA runs
        self.preads: list[tuple[int, int, memoryview]] = []
        #: (driver, guest offset, destination): parallel-read drivers
        self.reads: list[tuple[Any, int, memoryview]] = []
        #: destinations that read as zeroes
        self.zeroes: list[memoryview] = []
        #: (ReadPins, ticket) taken on the qcow2 images read
        self.pins: list[tuple[Any, int]] = []

    @property
    def empty(self) -> bool:
        return not (self.preads or self.reads or self.zeroes)

    def run(self) -> None:
        """The deferred reads (no lock needed)."""
        for fd, host, mv in self.preads:
            _pread(fd, mv, host)
        for drv, off, mv in self.reads:
            drv.readinto(off, mv)
        for mv in self.zeroes:
            _zero(mv)

    def release(self) -> None:
        """Unpin the images (no lock needed); idempotent."""
        pins, self.pins = self.pins, []
        for p, t in pins:
            p.unpin(t)


def plan(node: Node, offset: int, mv: memoryview) -> ReadPlan:
    """Plan the guest read of [offset, offset+len(mv)) of ``node`` into
    ``mv`` (I/O lock held). On an error nothing stays pinned."""
    p = ReadPlan()
    try:
        _plan(node, offset, mv, p, {})
    except BaseException:
        p.release()
        raise
    return p


def _plan(node: Node, offset: int, mv: memoryview, p: ReadPlan, pinned: dict[int, Any]) -> None:
    while node.is_filter:
        node = node._child()
    if offset + len(mv) > node.size:
        raise UsageError(f"read beyond the end of node '{node.name}'")
    d = node.driver
    maps = None
    # a fault-injection wrapper (blkdebug) hands out its inner driver's
    # attributes: its reads must go through its own readinto
    if not d.injects_faults:
        if node.backing is None and d.parallel_reads:
            p.reads.append((d, offset, mv))
            return
        maps = d.map_for_read(offset, len(mv))
    if maps is None:
        node.readinto(offset, mv)       # under the lock, as before
        return
    for start, n, kind, host in maps:
        v = mv[start - offset:start - offset + n]
        if kind == DATA:
            if id(d) not in pinned:
                pins = d.read_pins
                pinned[id(d)] = pins
                p.pins.append((pins, pins.pin()))
            p.preads.append((d.data_fd, host, v))
        elif kind == UNALLOCATED and node.backing is not None:
            _below(node.backing, start, v, p, pinned)
        elif kind == COMPRESSED:
            d.readinto(start, v)
        else:
            p.zeroes.append(v)


def _below(node: Node, offset: int, mv: memoryview, p: ReadPlan, pinned: dict[int, Any]) -> None:
    """A backing node's part: zeroes past its end (shorter than its overlay)."""
    n = max(0, min(len(mv), node.size - offset))
    if n:
        _plan(node, offset, mv[:n], p, pinned)
    if n < len(mv):
        p.zeroes.append(mv[n:])


# -- the NBD export's C data path ---------------------------------------------
#: segment kinds, as csrc/nbdsrv.h numbers them (native.nbdserve)
SEG_DATA, SEG_DATA_PAD, SEG_ZERO = 0, 1, 2
#: (kind, fd, host offset, length)
Segment = tuple[int, int, int, int]


def plan_segments(node: Node, offset: int, length: int) -> tuple[list[Segment], ReadPlan] | None:
    """The guest read of [offset, offset+length) of ``node`` as file
    segments a reader outside Python does (I/O lock held): raw files read
    whole, qcow2 DATA runs as host bytes (the image pinned in the returned
    plan, released as :meth:`ReadPlan.release`), ZERO runs and the part
    past a short backing node as zeroes. None (nothing pinned) where a part
    must be read by a driver itself: what :func:`plan` reads at once under
    the lock (compressed clusters, encrypted images, blkdebug, other
    formats) or a parallel-read driver without a plain file (NBD nodes)."""
    p = ReadPlan()
    segs: list[Segment] = []
    try:
        ok = _segments(node, offset, length, segs, p, {})
    except BaseException:
        p.release()
        raise
    if not ok:
        p.release()
        return None
    return segs, p


def _plain_fd(d: Any) -> int | None:
    """The raw file a raw driver reads with plain preads (not one whose
    ``readinto`` was replaced on the instance: a test's hook)."""
    if type(d) is not Raw or "readinto" in vars(d):
        return None
    return int(d.fd)


def _segments(node: Node, offset: int, n: int, segs: list[Segment], p: ReadPlan,
              pinned: dict[int, Any]) -> bool:
    while node.is_filter:
        node = node._child()
    if offset + n > node.size:
        raise UsageError(f"read beyond the end of node '{node.name}'")
    d = node.driver
    if d.injects_faults:
        return False
    if node.backing is None and d.parallel_reads:
        fd = _plain_fd(d)
        if fd is None:
            return False
        segs.append((SEG_DATA, fd, offset, n))
        return True
    maps = d.map_for_read(offset, n)
    if maps is None:
        return False
    fd = -1
    for start, k, kind, host in maps:
        if kind == DATA:
            if fd < 0:              # (once per node: a property, per run it shows)
                if id(d) not in pinned:
                    pins = d.read_pins
                    pinned[id(d)] = pins
                    p.pins.append((pins, pins.pin()))
                fd = d.data_fd
            segs.append((SEG_DATA_PAD, fd, host, k))
        elif kind == UNALLOCATED and node.backing is not None:
            m = max(0, min(k, node.backing.size - start))
            if m and not _segments(node.backing, start, m, segs, p, pinned):
                return False
            if m < k:
                segs.append((SEG_ZERO, 0, 0, k - m))
        elif kind == COMPRESSED:
            return False
        else:
            segs.append((SEG_ZERO, 0, 0, k))
    return True


class _Shared:
    """The pins of a group of reads mapped together, released with the
    group's last read."""

    __slots__ = ("rp", "left", "lock")

    def __init__(self, rp: ReadPlan, n: int):
        self.rp, self.left, self.lock = rp, n, threading.Lock()

    def done(self) -> None:
        with self.lock:
            self.left -= 1
            last = not self.left
        if last:
            self.rp.release()


#: a token of :func:`plan_batch`: the group's pins, the read's tickets
Token = tuple[_Shared, list[tuple[Any, int]]]
#: what :func:`plan_batch` hands out per read: its segments -- a list of
#: :data:`Segment`, or the C mapper's (``native.qcow2.Segments``: sized,
#: iterable as Segments) -- and its token
Planned = tuple[Any, Token]
#: reads of a batch closer than this are mapped as one range (nbdcopy's
#: are back to back); a group spans at most _SPAN
_GAP, _SPAN = 1 << 20, 64 << 20


def _groups(reqs: list[tuple[int, int]]) -> list[tuple[int, int, list[int]]]:
    """(start, end, indices sorted by offset) of reads close together."""
    out: list[tuple[int, int, list[int]]] = []
    for i in sorted(range(len(reqs)), key=lambda k: reqs[k][0]):
        off, n = reqs[i]
        if out and off <= out[-1][1] + _GAP and max(out[-1][1], off + n) - out[-1][0] <= _SPAN:
            start, end, idx = out[-1]
            idx.append(i)
            out[-1] = (start, max(end, off + n), idx)
        else:
            out.append((off, off + n, [i]))
    return out


def _try(img: Node, off: int, n: int) -> tuple[list[Segment], ReadPlan] | None:
    try:
        return plan_segments(img, off, n)
    except (BlkjobsError, OSError):
        return None


def plan_batch(img: Node, reqs: list[tuple[int, int]], reads: list[Any]) -> list[Planned | None]:
    """:func:`plan_segments` of several reads of ``img`` (I/O lock held),
    each tracked on ``reads`` (the ``Reads`` of every node of its chain)
    until :func:`end_batch`. Reads close together are mapped as one range
    (one walk of the L2 tables) and cut apart. None for a read that cannot
    be done this way or whose mapping failed (the caller reads it the
    ordinary way, which reports the error).

    A qcow2 image's reads are mapped in C first (``read_segments``: no
    Python per run); the reads it leaves (anything unusual in their range,
    an unallocated cluster read from a backing node) are mapped as below."""
    out: list[Planned | None] = [None] * len(reqs)
    rest = _plan_c(img, reqs, reads, out)
    if rest is None:
        _plan_groups(img, reqs, reads, out)
    elif rest:
        sub: list[Planned | None] = [None] * len(rest)
        _plan_groups(img, [reqs[i] for i in rest], reads, sub)
        for i, g in zip(rest, sub, strict=True):
            out[i] = g
    return out


def _plan_c(img: Node, reqs: list[tuple[int, int]], reads: list[Any],
            out: list[Planned | None]) -> list[int] | None:
    """The reads of a qcow2 image the C mapper takes, into ``out`` (one pin
    for them all, released with the last); the indices of the others, or
    None: this image is not for it (the Python path for all)."""
    node = img
    while node.is_filter:
        node = node._child()
    d = node.driver
    if d.injects_faults:
        return None
    got = d.read_segments(reqs, node.backing is None)
    if got is None:
        return None
    rest = [i for i, g in enumerate(got) if g is None]
    if len(rest) < len(reqs):
        rp = ReadPlan()
        pins = d.read_pins
        rp.pins.append((pins, pins.pin()))
        shared = _Shared(rp, len(reqs) - len(rest))
        for i, g in enumerate(got):
            if g is not None:
                off, n = reqs[i]
                out[i] = (g, (shared, [(r, r.add(off, n)) for r in reads]))
    return rest


def _plan_groups(img: Node, reqs: list[tuple[int, int]], reads: list[Any],
                 out: list[Planned | None]) -> None:
    """:func:`plan_batch` of ``reqs`` through :func:`plan_segments`."""
    for start, end, idx in _groups(reqs):
        got = _try(img, start, end - start) if len(idx) > 1 else None
        if got is None:             # alone: a compressed cluster is not the others'
            for i in idx:
                one = _try(img, *reqs[i])
                if one is not None:
                    off, n = reqs[i]
                    out[i] = (one[0], (_Shared(one[1], 1), [(r, r.add(off, n)) for r in reads]))
            continue
        segs, rp = got
        shared = _Shared(rp, len(idx))
        k, pos = 0, start           # segs[k] starts at guest offset pos
        for i in idx:
            off, n = reqs[i]
            while pos + segs[k][3] <= off:
                pos += segs[k][3]
                k += 1
            out[i] = (_cut(segs, k, pos, off, off + n),
                      (shared, [(r, r.add(off, n)) for r in reads]))


def _cut(segs: list[Segment], k: int, pos: int, off: int, end: int) -> list[Segment]:
    """The part [off, end) of segments from segs[k] (at guest offset pos)."""
    out: list[Segment] = []
    while pos < end:
        kind, fd, host, n = segs[k]
        s, e = max(pos, off), min(pos + n, end)
        out.append((kind, fd, host + (s - pos) if kind != SEG_ZERO else 0, e - s))
        pos += n
        k += 1
    return out


def end_batch(tokens: list[Token]) -> None:
    """The reads of :func:`plan_batch` are done: unpin, untrack (no lock
    needed, as at the end of ``guest_read``)."""
    for shared, tracked in tokens:
        shared.done()
        for r, t in tracked:
            r.remove(t)
