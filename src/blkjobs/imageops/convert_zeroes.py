"""A qcow2 target's clusters after convert's copy, as qemu-img leaves them
(:class:`.convert_chain.ChainConvert`, ``cv``): the clusters allocated for
data whose host range stayed a hole become unallocated (a new target) or
zero clusters (``-n``), the zero rest of a data cluster is written as zero
bytes (``-n``), and with ``-n --target-is-zero`` the clusters reused in
place are left as they were (:func:`old_hosts`, :func:`not_in_place`).
Before the copy, a new target's clusters that read as zeroes in the
source's data runs are taken out of those runs (:func:`zero_clusters`), so
they are never allocated: the file as long as qemu-img's."""
from __future__ import annotations

from ..errors import BlkjobsError
from ..native import dio

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

DATA, ZERO, COMP = 0, 1, 2     # convert_chain's piece kinds


def old_hosts(cv: Any, a: int, b: int) -> dict[int, int]:
    """{guest cluster start: host offset} of the target's data clusters
    in [a, b) before they are allocated for the copy (its zero clusters
    are added to ``cv.old_zero``)."""
    from ..formats.base import Kind
    cs, out = cv.tg.t.cluster_size, {}
    for m in cv.tg.t.map_host(a, b - a):
        if m.kind == Kind.DATA and m.host_offset is not None:
            for g in range(m.start, m.start + m.length, cs):
                out[g] = m.host_offset + g - m.start
        elif m.kind == Kind.ZERO:       # whole zero clusters
            g0 = -(-m.start // cs) * cs
            cv.old_zero.update(range(g0, m.start + m.length - cs + 1, cs))
            if m.start + m.length >= cv.tg.t.size and g0 < m.start + m.length:
                cv.old_zero.add((m.start + m.length - 1) // cs * cs)
    return out


def not_in_place(cv: Any, m: Any, old: dict[int, int]) -> Iterator[tuple[int, int]]:
    """The host ranges of the allocated run ``m`` that are not clusters
    reused in place (those in ``old`` at the same host offset; they are
    remembered in ``cv.in_place``)."""
    if not old:
        yield m.host_offset, m.length
        return
    cs = cv.tg.t.cluster_size
    run = None
    for g in range(m.start, m.start + m.length, cs):
        h = m.host_offset + g - m.start
        ln = min(cs, m.start + m.length - g)
        if old.get(g) == h:
            cv.in_place.add(g)
            if run is not None:
                yield run
                run = None
        elif run is None:
            run = (h, ln)
        else:
            run = (run[0], run[1] + ln)
    if run is not None:
        yield run


def sparsify(cv: Any) -> None:
    """Clusters we allocated whose host range stayed a hole (the engine
    found zeroes in data the source stores, e.g. zeroes written as data)
    are dropped again, so the target maps like qemu-img's: a new target
    gets them unallocated (``discard``; a zero cluster over a backing
    file), as qemu-img writes nothing there; an existing one (-n) zero
    clusters, as qemu-img writes zeroes there (with --target-is-zero it
    writes nothing: clusters it reused in place stay as they were), and
    with -n the holes left in part of a data cluster get zero bytes, as
    qemu-img writes them. Skipped for -S 0 (fully allocate), for v2 images with a backing
    file (no zero flag) and for preallocated targets."""
    from ..native.extents import extents
    t, cs = cv.tg.t, cv.tg.t.cluster_size
    if not cv.o.sparse_size or (t.backing_filename and t.header.version < 3) \
            or cv.prealloc:       # preallocated clusters stay
        return
    # -n: qemu-img wrote zeroes there (zero clusters; their host clusters
    # freed and discarded); a fresh target: it wrote nothing (unallocated);
    # -n --target-is-zero: nothing either, the clusters stay as they were
    noc, tiz = cv.o.no_create, cv.o.target_is_zero
    if prescan(cv) and not cv.unscanned:
        # zero_clusters read every cluster of data before it was allocated
        # and left none that reads as zeroes: the holes the copy left are
        # zero blocks inside data clusters, never a whole cluster, so the
        # walk below would find nothing -- and its SEEK_HOLE over the
        # fresh clusters (unwritten extents full of dirty pages, looked up
        # page by page) was 3-7 ms of one thread after the copy, 1 GiB
        # VM-shaped raw or chain -> qcow2 (benchmarks/README.md, stop 23)
        cv.allocated = []
        return
    for m in cv.allocated:
        for e in extents(t.data_fd, m.host_offset, m.length):
            if e.data:
                continue
            # whole clusters only (host runs are cluster-aligned at their start)
            a = m.start + (-(-(e.offset - m.host_offset) // cs) * cs)
            end = m.start + (e.offset + e.length - m.host_offset)
            b = end if end >= t.size else m.start + (end - m.start) // cs * cs
            if noc:
                # the rest of a data cluster: qemu-img's copy wrote zero
                # bytes there (QEMU makes only whole clusters zero clusters)
                e_end = e.offset + e.length
                for hs, he in ((e.offset, min(e_end, m.host_offset + a - m.start)),
                               (m.host_offset + max(b, a) - m.start, e_end)):
                    g = (m.start + hs - m.host_offset) // cs * cs
                    if he > hs and g not in cv.in_place:
                        _zero_bytes(t.data_fd, hs, he)
            if b <= a:
                continue
            if not tiz:
                (t.write_zeroes if noc else t.discard)(a, b - a)
                continue
            for g in range(a, b, cs):
                if g not in cv.in_place:
                    (t.write_zeroes if g in cv.old_zero else t.discard)(g, min(cs, b - g))
    cv.allocated = []


def _zero_bytes(fd: int, host: int, end: int) -> None:
    """Write zero bytes at [host, end) of the target file."""
    z = bytes(min(end - host, 1 << 20))
    while host < end:
        host += dio.pwrite(fd, z[:min(len(z), end - host)], host)


def prescan(cv: Any) -> bool:
    """Whether data runs are read for whole zero clusters before any
    cluster is allocated for them (:func:`zero_clusters`): a new qcow2
    target without a backing file or preallocation, zero detection in
    blocks that tile a cluster, no -c."""
    t, o = cv.tg.t, cv.o
    return (not o.no_create and not o.compress and not cv.prealloc and cv.target_zero
            and t.backing_filename is None and o.sparse_size > 0
            and t.cluster_size % o.sparse_size == 0)


def zero_clusters(cv: Any, pieces: list) -> list:
    """The pieces with the target clusters that read as zeroes turned
    into ZERO pieces, as qemu-img decides before it allocates: a cluster
    whose DATA parts hold only zero bytes (the rest of it being ZERO
    pieces) gets no host cluster. (Allocated, the engine would skip its
    zeroes and :func:`sparsify` free it after the copy,
    leaving a free hole inside the file: the target ~5% longer than
    qemu-img's on the VM-shaped benchmark image.) A cluster's worth of
    data costs one 512-byte read (``zero_blocks_at``). A source that cannot
    be read here is copied as before: the engine meets the error and
    reports it as it does. Only where :func:`prescan` says so."""
    if not prescan(cv):
        return pieces
    cs, size = cv.tg.t.cluster_size, cv.size
    clusters = []                       # whole target clusters in them
    for a, b in _zero_ranges(cv, pieces, cs):
        a = -(-a // cs) * cs
        b = b if b >= size else b // cs * cs
        if b > a:
            clusters.append((a, b))
    if not clusters:
        return pieces
    out, j = [], 0
    for p in pieces:
        s, ln, kind, fd, host, back = p
        e = s + ln
        if kind != DATA or back:
            out.append(p)
            continue
        while j < len(clusters) and clusters[j][1] <= s:
            j += 1
        cur, k = s, j
        while k < len(clusters) and clusters[k][0] < e:
            za, zb = max(cur, clusters[k][0]), min(e, clusters[k][1])
            if za > cur:
                out.append([cur, za - cur, DATA, fd, host + cur - s, back])
            out.append([za, zb - za, ZERO, -1, None, False])
            cur = zb
            k += 1
        if cur < e:
            out.append([cur, e - cur, DATA, fd, host + cur - s, back])
    return out


def _zero_ranges(cv: Any, pieces: list, cs: int) -> list[list[int]]:
    """The guest ranges of ``pieces`` that read as zeroes: ZERO pieces and
    the blocks of DATA pieces found zero (the head up to a cluster boundary,
    whole clusters, the tail). A piece that cannot be read here (O_DIRECT,
    no file, a read error) sets ``cv.unscanned``: :func:`sparsify` then
    looks for what it leaves."""
    from ..native.extents import zero_blocks_at
    zero: list[list[int]] = []
    direct: dict[int, bool] = {}        # per source file, not per piece (an fcntl)

    def add(a, b):
        if zero and zero[-1][1] == a:
            zero[-1][1] = b
        else:
            zero.append([a, b])
    for s, ln, kind, fd, host, back in pieces:
        e = s + ln
        if kind == ZERO and not back:
            add(s, e)
            continue
        if kind != DATA or back:
            continue
        if fd >= 0 and fd not in direct:
            direct[fd] = dio.is_direct(fd)
        if fd < 0 or direct[fd]:
            cv.unscanned = True         # left to sparsify
            continue
        a, b = -(-s // cs) * cs, e // cs * cs
        # (a piece inside one cluster: itself)
        parts = [(s, ln, ln)] if a > b else \
            [(s, a - s, a - s), (a, b - a, cs), (b, e - b, e - b)]
        try:
            for g, n, blk in parts:
                if n <= 0:
                    continue
                # runs of zero blocks, found by bytes.find: most blocks of
                # data are not zero, and a Python step per block was ~1.5 ms
                # of the scan's 12 per 1 GiB VM-shaped image
                flags = zero_blocks_at(fd, host + g - s, n, blk)
                i = flags.find(1)
                while i >= 0:
                    k = flags.find(0, i)
                    if k < 0:
                        k = len(flags)
                    add(g + i * blk, min(g + n, g + k * blk))
                    i = flags.find(1, k)
        except (BlkjobsError, OSError):
            cv.unscanned = True         # left to sparsify
    return zero
