"""Micro-benchmarks of the C hot paths, with pytest-benchmark.

Not part of the test suite (tests/ is): run them on purpose, and compare
with the stored baseline (benchmarks/.benchmarks, this machine's figures):

    pip install -e '.[bench]'
    python -m pytest benchmarks/test_micro.py --benchmark-storage=benchmarks/.benchmarks \\
        --benchmark-compare=0001 --benchmark-compare-fail=median:25%
    # a new baseline after a deliberate change:
    python -m pytest benchmarks/test_micro.py --benchmark-storage=benchmarks/.benchmarks \\
        --benchmark-save=baseline

Each benchmark calls the C function through the same cffi binding blkjobs
uses, on inputs built once (numpy) outside the timed part, and checks the
answer, so a faster wrong result does not pass. A baseline from another
machine, or from a busy one, is not comparable: the figures are this
machine's (2 shared cores: expect a few % of noise, more under load).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from blkjobs.native._lib import ffi, lib
from blkjobs.native.bitmap import Bitmap
from blkjobs.native.extents import extents
from blkjobs.native.qcow2 import DATA, UNALLOCATED, ZERO, L2Decoder
from blkjobs.native.ratelimit import TokenBucket

MiB = 1 << 20


# -- zero scan (zero.c): the copy engine runs it over every data request -----

def test_zero_scan_all_zero(benchmark):
    buf = np.zeros(2 * MiB, dtype=np.uint8)            # a whole request: worst case
    p = ffi.from_buffer(buf)
    assert benchmark(lib.bj_zero_run, p, buf.nbytes, 4096, 1) == buf.nbytes


def test_zero_scan_mixed(benchmark):
    """Data blocks with a zero block every 8: the engine's run splitting."""
    rng = np.random.default_rng(1)
    buf = rng.integers(1, 256, 2 * MiB, dtype=np.uint8)
    blocks = buf.reshape(-1, 4096)
    blocks[::8] = 0
    p = ffi.from_buffer(buf)

    def split():
        pos, runs, want = 0, 0, 1
        while pos < buf.nbytes:
            n = lib.bj_zero_run(p + pos, buf.nbytes - pos, 4096, want)
            pos += n
            runs += n > 0
            want ^= 1
        return runs
    assert benchmark(split) == 2 * (buf.nbytes // 4096 // 8)


# -- extent walk (extents.c): SEEK_DATA/SEEK_HOLE over a fragmented file ------

@pytest.fixture(scope="module")
def fragmented(tmp_path_factory):
    """64 MiB with a 4 KiB data block every 16 KiB: 4096 data extents."""
    path = tmp_path_factory.mktemp("micro") / "frag.raw"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, 64 * MiB)
    blk = b"\x5a" * 4096
    for off in range(0, 64 * MiB, 16384):
        os.pwrite(fd, blk, off)
    os.fsync(fd)
    yield fd
    os.close(fd)


def test_extent_walk(benchmark, fragmented):
    ext = benchmark(extents, fragmented, 0, 64 * MiB)
    assert sum(1 for e in ext if e.data) == 4096


# -- dirty bitmap (bitmap.c): set scattered areas, walk them back -------------

def test_bitmap_set(benchmark):
    offs = (np.random.default_rng(2).integers(0, 1 << 24, 10000) * 65536).tolist()

    def run():
        bm = Bitmap(1 << 40, 65536)                       # a 1 TiB disk
        for o in offs:
            bm.set(o, 65536)
        return bm
    bm = benchmark(run)
    assert bm.dirty_granules() == len(set(offs))


def test_bitmap_next_dirty(benchmark):
    bm = Bitmap(1 << 40, 65536)
    offs = sorted(set((np.random.default_rng(3).integers(0, 1 << 24, 10000) * 65536).tolist()))
    for o in offs:
        bm.set(o, 65536)

    def walk():
        n, pos = 0, bm.next_dirty(0)
        while pos is not None:
            n += 1
            pos = bm.next_dirty(pos + 65536) if pos + 65536 < bm.size else None
        return n
    assert benchmark(walk) == len(offs)


# -- qcow2 L2 decode (qcow2.c): one 64 KiB L2 table into runs -----------------

def test_l2_decode(benchmark):
    """8192 entries: runs of 16 contiguous data clusters, alternating with
    runs of 8 zero (flag) and 8 unallocated entries."""
    cb = 16                                             # 64 KiB clusters
    ent = np.zeros(8192, dtype=">u8")
    host = 1 << 30
    i = 0
    while i < 8192:
        n = min(16, 8192 - i)
        ent[i:i + n] = (host + np.arange(n, dtype=np.uint64) * (1 << cb)) | (1 << 63)
        host += n << cb
        i += n
        ent[i:i + 8] = 1                                 # QCOW_OFLAG_ZERO
        i += 16                                          # then 8 unallocated
    table = ent.tobytes()
    dec = L2Decoder()
    runs, stop = benchmark(dec.runs, table, 0, 8192, cb, 1 << 50, True)
    assert stop == 8192
    kinds = [r[2] for r in runs]
    assert kinds[:3] == [DATA, ZERO, UNALLOCATED] and len(runs) == 3 * (8192 // 32)


# -- token bucket (ratelimit.c): one take per request of the copy engine ------

def test_bucket_take(benchmark):
    b = TokenBucket(200 * MiB, clock=lambda: 0)
    c = b._cptr()
    take = lib.bj_bucket_take

    def takes():
        w = 0
        for _ in range(10000):
            w = take(c, 4096, 0)
        return w
    assert benchmark(takes) > 0
