"""``blkjobs serve --export``: bad input is one line on stderr and exit 1;
``max-connections`` and the handshake time limit bound what clients hold."""
from __future__ import annotations

import asyncio
import subprocess
import sys

from daemon_util import connect, qcow2_node, qemu_img, start_blkjobs
from nbd_peers import go, handshake, nbd_map, run, uri


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blkjobs", "serve", *args],
                          capture_output=True, text=True, timeout=60)


def test_export_option_errors(tmp_path):
    img = str(tmp_path / "a.raw")
    assert qemu_img("create", "-f", "raw", img, "1M").returncode == 0
    q = str(tmp_path / "q.sock")
    cases = [
        (["--export", f"d={img}"], "blkjobs: --export needs --nbd-socket PATH or --nbd-tcp "
                                   "HOST:PORT\n"),
        (["--export", "d", "--nbd-socket", "n.sock"],
         "blkjobs: --export: expected NODE=IMAGE[,writable][,discard=unmap], got 'd'\n"),
        (["--export", f"d={tmp_path}/nope.qcow2", "--nbd-socket", str(tmp_path / "n.sock")],
         f"blkjobs: --export: could not open '{tmp_path}/nope.qcow2': No such file or "
         "directory\n"),
        (["--export", f"d={img}", "--nbd-socket", str(tmp_path / "no" / "n.sock")],
         f"blkjobs: --export: Failed to bind socket to {tmp_path}/no/n.sock: No such file "
         "or directory\n"),
        (["--export", f"d={img}", "--export", f"d={img},writable", "--nbd-socket",
          str(tmp_path / "n.sock")],
         "blkjobs: --export: Duplicate nodes with node-name='d'\n"),
    ]
    for args, err in cases:
        p = serve("--socket", q, *args)
        assert (p.returncode, p.stdout, p.stderr) == (1, "", err), args


def test_export_option_serves_at_once(tmp_path):
    img = str(tmp_path / "a.raw")
    assert qemu_img("create", "-f", "raw", img, "1M").returncode == 0
    sock = str(tmp_path / "n.sock")
    daemon = start_blkjobs(tmp_path, "--export", f"disk={img},writable", "--nbd-socket", sock)
    try:
        # ready is printed once the export serves
        run("qemu-io", "-f", "raw", "-c", "write -P 0x7e 0 64k", uri(sock, "disk"))
        assert nbd_map(uri(sock, "disk")).split()[:4] == ["0", "65536", "0", "data"]
    finally:
        assert daemon.stop() == 0, daemon.stderr
    assert open(img, "rb").read(65536) == b"\x7e" * 65536


def test_max_connections_and_handshake_limit(tmp_path):
    img = str(tmp_path / "a.qcow2")
    assert qemu_img("create", "-f", "qcow2", img, "1M").returncode == 0
    sock = str(tmp_path / "n.sock")
    daemon = start_blkjobs(tmp_path)

    async def scenario():
        s = await connect(daemon.sock)
        try:
            await s.x("blockdev-add", **qcow2_node("disk", img))
            await s.x("nbd-server-start", addr={"type": "unix", "data": {"path": sock}},
                      **{"max-connections": 1, "handshake-max-seconds": 1})
            await s.x("block-export-add", type="nbd", id="e0", **{"node-name": "disk"})
            return await asyncio.to_thread(clients)
        finally:
            await s.close()

    def clients():
        first = handshake(sock)
        size, _ = go(first, b"disk")
        first.close()
        # a client that never picks an export is dropped after the limit
        # (greeted once the server saw the first one go: until then it
        # waits in the listen queue, see test_nbd_server_policy.py)
        idle = handshake(sock)
        idle.settimeout(30)
        eof = idle.recv(1)
        idle.close()
        third = run("nbdinfo", "--size", uri(sock, "disk"))
        return size, eof, third.stdout
    try:
        size, eof, third = asyncio.run(scenario())
    finally:
        assert daemon.stop() == 0, daemon.stderr
    assert size == 1 << 20
    assert eof == b""
    assert third == "1048576\n"


def test_nbd_convert_path_does_not_import_the_local_converter():
    """Start-up is part of every copy a user times: the modules of
    ``blkjobs convert`` to/from NBD leave out the local converter and
    ctypes.util (subprocess, tempfile)."""
    code = ("import sys, blkjobs.cli.cmd_convert, blkjobs.formats.raw, blkjobs.formats.nbd\n"
            "print(sorted(m for m in ('blkjobs.imageops.convert', 'blkjobs.imageops.convert_chain',"
            " 'blkjobs.imageops.convert_raw', 'ctypes.util', 'subprocess', 'tempfile')"
            " if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "[]\n"
