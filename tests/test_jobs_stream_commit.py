"""stream and commit (intermediate and active) on 3-deep chains, with a
writer whose every write is modelled: the guest view never changes except by
its own writes."""
from __future__ import annotations


import pytest

from test_jobs_helpers import (MIB_BATCHES, SIZE, MiB, Writer, assert_same, backing_of, chain3,  # noqa: F401
                               check, eng, mkimg, qimg, qio, snapshot, wait_writes)


def model_of(path, fmt, tmp_path, name="expect.raw"):
    raw = snapshot(path, fmt, tmp_path / name)
    return bytearray(open(raw, "rb").read())


def write_model(model, tmp_path, name="model.raw"):
    p = tmp_path / name
    p.write_bytes(bytes(model))
    return str(p)


@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_stream_to_base_under_writer(eng, tmp_path, base_fmt):
    base, mid, top = chain3(tmp_path, base_fmt)
    model = model_of(top, "qcow2", tmp_path)
    t = eng.open(top, node_name="top")
    b = t.chain()[2]
    vm = eng.attach(t)
    w = Writer(vm, SIZE, model=model, max_len=16 << 10)
    w.start()
    wait_writes(w, 20)
    # held at its first write while the writer goes on: the writer surely
    # overlaps the copy (1 MiB batches); a guest write held there is waited
    # for (see test_stream_waits_for_a_guest_write_suspended_in_the_top)
    eng.blkdebug_break("top", "pwritev", "w")
    job = eng.stream("top", base_node=b.name, job_id="s0", speed=MIB_BATCHES)
    eng.blkdebug_wait_break("w")
    eng.blkdebug_resume("w")
    assert eng.wait_job(job, 60).value == "completed"
    w.stop()
    assert t.backing is b and len(t.chain()) == 2
    assert "mid" not in [n.filename for n in eng.graph.nodes.values()]
    eng.close()
    assert backing_of(top) == f"base.{base_fmt}"
    assert_same(write_model(model, tmp_path), top, "raw", "qcow2")
    check(top)


def test_stream_everything(eng, tmp_path):
    base, mid, top = chain3(tmp_path)
    expect = snapshot(top, "qcow2", tmp_path / "e.raw")
    eng.open(top, node_name="top")
    job = eng.stream("top", job_id="s0")
    assert eng.wait_job(job, 30).value == "completed"
    eng.close()
    assert backing_of(top) is None
    assert_same(expect, top, "raw", "qcow2")


def test_stream_validation(eng, tmp_path):
    base, mid, top = chain3(tmp_path)
    t = eng.open(top, node_name="top")
    for kw, msg in [
        (dict(base="x", base_node="y"), "'base' and 'base-node' cannot be specified at the same time"),
        (dict(base="x", bottom="y"), "'base' and 'bottom' cannot be specified at the same time"),
        (dict(bottom="x", base_node="y"), "'bottom' and 'base-node' cannot be specified at the same time"),
        (dict(base="nothere.qcow2"), "Can't find 'nothere.qcow2' in the backing chain"),
        (dict(base_node="top"), "Node 'top' is not a backing image of 'top'"),
        (dict(backing_file="x"), "backing file specified, but streaming the entire chain"),
    ]:
        with pytest.raises(Exception) as ei:
            eng.stream("top", job_id="s0", **kw)
        assert str(ei.value) == msg
    assert t.backing is not None


@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_commit_intermediate_under_writer(eng, tmp_path, base_fmt):
    base, mid, top = chain3(tmp_path, base_fmt)
    model = model_of(top, "qcow2", tmp_path)
    mid_view = snapshot(mid, "qcow2", tmp_path / "mid.raw")
    t = eng.open(top, node_name="top")
    m, b = t.chain()[1], t.chain()[2]
    vm = eng.attach(t)
    w = Writer(vm, SIZE, model=model, max_len=16 << 10)
    w.start()
    wait_writes(w, 20)
    eng.blkdebug_break(b, "pwritev", "w")     # held at its first write, as above
    job = eng.commit("top", top_node=m.name, base_node=b.name, job_id="c0", speed=MIB_BATCHES)
    eng.blkdebug_wait_break("w")
    eng.blkdebug_resume("w")
    assert eng.wait_job(job, 60).value == "completed"
    w.stop()
    assert t.backing is b
    eng.close()
    assert backing_of(top) == f"base.{base_fmt}"
    assert_same(write_model(model, tmp_path), top, "raw", "qcow2")
    assert_same(mid_view, base, "raw", base_fmt)          # base now holds mid's view
    check(top)
    if base_fmt == "qcow2":
        check(base)


@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_active_commit_pivots_onto_base(eng, tmp_path, base_fmt):
    base, mid, top = chain3(tmp_path, base_fmt)
    model = model_of(top, "qcow2", tmp_path)
    t = eng.open(top, node_name="top")
    b = t.chain()[2]
    vm = eng.attach(t)
    ev = eng.listen()
    w = Writer(vm, SIZE, model=model, max_len=16 << 10)
    w.start()
    job = eng.commit("top", job_id="c1")
    ready = ev.wait_for("BLOCK_JOB_READY", timeout=30)
    assert ready.data["type"] == "commit"
    wait_writes(w, 100)
    eng.job_complete("c1")
    assert eng.wait_job(job, 30).value == "completed"
    w.stop()
    assert vm.node is b
    assert "top" not in eng.graph.nodes
    eng.close()
    assert_same(write_model(model, tmp_path), base, "raw", base_fmt)
    if base_fmt == "qcow2":
        check(base)


def test_active_commit_soft_cancel(eng, tmp_path):
    base, mid, top = chain3(tmp_path)
    expect = snapshot(top, "qcow2", tmp_path / "e.raw")
    t = eng.open(top, node_name="top")
    vm = eng.attach(t)
    ev = eng.listen()
    job = eng.commit("top", job_id="c1")
    ev.wait_for("BLOCK_JOB_READY", timeout=30)
    eng.job_cancel("c1", force=False)
    assert eng.wait_job(job, 30).value == "completed"
    assert vm.node is t and t.backing is not None
    eng.close()
    assert_same(expect, base, "raw", "qcow2")       # point-in-time merged data
    assert_same(expect, top, "raw", "qcow2")


def test_commit_validation(eng, tmp_path):
    base, mid, top = chain3(tmp_path)
    eng.open(top, node_name="top")
    from blkjobs.jobs.commit import DeviceNotFound
    with pytest.raises(DeviceNotFound, match="Device 'nope' not found"):
        eng.commit("nope", job_id="c0")
    for kw, msg in [
        (dict(top_node="a", top="b"), "'top-node' and 'top' are mutually exclusive"),
        (dict(base_node="a", base="b"), "'base-node' and 'base' are mutually exclusive"),
        (dict(top_node="zz"), "Cannot find device='' nor node-name='zz'"),
        (dict(top="zz.qcow2"), "Top image file zz.qcow2 not found"),
        (dict(base="zz.qcow2"), "Can't find 'zz.qcow2' in the backing chain"),
        (dict(base_node="top"), "cannot commit an image into itself"),
        (dict(backing_file="x"), "'backing-file' specified, but 'top' is the active layer"),
    ]:
        with pytest.raises(Exception) as ei:
            eng.commit("top", job_id="c0", **kw)
        assert str(ei.value) == msg, kw


def test_stream_guest_reads_never_see_clusters_in_flight(eng, tmp_path):
    """A guest reading while stream pulls data into the top must always read
    the chain's data: a cluster the job has allocated in the top but not yet
    filled must not be visible (it would read as zeroes)."""
    size = 32 * MiB
    mkimg(tmp_path / "base.qcow2", size=size, writes=[("0x41", 0, size)])
    top = mkimg(tmp_path / "top.qcow2", size=size, backing="base.qcow2",
                writes=[("0x61", 0, 4 * MiB)])
    expect = open(snapshot(top, "qcow2", tmp_path / "e.raw"), "rb").read()
    t = eng.open(top, node_name="top")
    vm = eng.attach(t)

    def run():
        job = eng.stream("top", job_id="s0", speed=16 * MiB)
        assert eng.wait_job(job, 30).value == "completed"
    assert _read_while(vm, expect, run) == []
    vm.close()
    eng.close()
    assert_same(str(tmp_path / "e.raw"), top, "raw", "qcow2")
    check(top)


@pytest.mark.parametrize("base_node", [True, False])
def test_stream_fills_partly_covered_clusters_from_below(eng, tmp_path, base_node):
    """The middle image has 4 KiB clusters (one plain, one compressed in each
    64 KiB), the top 64 KiB ones: each top cluster the stream allocates gets
    the rest of its bytes from below -- the base's data, not the top's own new
    and still empty cluster (which the source's chain reads once allocated)."""
    size = 4 * MiB
    mkimg(tmp_path / "base.qcow2", size=size, writes=[("0x41", 0, size)])
    mid = str(tmp_path / "mid.qcow2")
    qimg("create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.qcow2", "-F", "qcow2",
         mid, size)
    qio(mid, "qcow2", *[c for o in range(0, size, 64 << 10)
                        for c in (f"write -P 0x51 {o} 4k", f"write -c -P 0x52 {o + 16384} 4k")])
    top = mkimg(tmp_path / "top.qcow2", size=size, backing="mid.qcow2")
    expect = snapshot(top, "qcow2", tmp_path / "e.raw")
    t = eng.open(top, node_name="top")
    job = eng.stream("top", base_node=t.chain()[2].name if base_node else None, job_id="s0")
    assert eng.wait_job(job, 30).value == "completed"
    eng.close()
    assert backing_of(top) == ("base.qcow2" if base_node else None)
    assert_same(expect, top, "raw", "qcow2")
    check(top)


def _read_while(vm, expect, run):
    """Run ``run()`` while a thread reads random ranges of ``vm`` and checks
    them against ``expect``; the ranges that read wrong."""
    import random
    import threading
    bad, stop = [], threading.Event()
    size = len(expect)

    def reader():
        rnd = random.Random(3)
        while not stop.is_set():
            off = rnd.randrange(0, size // 4096) * 4096
            n = min(size - off, rnd.choice([4096, 65536, 1 << 20]))
            if vm.read(off, n) != expect[off:off + n]:
                bad.append((off, n))
    th = threading.Thread(target=reader, daemon=True)
    th.start()
    try:
        run()
    finally:
        stop.set()
        th.join(30)
    return bad


@pytest.mark.parametrize("active", [False, True])
def test_commit_guest_reads_never_see_clusters_in_flight(eng, tmp_path, active):
    """Commit into a middle image that has a backing file itself: 4 KiB of
    the top in each 64 KiB cluster, so the commit allocates the middle's
    cluster and fills the rest of it from below. A guest reading the rest of
    that cluster goes down to the middle image: it must read the base's data,
    never the freshly allocated, not yet filled cluster. (Intermediate: an
    active overlay above the top.)"""
    size = 32 * MiB
    mkimg(tmp_path / "base.qcow2", size=size, writes=[("0x41", 0, size)])
    mid = mkimg(tmp_path / "mid.qcow2", size=size, backing="base.qcow2")
    top = str(tmp_path / "top.qcow2")       # 4 KiB clusters: 4 KiB of data each
    qimg("create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "mid.qcow2", "-F", "qcow2",
         top, size)
    qio(top, "qcow2", *[f"write -P 0x61 {o} 4k" for o in range(0, size, 64 << 10)])
    guest = top if active else mkimg(tmp_path / "over.qcow2", size=size, backing="top.qcow2")
    expect = open(snapshot(guest, "qcow2", tmp_path / "e.raw"), "rb").read()
    g = eng.open(guest, node_name="guest")
    t = g if active else g.chain()[1]
    m = t.chain()[1]
    vm = eng.attach(g)
    ev = eng.listen()

    def run():
        job = eng.commit("guest", top_node=t.name, base_node=m.name, job_id="c0",
                         speed=16 * MiB)
        if active:
            ev.wait_for("BLOCK_JOB_READY", timeout=30)
            eng.job_complete("c0")
        assert eng.wait_job(job, 30).value == "completed"
    assert _read_while(vm, expect, run) == []
    vm.close()
    eng.close()
    assert_same(str(tmp_path / "e.raw"), mid, "raw", "qcow2")
    check(mid)


@pytest.mark.parametrize("policy", ["report", "stop"])
def test_stream_enospc_in_the_copy_keeps_the_guest_view(tmp_path, small_tmpfs, policy):
    """The top on a 2 MiB tmpfs: the C engine's writes fail with ENOSPC in the
    middle of a batch. The top must still read what it read: the clusters
    allocated for the failed batch are given back (left allocated, they read
    as zeroes, and a retry takes them as copied). report: the job fails.
    stop: it pauses; with space freed, resume completes it."""
    from blkjobs.engine import Engine
    size = 8 * MiB          # 1.5 MiB of it to pull: fits once the filler is gone
    base = mkimg(tmp_path / "base.qcow2", size=size, writes=[("0x41", 0, 1536 << 10)])
    top = str(small_tmpfs / "top.qcow2")
    mkimg(top, size=size, backing=str(base), writes=[("0x61", 0, 64 << 10)])
    filler = small_tmpfs / "filler"
    filler.write_bytes(b"x" * (1 << 20))
    expect = snapshot(top, "qcow2", tmp_path / "e.raw")
    eng = Engine()
    try:
        t = eng.open(top, node_name="top")
        job = eng.stream("top", job_id="s0", on_error=policy)
        if policy == "report":
            assert eng.wait_job(job, 30).value == "failed"
            assert job.error == "No space left on device"
            assert t.backing is not None
        else:
            eng.jobs.wait_until(lambda: job.status.value == "paused", 30)
            with eng.attach(t) as vm:                        # the guest view, paused
                assert vm.read(0, size) == open(expect, "rb").read()
            filler.unlink()
            eng.jobs.user_resume(job)
            assert eng.wait_job(job, 30).value == "completed"
            assert t.backing is None
    finally:
        eng.close()
    assert_same(expect, top, "raw", "qcow2")
    check(top)


def test_backup_of_a_top_being_streamed_into(eng, tmp_path):
    """A backup of the top while a stream fills it: the backup's copies read
    the top's clusters by host offset, so they too must not read a cluster
    the stream has allocated and not yet filled."""
    size = 32 * MiB
    mkimg(tmp_path / "base.qcow2", size=size, writes=[("0x41", 0, size)])
    mid = str(tmp_path / "mid.qcow2")
    qimg("create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.qcow2", "-F", "qcow2",
         mid, size)
    qio(mid, "qcow2", *[f"write -P 0x51 {o} 4k" for o in range(0, size, 64 << 10)])
    top = mkimg(tmp_path / "top.qcow2", size=size, backing="mid.qcow2")
    expect = snapshot(top, "qcow2", tmp_path / "e.raw")
    eng.open(top, node_name="top")
    bk = str(tmp_path / "bk.qcow2")
    eng.create(bk, "qcow2", size, node_name="bk")
    s = eng.stream("top", job_id="s0", speed=32 * MiB)
    b = eng.backup("top", "bk", sync="full", job_id="b0", speed=32 * MiB)
    assert eng.wait_job(b, 30).value == "completed"
    assert eng.wait_job(s, 30).value == "completed"
    eng.close()
    assert_same(expect, bk, "raw", "qcow2")
    assert_same(expect, top, "raw", "qcow2")


def test_stream_waits_for_a_guest_write_suspended_in_the_top(eng, tmp_path):
    """A guest write held inside the top's driver (a break point standing in
    for slow I/O) when the stream reaches its range: the stream must wait for
    it, as QEMU's serialising requests do, or its copy of the backing's data
    can land over the guest's (the content mismatch the under-writer tests
    saw 1 run in 2 when held at a break point)."""
    import threading
    base, mid, top = chain3(tmp_path)
    model = model_of(top, "qcow2", tmp_path)
    t = eng.open(top, node_name="top")
    vm = eng.attach(t)
    off, data = 1 * MiB + 8192, b"\xee" * 4096      # mid's data; top has none there
    model[off:off + len(data)] = data
    eng.blkdebug_break("top", "pwritev", "g")
    writer = threading.Thread(target=vm.write, args=(off, data))
    writer.start()
    eng.blkdebug_wait_break("g")
    job = eng.stream("top", job_id="s0")

    def stream_waits_or_ended():
        st = t.io_state
        return (getattr(st, "write_waiters", 0) > 0
                or job.status.value in ("pending", "concluded", "null"))

    with eng.io.lock:
        while not stream_waits_or_ended():
            eng.io.lock.wait(0.05)      # polled: a job's end does not notify the I/O lock
    assert job.status.value == "running", "the stream went on past a write in flight"
    eng.blkdebug_resume("g")
    writer.join(30)
    assert eng.wait_job(job, 60).value == "completed"
    eng.close()
    assert backing_of(top) is None
    assert_same(write_model(model, tmp_path), top, "raw", "qcow2")
    check(top)
