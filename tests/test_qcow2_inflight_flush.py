"""What a qcow2 flush may write while a job's batch is in flight: never an L2
entry naming a cluster whose data the C engine has not written yet.

The copy machinery allocates a batch's target clusters (their L2 entries set
in the driver's cache) under the I/O lock and lets the C engine write the data
later. A flush meanwhile -- the L2 cache evicting tables, or any other flush
of the node -- used to put those entries on disk: a crash then left the
clusters reading zeroes (a fresh host cluster) where the top read through to
its backing file (data loss for a stream). The driver now holds those
clusters (``tables.L2Tables._hold``): a flush writes their old entries.

The crash state is a ``cp --sparse=always`` of the image taken under the I/O
lock while a rate-limited batch is in flight; ``qemu-img`` judges it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time

import pytest

from blkjobs.formats.qcow2 import tables
from test_jobs_helpers import MiB, check, eng, mkimg, qimg, qio, snapshot  # noqa: F401

#: slow enough that a 512 KiB batch stays in flight for seconds (the engine
#: waits in its rate limiter), fast enough to finish once set to 0
SLOW = 64 << 10


def wait_in_flight(job, timeout=60):
    """Until the job's batch is queued in the C engine, which waits in the
    rate limiter (its planning, allocations included, is done)."""
    end = time.monotonic() + timeout
    while not job.driver.throttled(job):
        assert job.outcome is None, job.outcome
        assert time.monotonic() < end, "the batch never reached the engine"
        time.sleep(0.002)


def crash_copy(eng, path, out):
    """The image file as a crash would leave it now (no flush, no close)."""
    with eng.io:
        subprocess.run(["cp", "--sparse=always", str(path), str(out)], check=True)
    return str(out)


def leaks_only(path):
    """qemu-img check of a crash copy: no errors; returns the leak count
    (exit status 3: leaks only; 0: clean)."""
    p = subprocess.run([shutil.which("qemu-img"), "check", "-U", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode in (0, 3), p.stdout + p.stderr
    assert "ERROR" not in p.stdout and "corrupt" not in p.stdout.lower(), p.stdout
    m = re.search(r"(\d+) leaked clusters were found", p.stdout)
    return int(m.group(1)) if m else 0


def same_view(a, fmt_a, expect_raw):
    p = subprocess.run([shutil.which("qemu-img"), "compare", "-U", "-f", fmt_a, "-F", "raw",
                        str(a), str(expect_raw)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def top_over_base(tmp_path, opts, table_span, partial=512):
    """base.raw (0x41) <- top.qcow2 with ``partial`` bytes of 0x61 at the
    start of every ``table_span`` (so that the stream reads existing L2
    tables, and with subclusters reuses partly allocated clusters)."""
    base = mkimg(tmp_path / "base.raw", "raw", size=4 * MiB, writes=[("0x41", 0, 4 * MiB)])
    top = tmp_path / "top.qcow2"
    qimg("create", "-f", "qcow2", "-o", opts, "-b", "base.raw", "-F", "raw", top, 4 * MiB)
    qio(top, "qcow2", *[f"write -P 0x61 {o} {partial}" for o in range(0, 4 * MiB, table_span)])
    return base, str(top)


def stream_and_crash(eng, tmp_path, top, flush):
    """Stream into ``top`` slowly; with a batch in flight, ``flush(node)``,
    take the crash copy; then let the stream finish. Returns (crash copy,
    expected guest view)."""
    expect = snapshot(top, "qcow2", tmp_path / "expect.raw")
    t = eng.open(top, node_name="top")
    job = eng.stream("top", job_id="s0", speed=SLOW)
    wait_in_flight(job)
    flush(eng, t)
    crash = crash_copy(eng, top, tmp_path / "crash.qcow2")
    eng.job_set_speed("s0", 0)
    assert eng.wait_job(job, 60).value == "completed"
    eng.close()
    same_view(top, "qcow2", expect)
    check(top)
    return crash, expect


def test_l2_cache_eviction_writes_no_entry_of_data_in_flight(eng, tmp_path, monkeypatch):
    # 512-byte clusters: an L2 table maps 32 KiB, a 512 KiB batch 16 tables;
    # a cache of 2 tables evicts (flushes) while the batch is being planned
    monkeypatch.setattr(tables, "L2_CACHE_BYTES", 1024)
    base, top = top_over_base(tmp_path, "cluster_size=512", 32 << 10)
    crash, expect = stream_and_crash(eng, tmp_path, top, lambda eng, t: None)
    # every cluster reads what the top read before: the backing data (old
    # entry) or the copied data, never zeroes
    same_view(crash, "qcow2", expect)
    # the eviction did flush mid-batch: the batch's refcounts are on disk
    # (leaked in the crash state), its entries are not
    assert leaks_only(crash) > 0


@pytest.mark.parametrize("opts,span", [
    ("cluster_size=512", 32 << 10),
    # subclusters: clusters with one subcluster written are filled in place
    # (the old entry names the same host cluster, with a smaller bitmap)
    ("cluster_size=16384,extended_l2=on", 16 << 10),
], ids=["standard", "extended-l2"])
def test_node_flush_while_a_batch_is_in_flight(eng, tmp_path, opts, span):
    # any other flush of the node (a reopen, a resize, another job's flush,
    # a bitmap store) while the engine still writes the batch
    def flush(eng, t):
        with eng.io:
            t.flush()
    base, top = top_over_base(tmp_path, opts, span)
    crash, expect = stream_and_crash(eng, tmp_path, top, flush)
    same_view(crash, "qcow2", expect)
    leaks_only(crash)


def test_commit_over_compressed_base_clusters_in_flight(eng, tmp_path):
    # a commit's base whose clusters are compressed: each gets a new host
    # cluster; while it is in flight the old compressed entry stays on disk
    # and keeps its reference (its refcount is dropped once the data landed)
    base = tmp_path / "base.qcow2"
    raw = mkimg(tmp_path / "src.raw", "raw", size=4 * MiB, writes=[("0x41", 0, 4 * MiB)])
    qimg("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", raw, base)
    mkimg(tmp_path / "mid.qcow2", backing="base.qcow2", size=4 * MiB,
          writes=[("0x51", 0, 4 * MiB)])
    top = mkimg(tmp_path / "top.qcow2", backing="mid.qcow2", size=4 * MiB)
    old = snapshot(base, "qcow2", tmp_path / "old.raw")
    new = snapshot(tmp_path / "mid.qcow2", "qcow2", tmp_path / "new.raw")
    t = eng.open(top, node_name="top")
    _, m, b = t.chain()
    job = eng.commit("top", top_node=m.name, job_id="c0", speed=SLOW)
    wait_in_flight(job)
    with eng.io:
        b.flush()
    crash = crash_copy(eng, base, tmp_path / "crash.qcow2")
    eng.job_set_speed("c0", 0)
    assert eng.wait_job(job, 60).value == "completed"
    eng.close()
    leaks_only(crash)
    # each cluster of the crash copy reads the base's old data or mid's
    got = open(snapshot(crash, "qcow2", tmp_path / "got.raw"), "rb").read()
    a, b = open(old, "rb").read(), open(new, "rb").read()
    bad = [o for o in range(0, len(got), 4096)
           if got[o:o + 4096] not in (a[o:o + 4096], b[o:o + 4096])]
    assert not bad, f"clusters reading neither old nor new data: {bad[:8]} ..."
    same_view(base, "qcow2", new)
    check(base)


@pytest.mark.slow
def test_write_of_many_tables_flushes_no_entry_before_its_data(tmp_path, monkeypatch):
    # Qcow2.write() of whole clusters: allocate, then pwrite. Allocating a
    # range of many L2 tables evicts (flushes) the cache between the two.
    from blkjobs.formats import open_image
    monkeypatch.setattr(tables, "L2_CACHE_BYTES", 1024)
    base, top = top_over_base(tmp_path, "cluster_size=512", 32 << 10)
    old = open(snapshot(top, "qcow2", tmp_path / "old.raw"), "rb").read()
    crashes = []
    with open_image(top, read_only=False) as img:
        flush = img.flush

        def flush_and_crash():
            flush()
            crashes.append(crash_copy_plain(top, tmp_path / f"crash{len(crashes)}.qcow2"))
        img.flush = flush_and_crash
        img.write(0, b"\x77" * MiB)
        assert crashes         # the eviction did flush inside the write
        del img.flush
    new = b"\x77" * MiB + old[MiB:]
    for c in crashes:
        leaks_only(c)
        got = open(snapshot(c, "qcow2", tmp_path / "got.raw"), "rb").read()
        bad = [o for o in range(0, len(got), 512)
               if got[o:o + 512] not in (old[o:o + 512], new[o:o + 512])]
        assert not bad, f"{c}: clusters reading neither old nor new data: {bad[:8]} ..."
    (tmp_path / "new.raw").write_bytes(new)
    same_view(top, "qcow2", tmp_path / "new.raw")
    check(top)


def crash_copy_plain(path, out):
    subprocess.run(["cp", "--sparse=always", str(path), str(out)], check=True)
    return str(out)


def test_released_data_is_fsynced_before_the_entries_naming_it(tmp_path, monkeypatch):
    # a flush while held wrote the refcounts (fsync'd); the data lands after
    # it; the next flush has no refcount to write but must still make the
    # data durable before it writes the L2 table naming it
    from blkjobs.formats import open_image
    base, top = top_over_base(tmp_path, "cluster_size=512", 32 << 10)
    with open_image(top, read_only=False) as img:
        undo: list = []
        runs = img.allocate(1024, 4096, undo)
        img.flush()                                 # held: refcounts only
        ops = []
        real_pwrite, real_fsync = os.pwrite, os.fsync
        monkeypatch.setattr(os, "pwrite", lambda fd, b, off: (ops.append(("w", off)),
                                                              real_pwrite(fd, b, off))[1])
        monkeypatch.setattr(os, "fsync", lambda fd: (ops.append(("sync", fd)), real_fsync(fd))[0])
        for m in runs:                              # the engine's writes
            os.pwrite(img.data_fd, b"\x77" * m.length, m.host_offset)
        img.release_allocated(undo)
        img.flush()
        monkeypatch.undo()
        l2 = img.l1[0] & tables.L1_OFFSET_MASK
        first_l2 = ops.index(("w", l2))
        last_data = max(i for i, (op, off) in enumerate(ops)
                        if op == "w" and any(m.host_offset <= off < m.host_offset + m.length
                                             for m in runs))
        assert ("sync", img.data_fd) in ops[last_data:first_l2], ops
    got = open(snapshot(top, "qcow2", tmp_path / "got.raw"), "rb").read()
    assert got[1024:5120] == b"\x77" * 4096
    check(top)


@pytest.mark.parametrize("lands", [False, True], ids=["undone", "landed"])
def test_compressed_clusters_replaced_then_undone_or_landed(tmp_path, lands):
    # allocate(undo) over compressed clusters records them (held, their
    # reference kept): a batch that does not land puts the compressed
    # entries back; one that lands drops their references (no leak)
    from blkjobs.formats import open_image
    from qemu_oracle import check_clean
    raw = mkimg(tmp_path / "src.raw", "raw", size=1 * MiB, writes=[("0x41", 0, 1 * MiB)])
    img_path = str(tmp_path / "c.qcow2")
    qimg("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", raw, img_path)
    before = open(snapshot(img_path, "qcow2", tmp_path / "before.raw"), "rb").read()
    with open_image(img_path, read_only=False) as img:
        undo: list = []
        runs = img.allocate(0, 64 << 10, undo)
        assert [(s, n) for s, n, _, _ in undo] == [(o, 4096) for o in range(0, 64 << 10, 4096)]
        img.flush()                                 # held: the compressed entries stay
        for m in runs:
            os.pwrite(img.fd, b"\x77" * m.length, m.host_offset)
        if lands:
            img.release_allocated(undo)
        else:
            img.undo_allocate(undo)
    check_clean(img_path)
    got = open(snapshot(img_path, "qcow2", tmp_path / "got.raw"), "rb").read()
    assert got == (b"\x77" * (64 << 10) + before[64 << 10:] if lands else before)


def test_guest_flush_does_not_wait_for_the_jobs_batches(eng, tmp_path):
    """A front end's flush (a guest's, an NBD client's) makes the guest's
    completed writes durable; it need not wait for a job's copies in flight,
    since the driver holds their entries off the disk. It used to wait until
    the node had no unfilled range at all: behind a rate-limited stream that
    is the whole job (a guest's flush timing out)."""
    base, top = top_over_base(tmp_path, "cluster_size=512", 32 << 10)
    expect = snapshot(top, "qcow2", tmp_path / "expect.raw")
    t = eng.open(top, node_name="top")
    fe = eng.attach(t)
    job = eng.stream("top", job_id="s0", speed=1)       # one byte a second: never lands
    wait_in_flight(job)
    done = threading.Event()
    th = threading.Thread(target=lambda: (fe.flush(), done.set()), daemon=True)
    th.start()
    flushed = done.wait(60)
    crash = crash_copy(eng, top, tmp_path / "crash.qcow2")
    # lifting the limit wakes the engine sleeping in it (QEMU kicks the job)
    eng.job_set_speed("s0", 0)
    th.join(60)
    assert flushed, "the guest's flush waited for the job's batch"
    assert eng.wait_job(job, 60).value == "completed"
    same_view(crash, "qcow2", expect)
    leaks_only(crash)
    eng.close()
    same_view(top, "qcow2", expect)
