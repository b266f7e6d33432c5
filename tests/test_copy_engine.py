"""The C copy engine from Python: cancel mid-copy, rate limit, error sides,
per-item source fds, progress counted at completion."""
from __future__ import annotations

import os
import time

import pytest

from blkjobs.errors import Cancelled, CopyError, UsageError
from blkjobs.native.copy import COPY, COPY_SPARSE, ZERO, CopyEngine, RunResult
from blkjobs.native.extents import extents, is_zero
from blkjobs.native.ratelimit import TokenBucket

MiB = 1 << 20


def _files(tmp_path, size, data=True):
    s = tmp_path / "s"
    with open(s, "wb") as f:
        f.write(os.urandom(size) if data else b"")
        f.truncate(size)
    d = tmp_path / "d"
    with open(d, "wb") as f:
        f.truncate(size)
    return os.open(s, os.O_RDONLY), os.open(d, os.O_RDWR), s, d


def test_cancel_mid_copy(tmp_path):
    """A cancel drops the requests waiting in the rate limiter, counted: what
    was copied before it and nothing more. (At 1 byte/s no request of the
    second part can complete: a cancel that waited for them would not end.)"""
    sfd, dfd, s, d = _files(tmp_path, 64 * MiB)
    bucket = TokenBucket(0, burst=0.0)
    eng = CopyEngine(sfd, dfd, bucket=bucket, request_size=MiB)
    eng.add_copy(0, 0, 8 * MiB)
    eng.run_to_end()
    bucket.rate = 1
    eng.add_copy(8 * MiB, 8 * MiB, 56 * MiB)
    deadline = time.monotonic() + 60            # safety nets: fail, not hang
    while eng.status().throttled == 0:          # the workers wait in the limiter
        assert eng.run(0.01) == RunResult.TIMEOUT
        assert time.monotonic() < deadline, eng.status()
    eng.cancel()
    with pytest.raises(Cancelled):
        while True:
            eng.run(0.1)
            assert time.monotonic() < deadline, "the cancel waits for the rate limiter"
    st = eng.status()
    assert (st.done, st.in_flight, st.throttled) == (8 * MiB, 0, 0)
    eng.close()
    with open(s, "rb") as a, open(d, "rb") as b:
        assert a.read(8 * MiB) == b.read(8 * MiB)
        assert b.read() == bytes(56 * MiB)


def test_status_counts_requests_waiting_in_the_rate_limiter(tmp_path):
    """``throttled``: the requests in flight that wait in the limiter (the
    job reads as not busy then); back to 0 once cancelled."""
    sfd, dfd, s, d = _files(tmp_path, 8 * MiB)
    eng = CopyEngine(sfd, dfd, bucket=TokenBucket(64 << 10, burst=0.0), threads=2,
                     request_size=MiB)
    eng.add_copy(0, 0, 8 * MiB)
    eng.run(0)
    deadline = time.monotonic() + 30
    while True:
        st = eng.status()
        if st.throttled == 2:
            break
        assert time.monotonic() < deadline, st
        eng.run(0.01)
    assert st.in_flight == 2
    eng.cancel()
    with pytest.raises(Cancelled):
        while True:
            eng.run(0.1)
    st = eng.status()
    assert st.throttled == 0 and st.in_flight == 0
    eng.close()


def test_rate_limit_is_respected(tmp_path):
    sfd, dfd, s, d = _files(tmp_path, 6 * MiB)
    bucket = TokenBucket(4 * MiB, burst=0.0)
    eng = CopyEngine(sfd, dfd, bucket=bucket, threads=2)
    eng.add_copy(0, 0, 6 * MiB)
    t0 = time.monotonic()
    eng.run_to_end()
    dt = time.monotonic() - t0
    assert dt >= 1.4                               # 6 MiB at 4 MiB/s, no burst
    assert s.read_bytes() == d.read_bytes()


def test_progress_counts_completed_and_drain_stops_io(tmp_path):
    sfd, dfd, s, d = _files(tmp_path, 16 * MiB)
    eng = CopyEngine(sfd, dfd, bucket=TokenBucket(16 * MiB, burst=0.0), request_size=MiB)
    eng.add_copy(0, 0, 16 * MiB)
    deadline = time.monotonic() + 60            # a safety net
    while eng.status().done == 0:               # some of it copied
        eng.run(0.01)
        assert time.monotonic() < deadline
    eng.drain()
    st1 = eng.status()
    st2 = eng.status()
    # drained: nothing in flight, so nothing can progress until run again
    assert st1.done == st2.done and st1.in_flight == st2.in_flight == 0
    # whole requests only; the limiter splits them to rate/128 = 128 KiB
    assert st1.done > 0 and st1.done % (128 << 10) == 0
    eng.run_to_end()
    assert eng.status().done == 16 * MiB
    assert s.read_bytes() == d.read_bytes()


def test_read_error_names_source(tmp_path):
    dfd = os.open(tmp_path / "d", os.O_RDWR | os.O_CREAT)
    wfd = os.open("/dev/null", os.O_WRONLY)
    eng = CopyEngine(wfd, dfd, src_path="/dev/null", dst_path=str(tmp_path / "d"))
    eng.add_copy(4096, 0, 4096)
    with pytest.raises(CopyError) as ei:
        eng.run_to_end()
    assert str(ei.value) == "error reading source '/dev/null' at offset 4096: Bad file descriptor"
    assert ei.value.side == "source"


def test_items_from_several_fds_and_zero_items(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"A" * MiB)
    b.write_bytes(b"B" * MiB)
    d = tmp_path / "d"
    d.write_bytes(b"\xee" * (3 * MiB))
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    dfd = os.open(d, os.O_RDWR)
    eng = CopyEngine(-1, dfd, zero_block=0)
    eng.add([(0, 0, MiB, COPY, fa), (0, MiB, MiB, COPY, fb), (0, 2 * MiB, MiB, ZERO)])
    eng.run_to_end()
    assert d.read_bytes() == b"A" * MiB + b"B" * MiB + bytes(MiB)
    with pytest.raises(UsageError):
        CopyEngine(fa, dfd, threads=0)


def test_sparse_items_probe_holes(tmp_path):
    s = tmp_path / "s"
    with open(s, "wb") as f:
        f.truncate(300 * MiB)          # over two 128 MiB work ranges
        f.seek(250 * MiB)
        f.write(b"x" * 4096)
    sfd = os.open(s, os.O_RDONLY)
    assert [e.data for e in extents(sfd, 0, 300 * MiB)] == [False, True, False]
    d = tmp_path / "d"
    dfd = os.open(d, os.O_RDWR | os.O_CREAT)
    os.ftruncate(dfd, 300 * MiB)
    eng = CopyEngine(sfd, dfd, target_is_zero=True)
    eng.add([(0, 0, 300 * MiB, COPY_SPARSE)])
    st = eng.run_to_end()
    assert st.data_bytes == 4096 and st.zero_bytes == 300 * MiB - 4096
    assert os.pread(dfd, 4096, 250 * MiB) == b"x" * 4096
    assert is_zero(os.pread(dfd, MiB, 0))


def test_adjacent_items_merge_into_requests(tmp_path):
    """Items that continue each other in both files (an incremental backup's
    clusters: scattered in the guest, consecutive on the hosts) are copied by
    requests of request_size; a gap in the source, another source file or
    another kind keeps them apart."""
    sfd, dfd, s, d = _files(tmp_path, 8 * MiB)
    c64 = 64 << 10
    eng = CopyEngine(sfd, dfd, request_size=MiB, zero_block=0)
    eng.add([(i * c64, i * c64, c64, COPY) for i in range(32)])        # 2 MiB: 2 requests
    st = eng.run_to_end()
    assert (st.done, st.requests) == (2 * MiB, 2)
    # the source skips a cluster between items: 16 requests
    eng.add([(2 * MiB + 2 * i * c64, 2 * MiB + i * c64, c64, COPY) for i in range(16)])
    st = eng.run_to_end()
    assert (st.done, st.requests) == (3 * MiB, 2 + 16)
    # zero items merge by their target offsets
    eng.add([(0, 4 * MiB + i * c64, c64, ZERO) for i in range(16)])
    st = eng.run_to_end()
    assert (st.done, st.requests) == (4 * MiB, 2 + 16 + 1)
    eng.close()
    data = s.read_bytes()
    got = d.read_bytes()
    assert got[:2 * MiB] == data[:2 * MiB]
    assert got[2 * MiB:3 * MiB] == b"".join(
        data[2 * MiB + 2 * i * c64:2 * MiB + 2 * i * c64 + c64] for i in range(16))
    assert got[3 * MiB:] == bytes(5 * MiB)


def test_item_continuing_a_finished_one_is_copied(tmp_path):
    """An engine is reused batch after batch: an item continuing the last one,
    which was wholly copied already, merges into it and is copied too (and
    the items from another fd after it keep their own source)."""
    sfd, dfd, s, d = _files(tmp_path, 4 * MiB)
    other = tmp_path / "o"
    other.write_bytes(b"O" * MiB)
    ofd = os.open(other, os.O_RDONLY)
    eng = CopyEngine(sfd, dfd, request_size=MiB, zero_block=0, threads=2)
    eng.add([(0, 0, MiB, COPY)])
    assert eng.run_to_end().done == MiB
    eng.add([(MiB, MiB, MiB, COPY), (2 * MiB, 2 * MiB, MiB, COPY, sfd),
             (0, 3 * MiB, MiB, COPY, ofd)])
    st = eng.run_to_end()
    assert (st.done, st.data_bytes) == (4 * MiB, 4 * MiB)
    eng.close()
    assert d.read_bytes() == s.read_bytes()[:3 * MiB] + b"O" * MiB
