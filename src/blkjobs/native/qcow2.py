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
