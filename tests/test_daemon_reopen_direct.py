"""``cache.direct`` in the daemon, against qemu-storage-daemon: at
``blockdev-add`` (a file node given by name, or made inline and inheriting
its format node's cache mode) and at ``blockdev-reopen`` switching it both
ways, the image's fd is O_DIRECT exactly when qemu-storage-daemon's is
(``/proc/PID/fdinfo``). Then the I/O through the O_DIRECT node works: an
NBD export written and read by qemu-io with unaligned requests, a backup
from it and a mirror into it, data byte for byte as qemu-storage-daemon's."""
from __future__ import annotations

import asyncio
import os
import re
from typing import Any

from conftest import fd_flags
from daemon_util import qcow2_node, qemu_img, qemu_io, side_by_side
from nbd_peers import qemu_io_nbd, uri


def direct_of(path: str) -> list[bool]:
    """For every fd of any process open read-write on ``path``: O_DIRECT?
    (The test's directory is the daemon's own, so only it opens the file;
    blkjobs' read-only fd for QEMU's lock bytes is left out.)"""
    return [bool(f & os.O_DIRECT) for pid in filter(str.isdigit, os.listdir("/proc"))
            for f in fd_flags(int(pid), path) if f & os.O_ACCMODE == os.O_RDWR]


def test_cache_direct_opens_and_reopens_the_fd_as_qemu(tmp_path):
    async def sc(s, d):
        a, b = str(d / "a.qcow2"), str(d / "b.raw")
        assert qemu_img("create", "-f", "qcow2", a, "2M").returncode == 0
        assert qemu_img("create", "-f", "raw", b, "2M").returncode == 0
        seen = []
        # a file node by name, then the format node over it
        await s.x("blockdev-add", driver="file", **{"node-name": "f"}, filename=a,
                  cache={"direct": True})
        await s.x("blockdev-add", driver="qcow2", **{"node-name": "n"}, file="f")
        seen.append(("add by name", direct_of(a)))
        proto = {"driver": "file", "node-name": "f", "filename": a}
        await s.x("blockdev-reopen", options=[{**proto, "cache": {"direct": False}}])
        seen.append(("reopen f off", direct_of(a)))
        await s.x("blockdev-reopen", options=[{**proto, "cache": {"direct": True}}])
        seen.append(("reopen f on", direct_of(a)))
        # the format node's cache mode does not reach a file node added by name
        await s.x("blockdev-reopen", options=[{"driver": "qcow2", "node-name": "n",
                                               "file": "f", "cache": {"direct": False}}])
        seen.append(("reopen n off", direct_of(a)))
        # inline: the file node inherits the format node's cache mode
        await s.x("blockdev-add", driver="raw", **{"node-name": "r"}, cache={"direct": True},
                  file={"driver": "file", "filename": b})
        seen.append(("add inline", direct_of(b)))
        await s.x("blockdev-reopen", options=[{"driver": "raw", "node-name": "r",
                                               "file": {"driver": "file", "filename": b}}])
        seen.append(("reopen inline off", direct_of(b)))
        await s.x("blockdev-reopen", options=[{"driver": "raw", "node-name": "r",
                                               "cache": {"direct": True},
                                               "file": {"driver": "file", "filename": b}}])
        seen.append(("reopen inline on", direct_of(b)))
        await s.x("blockdev-reopen", options=[{"driver": "raw", "node-name": "r",
                                               "read-only": True, "cache": {"direct": True},
                                               "file": {"driver": "file", "filename": b}}])
        seen.append(("read-only", direct_of(b)))
        await s.x("blockdev-reopen", options=[{"driver": "raw", "node-name": "r",
                                               "cache": {"direct": True},
                                               "file": {"driver": "file", "filename": b}}])
        seen.append(("read-write again", direct_of(b)))
        for n in ("n", "f", "r"):
            await s.x("blockdev-del", **{"node-name": n})
        return seen
    ref, ours = side_by_side(tmp_path, sc)
    assert ours == ref
    assert dict(ours) == {"add by name": [True], "reopen f off": [False],
                          "reopen f on": [True], "reopen n off": [True],
                          "add inline": [True], "reopen inline off": [False],
                          "reopen inline on": [True], "read-only": [],
                          "read-write again": [True]}


def test_io_through_an_o_direct_node(tmp_path):
    """An NBD export of an O_DIRECT qcow2 node of an unaligned size, written
    and read with unaligned requests; a backup from it into a raw node and a
    mirror into an O_DIRECT qcow2 node: every image as qemu-storage-daemon
    leaves it."""
    size = (1 << 20) + 513

    def io(u: str, *cmds: str) -> Any:
        return asyncio.to_thread(qemu_io_nbd, u, *cmds)

    async def sc(s, d):
        a, bk, mr = str(d / "a.qcow2"), str(d / "bk.raw"), str(d / "mr.qcow2")
        for img in (a, mr):
            assert qemu_img("create", "-f", "qcow2", img, str(size)).returncode == 0
        qemu_io(a, "write -P 0x11 0 64k")
        with open(bk, "wb") as f:       # the qcow2 image's size: rounded up to 512
            f.truncate(-(-size // 512) * 512)
        await s.x("blockdev-add", **qcow2_node("n", a, cache={"direct": True}))
        assert direct_of(a) == [True]
        sock = str(d / "nbd.sock")
        await s.x("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
        await s.x("block-export-add", type="nbd", id="e", **{"node-name": "n"}, writable=True)
        u = uri(sock, "n")
        await io(u, "write -P 0x22 1 7", "write -P 0x33 4095 2", "write -P 0x44 65535 70001",
                 "write -P 0x55 1048000 1000", "write -z 300001 5000")
        reads = await io(u, "read -P 0x22 1 7", "read -P 0x33 4095 2",
                         "read -P 0x44 65535 70001", "read -P 0x11 8 4087",
                         "read -P 0 300001 5000")
        # hard: qemu-io has exited, but a daemon may not have seen its
        # connection close yet (qemu-storage-daemon's main loop can take the
        # QMP command first on a busy host: "export 'e' still in use")
        await s.x("block-export-del", id="e", mode="hard")
        await s.until("BLOCK_EXPORT_DELETED")
        await s.x("nbd-server-stop")
        await s.x("blockdev-add", driver="raw", **{"node-name": "bk"},
                  file={"driver": "file", "filename": bk})
        await s.x("blockdev-backup", **{"job-id": "b"}, device="n", target="bk", sync="full")
        await s.until("BLOCK_JOB_COMPLETED", device="b")
        # QEMU gives a raw node of an unaligned size no write permission
        # without resize under O_DIRECT: the mirror's target is qcow2
        await s.x("blockdev-add", **qcow2_node("mr", mr, cache={"direct": True}))
        assert direct_of(mr) == [True]
        await s.x("blockdev-mirror", **{"job-id": "m"}, device="n", target="mr", sync="full")
        await s.until("BLOCK_JOB_READY", device="m")
        await s.x("job-complete", id="m")
        await s.until("BLOCK_JOB_COMPLETED", device="m")
        for n in ("n", "bk", "mr"):
            await s.x("blockdev-del", **{"node-name": n})
        return ("read 7/7" in reads and "read 5000/5000" in reads,
                qemu_img("check", a).stdout.replace(str(d), "D"),
                # the mirror's clusters land in another order (not O_DIRECT's doing)
                re.sub(r"[\d.]+% fragmented", "", qemu_img("check", mr).stdout),
                os.path.getsize(bk))
    ref, ours = side_by_side(tmp_path, sc)
    assert ours == ref
    assert ours[0] and "No errors were found" in ours[1] and "No errors were found" in ours[2]
    q, b = tmp_path / "qsd", tmp_path / "blkjobs"
    for name, fmt in (("a.qcow2", "qcow2"), ("bk.raw", "raw"), ("mr.qcow2", "qcow2")):
        with open(q / name, "rb") as x, open(b / name, "rb") as y:
            if fmt == "raw":
                assert x.read() == y.read(), name
        rc = qemu_img("compare", "-f", fmt, "-F", fmt, str(q / name), str(b / name))
        assert rc.returncode == 0, (name, rc.stdout)
    rc = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(b / "a.qcow2"), str(b / "mr.qcow2"))
    assert rc.returncode == 0, rc.stdout
