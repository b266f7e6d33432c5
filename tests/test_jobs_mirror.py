"""mirror: sync modes, READY, complete with pivot, soft cancel, copy modes."""
from __future__ import annotations

import pytest

from test_jobs_helpers import (SIZE, MiB, Writer, assert_same, check, eng, mkimg,  # noqa: F401
                               snapshot)

WRITES = [("0x11", 0, 1 * MiB), ("0x22", 2 * MiB + 4096, 300 << 10), (None, 3 * MiB, 64 << 10)]


def wait_writes(w, n, timeout=20):
    import time
    end = time.monotonic() + timeout
    start = w.count
    while w.count < start + n:
        assert time.monotonic() < end, "writer made no progress"
        time.sleep(0.01)


def dump(fe, out):
    with open(out, "wb") as f:
        f.write(fe.read(0, fe.size))
    return str(out)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("mode", ["background", "write-blocking"])
def test_full_complete_pivots_under_writer(eng, tmp_path, fmt, mode):
    src = mkimg(tmp_path / f"src.{fmt}", fmt, writes=WRITES)
    dst = mkimg(tmp_path / f"dst.{fmt}", fmt, writes=[("0x99", 0, SIZE)])   # stale junk
    model = bytearray(open(snapshot(src, fmt, tmp_path / "start.raw"), "rb").read())
    s = eng.open(src, fmt, node_name="src")
    d = eng.open(dst, fmt, node_name="dst")
    vm = eng.attach(s)
    ev = eng.listen()
    job = eng.mirror("src", "dst", sync="full", job_id="m0", copy_mode=mode)
    w = Writer(vm, SIZE, max_len=16 << 10, model=model)
    w.start()
    ev.wait_for("BLOCK_JOB_READY", timeout=30, device="m0")
    assert eng.query_block_jobs()[0]["ready"]
    if mode == "write-blocking":
        assert eng.query_block_jobs()[0]["actively-synced"]
    wait_writes(w, 200)
    eng.job_complete("m0")
    assert eng.wait_job(job, 30).value == "completed"
    w.stop()
    assert w.count > 5
    assert vm.node is d                  # pivot: the VM now writes to the target
    vm.write(0, b"\x77" * 4096)          # and keeps working
    model[:4096] = b"\x77" * 4096
    eng.close()
    # every write the guest made, before the pivot (mirrored) and after it
    # (straight to the target), against the source as it was at the start
    want = tmp_path / "want.raw"
    want.write_bytes(bytes(model))
    assert_same(str(want), dst, "raw", fmt)
    if fmt == "qcow2":
        check(dst)


def test_soft_cancel_in_ready_keeps_source(eng, tmp_path):
    src = mkimg(tmp_path / "src.qcow2", writes=WRITES)
    dst = mkimg(tmp_path / "dst.qcow2")
    s = eng.open(src, node_name="src")
    eng.open(dst, node_name="dst")
    vm = eng.attach(s)
    ev = eng.listen()
    job = eng.mirror("src", "dst", sync="full", job_id="m0")
    ev.wait_for("BLOCK_JOB_READY", timeout=20)
    vm.write(8192, b"\x42" * 8192)
    eng.job_cancel("m0", force=False)                       # soft
    assert eng.wait_job(job, 20).value == "completed"
    done = ev.wait_for(["BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"], timeout=5)
    assert done.name == "BLOCK_JOB_COMPLETED" and "error" not in done.data
    assert vm.node is s                               # no pivot
    snap = dump(vm, tmp_path / "guest.raw")
    vm.write(0, b"\x01" * 4096)                       # source still writable, target not touched
    eng.close()
    assert_same(snap, dst, "raw", "qcow2")


def test_forced_cancel_before_ready(eng, tmp_path):
    src = mkimg(tmp_path / "src.qcow2", writes=WRITES)
    dst = mkimg(tmp_path / "dst.qcow2")
    s = eng.open(src, node_name="src")
    eng.open(dst, node_name="dst")
    ev = eng.listen()
    eng.blkdebug_break("dst", "pwritev", "w")        # not ready yet
    job = eng.mirror("src", "dst", sync="full", job_id="m0")
    eng.blkdebug_wait_break("w")
    eng.job_cancel("m0", force=False)                        # soft before ready = forced
    eng.blkdebug_resume("w")
    assert eng.wait_job(job, 20).value == "cancelled"
    assert ev.wait_for("BLOCK_JOB_CANCELLED", timeout=5)
    vm = eng.attach(s)
    vm.write(0, b"\x01" * 4096)


def test_top_and_none(eng, tmp_path):
    mkimg(tmp_path / "base.qcow2", writes=[("0x44", 0, SIZE)])
    top = mkimg(tmp_path / "top.qcow2", backing="base.qcow2", writes=[("0x55", 1 * MiB, 128 << 10)])
    tgt = mkimg(tmp_path / "tgt.qcow2", backing="base.qcow2")
    t = eng.open(top, node_name="top")
    eng.open(tgt, node_name="tgt")
    vm = eng.attach(t)
    ev = eng.listen()
    job = eng.mirror("top", "tgt", sync="top", job_id="m0")
    ev.wait_for("BLOCK_JOB_READY", timeout=20)
    vm.write(3 * MiB, b"\x66" * 5000)
    eng.job_complete("m0")
    assert eng.wait_job(job, 20).value == "completed"
    assert vm.node.name == "tgt"
    eng.close()
    assert_same(top, tgt, "qcow2", "qcow2")   # the source as the guest left it


def test_none_mirrors_only_new_writes(eng, tmp_path):
    src = mkimg(tmp_path / "src.qcow2", writes=WRITES)
    dst = mkimg(tmp_path / "dst.qcow2")
    s = eng.open(src, node_name="src")
    eng.open(dst, node_name="dst")
    vm = eng.attach(s)
    ev = eng.listen()
    job = eng.mirror("src", "dst", sync="none", job_id="m0")
    ev.wait_for("BLOCK_JOB_READY", timeout=20)
    vm.write(3 * MiB + 4096, b"\x66" * 4096)
    eng.job_cancel("m0", force=False)
    assert eng.wait_job(job, 20).value == "completed"
    eng.close()
    raw = tmp_path / "t.raw"
    snapshot(dst, "qcow2", raw)
    got = raw.read_bytes()
    assert got[3 * MiB + 4096:3 * MiB + 8192] == b"\x66" * 4096
    assert got[:1 * MiB] == bytes(1 * MiB)


def test_change_to_write_blocking_and_validation(eng, tmp_path):
    src = mkimg(tmp_path / "src.qcow2", writes=WRITES)
    dst = mkimg(tmp_path / "dst.qcow2")
    eng.open(src, node_name="src")
    eng.open(dst, node_name="dst")
    small = mkimg(tmp_path / "small.qcow2", size=SIZE // 2)
    eng.open(small, node_name="small")
    for kw, msg in [(dict(sync="bitmap"), "Sync mode 'bitmap' not supported"),
                    (dict(sync="full", granularity=100),
                     "Parameter 'granularity' expects a value in range [512B, 64MB]"),
                    (dict(sync="full", granularity=3072),
                     "Parameter 'granularity' expects a power of 2"),
                    (dict(sync="full", buf_size=-1), "Invalid parameter 'buf-size'"),
                    (dict(sync="full", target="src"), "Can't mirror node into itself")]:
        kw.setdefault("target", "dst")
        with pytest.raises(Exception) as ei:
            eng.mirror("src", job_id="m0", **kw)
        assert str(ei.value) == msg
    ev = eng.listen()
    job = eng.mirror("src", "small", sync="full", job_id="m1")
    assert eng.wait_job(job, 10).value == "failed"
    assert ev.wait_for("BLOCK_JOB_COMPLETED").data["error"] == \
        "Source and target image have different sizes"
    job = eng.mirror("src", "dst", sync="full", job_id="m2")
    ev.wait_for("BLOCK_JOB_READY", timeout=20)
    eng.job_change("m2", "mirror", **{"copy-mode": "write-blocking"})
    assert eng.query_block_jobs()[0]["actively-synced"]
    eng.job_complete("m2")
    assert eng.wait_job(job, 20).value == "completed"


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_ready_copies_only_the_sub_blocks_written(eng, tmp_path, monkeypatch, fmt):
    """A 4 KiB guest write in READY copies those 4 KiB, not the 64 KiB
    granule around it; one that starts a fresh target cluster goes through
    allocation (the rest of the cluster filled from the source)."""
    import time

    from blkjobs.jobs.blockcopy import Mover
    src = mkimg(tmp_path / f"src.{fmt}", fmt, writes=WRITES)
    dst = mkimg(tmp_path / f"dst.{fmt}", fmt)
    s = eng.open(src, fmt, node_name="src")
    eng.open(dst, fmt, node_name="dst")
    vm = eng.attach(s)
    ev = eng.listen()
    job = eng.mirror("src", "dst", sync="full", job_id="m0")
    ev.wait_for("BLOCK_JOB_READY", timeout=20)
    planned = []
    plan = Mover.plan
    monkeypatch.setattr(Mover, "plan", lambda self, off, n, st, undo=None:
                        planned.append((off, n)) or plan(self, off, n, st, undo))
    many = Mover._plan_many

    def plan_many(self, pieces, st, undo, items):      # several planned together
        m = many(self, pieces, st, undo, items)
        planned.extend(pieces[:m])
        return m
    monkeypatch.setattr(Mover, "_plan_many", plan_many)
    vm.write(2 * MiB + 4096 + 8192, b"\x5a" * 4096)   # data cluster: copied in place
    vm.write(3 * MiB + 128 * 1024 + 4096, b"\x5b" * 4096)   # a zero area of the target
    end = time.monotonic() + 20
    while len(planned) < 2:
        assert time.monotonic() < end, planned
        time.sleep(0.01)
    assert sorted(planned) == [(2 * MiB + 12288, 4096), (3 * MiB + 131072 + 4096, 4096)]
    eng.job_complete("m0")
    assert eng.wait_job(job, 20).value == "completed"
    assert vm.node.name == "dst"
    eng.close()
    assert_same(src, dst, fmt, fmt)         # the source as the guest left it
    if fmt == "qcow2":
        check(dst)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_write_between_setup_and_start_keeps_whole_granule(eng, tmp_path, fmt):
    """A guest write after the job's filter is in place but before the job
    runs marks its granule partly dirty; the initial full pass must still
    copy the whole granule (regression: only the written 4 KiB arrived)."""
    src = mkimg(tmp_path / "src.qcow2", writes=[("0x33", 0, SIZE)])
    dst = mkimg(tmp_path / f"dst.{fmt}", fmt)
    s = eng.open(src, node_name="src")
    eng.open(dst, fmt, node_name="dst")
    vm = eng.attach(s)
    ev = eng.listen()
    job = eng.mirror("src", "dst", sync="full", job_id="m0", start=False)
    vm.write(MiB + 4096, b"\x44" * 4096)
    eng.jobs.start(job)
    ev.wait_for("BLOCK_JOB_READY", timeout=20)
    eng.job_complete("m0")
    assert eng.wait_job(job, 20).value == "completed"
    assert vm.node.name == "dst"
    eng.close()
    assert_same(src, dst, "qcow2", fmt)     # the source as the guest left it


def _wait_until(eng, cond):
    with eng.io.lock:
        while not cond():
            eng.io.lock.wait(0.05)      # polled: threads ending do not notify the I/O lock


@pytest.mark.parametrize("when", ["pivot", "start"])
def test_guest_write_held_in_the_source_driver_reaches_the_target(eng, tmp_path, when):
    """A guest write suspended inside the source's driver (a break point
    standing in for slow I/O; past the mirror's filter at the pivot, or
    issued before the filter existed at the start) is waited for, as
    QEMU's drain waits for requests in flight: the pivot does not leave it
    behind on the source, and the first pass does not copy its range before
    it lands unseen by the filter. Both lost the write before."""
    import threading
    src = mkimg(tmp_path / "src.qcow2", writes=WRITES)
    dst = mkimg(tmp_path / "dst.qcow2")
    model = bytearray(open(snapshot(src, "qcow2", tmp_path / "start.raw"), "rb").read())
    s = eng.open(src, node_name="src")
    eng.open(dst, node_name="dst")
    vm = eng.attach(s)
    ev = eng.listen()
    off, data = 2 * MiB + 8192, b"\xee" * 4096
    model[off:off + len(data)] = data
    writer = threading.Thread(target=vm.write, args=(off, data))
    if when == "start":
        eng.blkdebug_break("src", "pwritev", "g")
        writer.start()
        eng.blkdebug_wait_break("g")
        job = eng.mirror("src", "dst", sync="full", job_id="m0")
        _wait_until(eng, lambda: getattr(s.io_state, "write_waiters", 0) > 0
                    or eng.query_block_jobs()[0]["ready"])
        assert not eng.query_block_jobs()[0]["ready"], "the mirror went on past a write in flight"
        eng.blkdebug_resume("g")
        ev.wait_for("BLOCK_JOB_READY", timeout=30, device="m0")
    else:
        job = eng.mirror("src", "dst", sync="full", job_id="m0")
        ev.wait_for("BLOCK_JOB_READY", timeout=30, device="m0")
        eng.blkdebug_break("src", "pwritev", "g")
        writer.start()
        eng.blkdebug_wait_break("g")
        eng.job_complete("m0")
        _wait_until(eng, lambda: getattr(s.io_state, "write_waiters", 0) > 0
                    or job.status.value in ("pending", "concluded", "null"))
        assert job.status.value == "ready", "the pivot went on past a write in flight"
        eng.blkdebug_resume("g")
    writer.join(30)
    if when == "start":
        eng.job_complete("m0")
    assert eng.wait_job(job, 30).value == "completed"
    eng.close()
    want = tmp_path / "want.raw"
    want.write_bytes(bytes(model))
    assert_same(str(want), dst, "raw", "qcow2")
    check(dst)


def test_a_range_dirtied_while_in_flight_waits_for_that_copy(eng, tmp_path):
    """A granule written again while a batch still copies it must not be
    taken by the next batch (copy_loop keeps two in flight): the first batch
    may have read the old data and land after the second's copy of the new
    data, leaving the target stale with nothing dirty (the under-writer
    pivot test saw it 1 run in 25 under load, on raw)."""
    src = mkimg(tmp_path / "src.qcow2", writes=[("0x33", 0, SIZE)])
    dst = mkimg(tmp_path / "dst.qcow2")
    eng.open(src, node_name="src")
    eng.open(dst, node_name="dst")
    job = eng.mirror("src", "dst", sync="full", job_id="m0", start=False)
    m = job.driver
    g = m.granularity
    with eng.io:
        m.initial_dirty()
        token = m.inflight.add(0, g)        # a batch copies granule 0 ...
        m.dirty.take_dirty_area(0, g)
        m.parts.mark_written(4096, 4096)    # ... and the guest wrote into it
    claim = m._claim_any(job)
    assert not claim or all(a >= g for a, _ in claim)
    assert m.dirty.test(0)                  # still to copy, after that batch
    with eng.io:
        m.inflight.remove(token)
    claim = m._claim_any(job)
    assert claim and claim[0] == (4096, 4096)   # only the sub-block written
