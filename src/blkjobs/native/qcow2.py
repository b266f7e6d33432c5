"""qcow2 metadata hot loop (csrc/qcow2.c): L2 tables to coalesced runs."""
from __future__ import annotations

from ._lib import ffi, lib

UNALLOCATED = 0
ZERO = 1
DATA = 2


class L2Decoder:
    """Reusable run buffer (one per open image: not thread-safe)."""

    def __init__(self, max_runs: int = 4096):
        self._max = max_runs
        self._runs = ffi.new("struct bj_l2run[]", max_runs)
        self._stop = ffi.new("size_t *")

    def runs(self, table, first: int, n: int, cluster_bits: int, host_limit: int,
             v3: bool) -> tuple[list[tuple[int, int, int, int]], int]:
        """Decode entries [first, first+n) of the L2 ``table`` (bytes-like).
        Returns ([(first, count, kind, host)], stop): entries from ``stop``
        on were not decoded (unusual entry: the caller handles it)."""
        out: list[tuple[int, int, int, int]] = []
        buf = ffi.from_buffer(table)
        pos, end = first, first + n
        while pos < end:
            rc = lib.bj_qcow2_l2_runs(buf, len(buf), pos, end - pos, cluster_bits,
                                      host_limit, int(v3), self._runs, self._max, self._stop)
            if rc == -22:       # EINVAL: arguments out of range
                raise ValueError("bad L2 decode arguments")
            cnt = self._max if rc < 0 else rc
            r = self._runs
            out.extend((int(r[i].first), int(r[i].count), int(r[i].kind), int(r[i].host))
                       for i in range(cnt))
            stop = int(self._stop[0])
            if rc >= 0 or stop <= pos:
                return out, stop
            pos = stop          # ENOBUFS: continue where it stopped
        return out, end


class L2Mapper:
    """A guest range's runs through one L2 table in one C call per 1024
    runs (csrc/qcow2.c ``bj_qcow2_map``). Reusable buffer: one per open
    image, used under its lock."""

    _MAX = 1024

    def __init__(self) -> None:
        self._out = ffi.new("uint64_t[]", 4 * self._MAX)
        self._stop = ffi.new("uint64_t *")

    def map(self, table, table_guest: int, pos: int, end: int, cluster_bits: int,
            host_limit: int, v3: bool) -> tuple[list[int], int]:
        """Runs of guest [pos, end) (inside the range ``table`` maps, its
        entry 0 at guest ``table_guest``) as a flat list, 4 ints a run:
        start, length, kind (:data:`DATA_RUN`, :data:`ZERO_RUN`,
        :data:`UNALLOCATED_RUN`), host offset (0: none); and where the walk
        stopped: ``end``, or the start of a cluster whose entry is the
        caller's (unusual: compressed, reserved bits, out of the file...).
        Adjacent runs are merged as the C loop merges them."""
        buf = ffi.from_buffer(table)
        out: list[int] = []
        while True:
            n = lib.bj_qcow2_map(buf, len(buf), table_guest, pos, end, cluster_bits,
                                 host_limit, int(v3), self._out, self._MAX, self._stop)
            if n < 0:
                raise ValueError("bad L2 map arguments")
            stop = int(self._stop[0])
            if n:
                got = ffi.unpack(self._out, 4 * n)
                if out and _continues(out, got):
                    out[-3] += got[1]
                    del got[:4]
                out += got
            if n < self._MAX or stop >= end:
                return out, stop
            pos = stop          # the buffer was full: on from there


#: kinds of L2Mapper runs (formats.base.Kind's values)
DATA_RUN, ZERO_RUN, UNALLOCATED_RUN = 0, 1, 2


def _continues(a: list[int], b: list[int]) -> bool:
    """Does the first run of flat list ``b`` continue the last of ``a``
    (one kind, adjacent, hosts both none or contiguous)?"""
    s, n, k, h = a[-4:]
    return (b[2] == k and s + n == b[0]
            and ((h == 0 and b[3] == 0) or (h != 0 and b[3] != 0 and h + n == b[3])))


# -- the NBD export's reads (csrc/qcow2.c bj_qcow2_read_segs) ------------------
#: a batch's segment array at most (32 bytes each): a read that does not fit
#: is the caller's (its Python path)
_MAX_SEGS = 1 << 16
#: segment buffers are not cleared (C writes every word handed out)
_alloc = ffi.new_allocator(should_clear_after_alloc=False)


class Segments:
    """One read's segments (kind, fd, host, length) in a C array that
    :func:`read_segments` filled; :class:`.nbdserve.Session` copies them
    into its queue as they are. Iterating gives the tuples (tests, the
    padding of the export's last sector)."""

    __slots__ = ("buf", "first", "n")

    def __init__(self, buf, first: int, n: int):
        self.buf, self.first, self.n = buf, first, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        b, f = self.buf, 4 * self.first
        return iter([(int(b[f + 4 * i]), int(b[f + 4 * i + 1]), int(b[f + 4 * i + 2]),
                      int(b[f + 4 * i + 3])) for i in range(self.n)])

    def words(self) -> tuple[object, int]:
        """(pointer to the first word, number of words): native only."""
        return self.buf + 4 * self.first, 4 * self.n


def read_segments(table: bytearray | None, nent: int, table_guest: int, cluster_bits: int,
                  host_limit: int, v3: bool, unalloc_zero: bool, fd: int,
                  reqs: list[tuple[int, int]]) -> list[Segments | None]:
    """The segments of the reads ``reqs`` ((guest offset, length), each in
    the range of the standard L2 ``table`` of ``nent`` entries whose entry 0
    maps ``table_guest``; None: a table not allocated): DATA clusters as
    data on ``fd`` (zeroes past the end of the file), ZERO clusters -- and
    UNALLOCATED ones with ``unalloc_zero`` -- as zeroes. None for a read
    that is the caller's (an entry the C mapper does not take, an
    unallocated cluster without ``unalloc_zero``, no room)."""
    n = len(reqs)
    bound = (sum(k for _, k in reqs) >> cluster_bits) + 2 * n
    cap = min(bound, _MAX_SEGS)
    segs = _alloc("uint64_t[]", 4 * cap)
    rq = ffi.new("uint64_t[]", [w for r in reqs for w in r])
    counts = ffi.new("uint64_t[]", n)
    tbl = ffi.from_buffer(table) if table is not None else ffi.NULL
    rc = lib.bj_qcow2_read_segs(tbl, 8 * nent, table_guest, cluster_bits, host_limit, int(v3),
                                int(unalloc_zero), fd, rq, n, segs, cap, counts)
    if rc < 0:
        raise ValueError("bad L2 read-segment arguments")
    out: list[Segments | None] = []
    pos = 0
    for k in ffi.unpack(counts, n):
        if k:
            out.append(Segments(segs, pos, k))
            pos += k
        else:
            out.append(None)
    return out
