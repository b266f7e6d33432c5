"""qcow2 reads mapped under the I/O lock, their host bytes read outside it
(``graph/readplan.py``), and what waits for them.

A read is held in its ``pread`` of one host cluster (``readplan._pread``
waits for an event there), so each step waits for an event, never for time:

* the I/O lock is free meanwhile; other reads and writes go on;
* a discard of the cluster through the guest path waits for the read; the
  host cluster, freed and flushed after it, is then reused by a write
  elsewhere, and the read returned the old bytes;
* the same done below the guest path (a job's write to the node): the flush
  that would make the freed cluster reusable waits for the read's pin;
* a backing chain (compressed and zero clusters, a short backing file) reads
  byte for byte as qemu-img converts it, and a read of the backing node is
  tracked on both nodes;
* a mirror's pivot waits for a read in flight on its source;
* a blkdebug rule on a qcow2 node still fails its reads (the wrapper hands
  out the qcow2 driver's map: a read must not go round it);
* a read's end (tracking and pin) is recorded without the lock and wakes
  whoever waits for it.
"""
from __future__ import annotations

import errno
import threading
from collections.abc import Iterator

import pytest

from blkjobs import Engine
from blkjobs.formats.base import Kind
from blkjobs.formats.qcow2.mapping import ReadPins
from blkjobs.graph import readplan
from blkjobs.graph.inflight import Reads
from blkjobs.jobs.blkdebug import Rule
from qemu_oracle import check_clean, qemu_img, qemu_io, to_raw
from test_nbd_concurrency import _on_call, _start

WAIT = 30           # seconds: only a bound on a failure, never slept
CS = 64 << 10


class HeldPread:
    """The first ``pread`` of host offset ``host`` from the file of
    ``drv`` waits for :meth:`go`."""

    def __init__(self, monkeypatch, drv, host: int):
        self.drv, self.host = drv, host
        self.inside = threading.Event()
        self.release = threading.Event()
        self.done = False
        real = readplan._pread

        def pread(fd, mv, h):
            if not self.done and h == self.host and fd == self.drv.data_fd:
                self.done = True
                self.inside.set()
                assert self.release.wait(WAIT)
            real(fd, mv, h)
        monkeypatch.setattr(readplan, "_pread", pread)

    def go(self) -> None:
        self.release.set()


def _host(node, offset: int) -> int:
    m = node.driver.map_host(offset, CS)[0]
    assert m.kind == Kind.DATA
    return m.host_offset


@pytest.fixture
def q(tmp_path) -> Iterator[tuple[Engine, object, str]]:
    """A 2 MiB qcow2 image: cluster 0 is b"a", cluster 1 b"b"."""
    img = str(tmp_path / "d.qcow2")
    qemu_img("create", "-f", "qcow2", img, "2M")
    qemu_io(img, "write -P 0x61 0 64k", "write -P 0x62 64k 64k")
    eng = Engine()
    try:
        yield eng, eng.open(img, "qcow2", node_name="d"), img
    finally:
        eng.close()


def test_qcow2_read_runs_outside_the_io_lock(q, monkeypatch):
    eng, node, _ = q
    fe = eng.attach(node)
    held = HeldPread(monkeypatch, node.driver, _host(node, 0))
    t, out = _start(fe.read, 0, CS)
    assert held.inside.wait(WAIT)
    assert eng.io.lock.acquire(timeout=WAIT), "the read holds the I/O lock"
    eng.io.lock.release()
    # another read and a write elsewhere go on meanwhile
    assert fe.read(CS, 4) == b"bbbb"
    fe.write(CS * 4, b"x" * 4096)
    assert fe.read(CS * 4, 4096) == b"x" * 4096
    held.go()
    t.join(WAIT)
    assert out == [b"a" * CS]


def test_discard_and_reallocation_wait_for_a_read_in_flight(q, monkeypatch, tmp_path):
    eng, node, img = q
    fe = eng.attach(node)
    h0 = _host(node, 0)
    held = HeldPread(monkeypatch, node.driver, h0)
    t, out = _start(fe.read, 0, CS)
    assert held.inside.wait(WAIT)
    saw = _on_call(eng.io._reads(node), "busy")
    d, _ = _start(fe.discard, 0, CS)
    assert saw.wait(WAIT)                   # the discard found the read in its way
    with eng.io:
        assert node.driver.map_host(0, CS)[0].kind == Kind.DATA     # not discarded yet
    held.go()
    t.join(WAIT)
    d.join(WAIT)
    assert out == [b"a" * CS]               # the bytes of before the discard
    fe.flush()                              # the freed cluster is reusable now ...
    fe.write(1 << 20, b"c" * CS)
    assert _host(node, 1 << 20) == h0       # ... and reused
    assert fe.read(0, CS) == bytes(CS)
    assert fe.read(1 << 20, CS) == b"c" * CS
    fe.close()
    eng.close()
    check_clean(img)
    want = bytearray(2 << 20)
    want[CS:2 * CS] = b"b" * CS
    want[1 << 20:(1 << 20) + CS] = b"c" * CS
    assert to_raw(img, tmp_path) == bytes(want)


def test_freed_cluster_waits_for_the_read_pin(q, monkeypatch, tmp_path):
    """Below the guest path (a job writing the node: no wait for the reads
    of its range), the free of a cluster a read maps is applied by the next
    flush only once the read is done."""
    eng, node, img = q
    fe = eng.attach(node)
    drv = node.driver
    h0 = _host(node, 0)
    held = HeldPread(monkeypatch, drv, h0)
    t, out = _start(fe.read, 0, CS)
    assert held.inside.wait(WAIT)
    drained = _on_call(drv.read_pins, "drain")

    def job_writes() -> None:
        with eng.io:
            drv.discard(0, CS)
            drv.flush()                     # applies the free: waits for the pin
            drv.write(1 << 20, b"c" * CS)   # takes the freed cluster
    j, _ = _start(job_writes)
    assert drained.wait(WAIT)
    assert j.is_alive() and h0 >> 16 not in drv.rc.pool
    held.go()
    t.join(WAIT)
    j.join(WAIT)
    assert not j.is_alive()
    assert out == [b"a" * CS]
    assert _host(node, 1 << 20) == h0
    fe.close()
    eng.close()
    check_clean(img)


def test_backing_chain_reads_as_qemu_img_converts_it(tmp_path, monkeypatch):
    base = str(tmp_path / "base.qcow2")
    top = str(tmp_path / "top.qcow2")
    qemu_img("create", "-f", "qcow2", base, "2M")
    qemu_io(base, "write -P 0x42 0 1M", "write -c -P 0x43 1M 64k",
            "write -P 0x44 1088k 4k")
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "3M")
    qemu_io(top, "write -P 0x54 64k 64k", "write -z 192k 64k", "write -P 0x55 2044k 8k",
            "write -P 0x56 1056k 8k")
    want = to_raw(top, tmp_path)
    eng = Engine()
    try:
        node = eng.open(top, "qcow2", node_name="top", read_only=True)
        fe = eng.io.attach(node, writable=False)
        got = bytearray()
        for off in range(0, 3 << 20, 192 << 10):        # runs of every kind across requests
            got += fe.read(off, min(192 << 10, (3 << 20) - off))
        assert bytes(got) == want
        assert fe.read(0, 3 << 20) == want
        # a read of the backing node's bytes is tracked on both nodes
        b = node.backing
        held = HeldPread(monkeypatch, b.driver, _host(b, 0))
        t, out = _start(fe.read, 0, CS)
        assert held.inside.wait(WAIT)
        with eng.io:
            assert eng.io._reads(node).busy(0, CS) and eng.io._reads(b).busy(0, CS)
        held.go()
        t.join(WAIT)
        assert out == [want[:CS]]
        with eng.io:
            assert not eng.io._reads(b).count
    finally:
        eng.close()


def test_mirror_pivot_waits_for_a_read_in_flight(tmp_path, monkeypatch):
    src, dst = str(tmp_path / "src.qcow2"), str(tmp_path / "dst.qcow2")
    qemu_img("create", "-f", "qcow2", src, "2M")
    qemu_io(src, "write -P 0x61 0 1M")
    qemu_img("create", "-f", "qcow2", dst, "2M")
    eng = Engine()
    try:
        s = eng.open(src, "qcow2", node_name="src")
        d = eng.open(dst, "qcow2", node_name="dst")
        vm = eng.attach(s)
        ev = eng.listen()
        job = eng.mirror("src", "dst", sync="full", job_id="m0")
        ev.wait_for("BLOCK_JOB_READY", timeout=WAIT, device="m0")
        filt = vm.node                      # the mirror's filter, above src
        held = HeldPread(monkeypatch, s.driver, _host(s, 0))
        t, out = _start(vm.read, 0, CS)
        assert held.inside.wait(WAIT)
        drained = _on_call(eng.io._reads(s), "drain")
        eng.job_complete("m0")
        assert drained.wait(WAIT)           # the pivot's quiesce waits for the read
        assert vm.node is filt and job.status.value != "concluded"
        held.go()
        t.join(WAIT)
        assert out == [b"a" * CS]
        assert eng.wait_job(job, WAIT).value == "completed"
        assert vm.node is d
        assert vm.read(0, 2 << 20) == b"a" * (1 << 20) + bytes(1 << 20)
    finally:
        eng.close()
    check_clean(dst)


def test_blkdebug_rule_fails_a_qcow2_read(q):
    eng, node, _ = q
    fe = eng.attach(node)
    eng.blkdebug(node, [Rule("read", errno.EIO, offset=CS, length=4096)])
    assert fe.read(0, 4096) == b"a" * 4096
    with pytest.raises(OSError) as e:
        fe.read(CS, 4096)
    assert e.value.errno == errno.EIO
    with eng.io:
        assert not eng.io._reads(node).count


def _no_timeout(cond: threading.Condition) -> threading.Event:
    """``cond.wait`` ignores its 1 s poll (a missed wake-up would hang the
    test, not pass it late); the event is set once a thread waits."""
    waiting = threading.Event()
    real = cond.wait

    def wait(timeout=None):
        waiting.set()
        return real(WAIT)
    cond.wait = wait
    return waiting


def test_read_end_wakes_waiters_without_the_io_lock():
    """``Reads.remove`` runs without the I/O lock; a write waiting for the
    read (``wait_clear``) and a drain are woken all the same."""
    lock = threading.Condition(threading.RLock())
    r = Reads(lock)
    waiting = _no_timeout(lock)
    for wait in (lambda: r.wait_clear(0, 4096), r.drain):
        with lock:
            t = r.add(0, 4096)
        waiting.clear()

        def waiter(wait=wait):
            with lock:
                wait()
        w, _ = _start(waiter)
        assert waiting.wait(WAIT)
        r.remove(t)                 # this thread does not hold the lock
        w.join(WAIT)
        assert not w.is_alive() and r.waiters == 0 and not r.count


def test_unpin_wakes_a_drain():
    pins = ReadPins()
    waiting = _no_timeout(pins._condition())
    t = pins.pin()
    d, _ = _start(pins.drain)
    assert waiting.wait(WAIT)
    later = pins.pin()              # taken after the drain began: not waited for
    pins.unpin(t)
    d.join(WAIT)
    assert not d.is_alive()
    pins.unpin(later)
