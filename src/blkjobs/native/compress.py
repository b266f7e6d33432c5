"""Parallel deflate of qcow2 clusters (csrc/compress.c): one call per chunk,
every cluster compressed on ``threads`` C threads with the GIL released.

Two codecs write the same format (raw deflate, no match further back than
QEMU's 4 KiB window): zlib, always built in, and ISA-L's igzip where the
build found libisal-dev (several times less CPU per cluster, streams a few
per cent longer or shorter depending on the data: benchmarks/README.md).
:data:`DEFAULT_CODEC` is igzip when built in; ``BLKJOBS_DEFLATE=zlib`` in
the environment chooses zlib (the benchmarks compare the two)."""
from __future__ import annotations

import os

from ._lib import ensure, ffi, lib

#: the length reported for an all-zero cluster (nothing compressed)
ZERO = lib.BJ_DEFLATE_ZERO
ZLIB, ISAL = lib.BJ_CODEC_ZLIB, lib.BJ_CODEC_ISAL
#: the codecs built in
CODECS = frozenset(c for c in (ZLIB, ISAL) if lib.bj_deflate_codecs() & (1 << c))
DEFAULT_CODEC = ZLIB if (ISAL not in CODECS
                         or os.environ.get("BLKJOBS_DEFLATE", "").lower() == "zlib") else ISAL
#: each codec's level: zlib's QEMU's (6), igzip's its strongest (3)
LEVEL = {ZLIB: 6, ISAL: 3}


class Deflater:
    """Compresses chunks of up to ``max_clusters`` clusters of ``cs`` bytes
    into raw deflate streams with a 4 KiB window (what QEMU inflates).
    A stream longer than ``limit`` bytes is reported as 0: store the
    cluster plain."""

    def __init__(self, cs: int, max_clusters: int, threads: int, limit: int,
                 level: int | None = None, window_bits: int = 12,
                 codec: int | None = None):
        self.cs, self.max, self.threads = cs, max_clusters, threads
        self.codec = DEFAULT_CODEC if codec is None else codec
        self.level = LEVEL[self.codec] if level is None else level
        self.limit, self.wbits = limit, window_bits
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
                                       self._len, self.limit, self.codec, self.level,
                                       self.wbits, self.threads), "compress")
        return list(self._len[0:n])
