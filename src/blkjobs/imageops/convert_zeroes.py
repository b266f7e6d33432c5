"""A qcow2 target's clusters after convert's copy, as qemu-img leaves them
(:class:`.convert_chain.ChainConvert`, ``cv``): the clusters allocated for
data whose host range stayed a hole become unallocated (a new target) or
zero clusters (``-n``), the zero rest of a data cluster is written as zero
bytes (``-n``), and with ``-n --target-is-zero`` the clusters reused in
place are left as they were (:func:`old_hosts`, :func:`not_in_place`)."""
from __future__ import annotations

from ..native import dio

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any


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
