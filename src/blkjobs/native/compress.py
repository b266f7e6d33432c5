"""Parallel deflate of qcow2 clusters (csrc/compress.c): one call per chunk,
every cluster compressed on ``threads`` C threads with the GIL released."""
from __future__ import annotations

from ._lib import ensure, ffi, lib

#: the length reported for an all-zero cluster (nothing compressed)
ZERO = lib.BJ_DEFLATE_ZERO


class Deflater:
    """Compresses chunks of up to ``max_clusters`` clusters of ``cs`` bytes
    into raw deflate streams with a 4 KiB window (what QEMU inflates).
    A stream longer than ``limit`` bytes is reported as 0: store the
    cluster plain."""

    def __init__(self, cs: int, max_clusters: int, threads: int, limit: int,
                 level: int = 6, window_bits: int = 12):
        self.cs, self.max, self.threads = cs, max_clusters, threads
        self.limit, self.level, self.wbits = limit, level, window_bits
        self._out = ffi.new("uint8_t[]", cs * max_clusters)
        self._len = ffi.new("uint32_t[]", max_clusters)
        self.out = ffi.buffer(self._out)

    def run(self, buf) -> list[int]:
        """Compress the bytes-like ``buf`` (whole clusters but the last);
        the length of each cluster's stream in ``out[i*cs:]``, or
        :data:`ZERO`, or 0."""
        mv = memoryview(buf)
        size = mv.nbytes
        n = -(-size // self.cs)
        if n > self.max:
            raise ValueError("more clusters than the Deflater holds")
        if n == 0:
            return []
        last = size - (n - 1) * self.cs
        ensure(lib.bj_deflate_clusters(ffi.from_buffer(mv), n, self.cs, last, self._out,
                                       self._len, self.limit, self.level, self.wbits,
                                       self.threads), "compress")
        return list(self._len[0:n])
