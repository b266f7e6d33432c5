"""Never touch what is not ours (issue 10 §2).

* The engine's per-node state lives on the node: a node opened after others
  were freed never inherits their state (ids are reused).
* A node whose close fails still leaves the graph and never uses its fd again.
* An interrupted convert removes only the target file it created.
"""
from __future__ import annotations

import asyncio
import errno
import gc
import json
import os
import signal
import subprocess

import pytest
from conftest import BLKJOBS, make_sparse
from daemon_util import connect, start_blkjobs, start_qsd

from blkjobs.errors import ImageError
from blkjobs.graph import Perm
from blkjobs.jobs.blockcopy import Mover
from blkjobs.engine import Engine

MiB = 1 << 20


def _raw(path, size=1 << 20):
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


@pytest.fixture
def eng():
    e = Engine()
    yield e
    e.close()


def test_fresh_nodes_do_not_inherit_cache_unsafe(eng, tmp_path, monkeypatch):
    """Nodes opened cache=unsafe and dropped, then fresh default nodes: none
    is cache-unsafe, and a Mover's flush fsyncs each of them."""
    img = _raw(tmp_path / "scratch.raw")
    old = [eng.open(img, "raw", cache="unsafe") for _ in range(200)]
    assert all(eng.io.cache_unsafe(n) for n in old)
    for n in old:
        n.close()
    del old, n
    gc.collect()        # a node is in reference cycles (its permissions)
    src = eng.open(_raw(tmp_path / "src.raw"), "raw", read_only=True)
    fresh = [eng.open(_raw(tmp_path / f"f{i}.raw"), "raw") for i in range(100)]
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(fd)
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    for n in fresh:
        synced.clear()
        mover = Mover(eng.io, src, n, select=lambda run: "copy")
        try:
            mover.flush()
        finally:
            mover.close()
        assert n.driver.fd in synced, f"{n.name} was not fsync'ed"
    assert [n.name for n in fresh if eng.io.cache_unsafe(n)] == []


# --------------------------------------------------------------------------
# A node whose close fails (a raw node on /dev/null: fsync gives EINVAL)


def test_node_whose_close_fails_leaves_graph_and_never_uses_its_fd(eng, tmp_path):
    null = eng.open("/dev/null", "raw", node_name="null0")
    null.take("test", Perm.WRITE)
    with pytest.raises(OSError) as ei:
        null.close()
    assert ei.value.errno == errno.EINVAL
    assert "null0" not in eng.graph.nodes
    other_path = tmp_path / "other.raw"
    other_path.write_bytes(b"\x11" * 65536)
    other = eng.open(str(other_path), "raw", node_name="other")
    assert other.driver.fd == null.driver._fd       # the OS reused the number
    with pytest.raises(ImageError, match=r"^'/dev/null': image is closed$"):
        null.write(0, b"\xee" * 512)
    with pytest.raises(ImageError, match=r"^'/dev/null': image is closed$"):
        null.read(0, 512)
    with pytest.raises(ImageError, match=r"^'/dev/null': image is closed$"):
        _ = null.driver.fd
    null.close()                                    # a second close does nothing
    assert other_path.read_bytes() == b"\x11" * 65536
    assert other.read(0, 512) == b"\x11" * 512


def test_qcow2_driver_after_close_raises(tmp_path, qemu_img):
    from blkjobs.formats import open_image
    path = tmp_path / "a.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(path), "1M"], check=True)
    drv = open_image(str(path), "qcow2", read_only=False)
    drv.close()
    with pytest.raises(ImageError, match=r"^'.*a\.qcow2': image is closed$"):
        drv.read(0, 512)
    with pytest.raises(ImageError, match=r"^'.*a\.qcow2': image is closed$"):
        drv.write(0, b"x" * 512)


async def _blockdev_del_dev_null(sock: str, file_driver: str, img: str) -> dict:
    s = await connect(sock)
    out: dict = {}
    await s.x("blockdev-add", driver="raw", **{"node-name": "null0"},
              file={"driver": file_driver, "filename": "/dev/null"})
    out["del"] = await s.x("blockdev-del", **{"node-name": "null0"})
    await s.x("blockdev-add", driver="raw", **{"node-name": "img0"},
              file={"driver": "file", "filename": img})
    out["nodes"] = sorted(n["node-name"] for n in await s.x("query-named-block-nodes")
                          if not n["node-name"].startswith("#"))
    out["del-again"] = await s.err("blockdev-del", **{"node-name": "null0"})
    await s.close()
    return out


async def _io_after_del(sock: str, img: str) -> list:
    """Many clients write to the new image while the stale node (if any) would
    write over it too."""
    async def client(i: int):
        s = await connect(sock)
        try:
            await s.x("x-blkjobs-write", node="img0", offset=i * 4096, length=4096,
                      pattern=0x40 + i)
            return await s.err("x-blkjobs-write", node="null0", offset=i * 4096,
                               length=4096, pattern=0xee)
        finally:
            await s.close()
    return await asyncio.gather(*(client(i) for i in range(16)))


def test_daemon_blockdev_del_of_failing_close_removes_node(tmp_path):
    """blockdev-del of a raw node on /dev/null (its flush fails) succeeds as in
    qemu-storage-daemon, and the node is gone: the next image opened (which
    gets the same fd number) is written only through its own node."""
    results = {}
    for name, start, drv in (("qsd", start_qsd, "host_device"),
                             ("blkjobs", start_blkjobs, "file")):
        d = tmp_path / name
        d.mkdir()
        img = d / "img.raw"
        img.write_bytes(bytes(1 << 20))
        daemon = start(d)
        try:
            results[name] = asyncio.run(_blockdev_del_dev_null(daemon.sock, drv, str(img)))
            if name == "blkjobs":
                errs = asyncio.run(_io_after_del(daemon.sock, str(img)))
        finally:
            assert daemon.stop() == 0
    assert results["blkjobs"] == results["qsd"]
    assert results["blkjobs"]["del"] == {}
    assert results["blkjobs"]["nodes"] == ["img0"]
    assert errs == [("GenericError", "Cannot find device='null0' nor node-name='null0'")] * 16
    data = (tmp_path / "blkjobs" / "img.raw").read_bytes()
    assert data == b"".join(bytes([0x40 + i]) * 4096 for i in range(16)) + bytes((1 << 20) - 65536)
    assert daemon.stderr == ("blkjobs: WARNING: blkjobs.daemon.node_commands: node 'null0' "
                             "('/dev/null'): flush on close failed: Invalid argument; the "
                             "node was closed\n")


# --------------------------------------------------------------------------
# An interrupted convert removes only the file it created


def _start_convert(*args):
    # at 1 byte/s the copy cannot end: still copying when interrupted
    return subprocess.Popen(BLKJOBS + ["convert", "--progress-json", "-r", "1",
                                       *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_progress(proc) -> list[str]:
    """stderr lines up to the first progress record: the target is made and
    the copy started."""
    seen = []
    while True:
        line = proc.stderr.readline()
        assert line, f"convert ended early: {seen}"
        seen.append(line)
        if line.startswith("{") and json.loads(line)["total"] > 0:
            return seen


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_interrupted_convert_keeps_a_file_renamed_over_its_target(tmp_path, fmt):
    src = make_sparse(tmp_path / "s.raw", 16 * MiB, [(0, 16 * MiB, "data")])
    dst = tmp_path / f"d.{fmt}"
    other = tmp_path / "other.txt"
    other.write_bytes(b"someone else's file\n")
    proc = _start_convert("-O", fmt, src, dst)
    try:
        _wait_progress(proc)
        assert dst.exists()
        os.replace(other, dst)
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert rc == 130
    assert rest.splitlines()[-1] == (
        f"blkjobs: interrupted: the incomplete target was not removed: '{dst}' was "
        "replaced by another file meanwhile")
    assert dst.read_bytes() == b"someone else's file\n"


def test_interrupted_convert_still_removes_its_own_target(tmp_path):
    src = make_sparse(tmp_path / "s.raw", 16 * MiB, [(0, 16 * MiB, "data")])
    dst = tmp_path / "d.raw"
    proc = _start_convert(src, dst)
    try:
        _wait_progress(proc)
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert rc == 130
    assert rest.splitlines()[-1] == "blkjobs: interrupted: the incomplete target was removed"
    assert not dst.exists()
