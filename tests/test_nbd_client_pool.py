"""The NBD client's connections (formats/nbd.py) are opened when needed: a
multi-conn export is opened with one connection, and another is opened
only when a request finds every open one busy -- a small copy costs the
server one session, not one per CPU. Served here by our own export in
this process, whose connections the test counts."""
from __future__ import annotations

import threading

from blkjobs import Engine
from blkjobs.daemon.export_commands import NodeBackend
from blkjobs.formats.nbd import Nbd
from blkjobs.nbd.server import Export, NBDServer

WAIT = 30
HELD = 1 << 20          # a read here waits in the server until released


class Holding(NodeBackend):
    """Reads at HELD are served by Python (not mapped for the C path) and
    wait there until ``release``."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.inside = threading.Event()
        self.release = threading.Event()

    def plan_reads(self, reqs):
        got = super().plan_reads(reqs)
        out = []
        for (off, _), g in zip(reqs, got, strict=True):
            if off == HELD and g is not None:
                self.end_reads([g[1]])
                g = None
            out.append(g)
        return out

    def readinto(self, offset, buf):
        if offset == HELD:
            self.inside.set()
            assert self.release.wait(WAIT)
        super().readinto(offset, buf)


def test_extra_connections_only_when_all_are_busy(tmp_path):
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(range(256)) * (8 << 12))      # 2 MiB
    eng = Engine()
    srv = NBDServer()
    try:
        node = eng.open(str(img), "raw", node_name="d", read_only=True)
        with eng.io:
            fe = eng.io.attach(node, writable=False)
        be = Holding(eng.io, fe, {})
        srv.add_export(Export("d", be))
        sock = str(tmp_path / "s.sock")
        srv.listen_unix(sock)
        drv = Nbd(f"nbd+unix:///d?socket={sock}", connections=4)
        try:
            assert drv.connections == 4
            assert len(srv.connections) == 1
            buf = bytearray(4096)
            drv.readinto(0, buf)
            drv.readinto(8192, buf)
            assert len(srv.connections) == 1        # one at a time: one connection
            held = bytearray(4096)
            t = threading.Thread(target=drv.readinto, args=(HELD, held))
            t.start()
            assert be.inside.wait(WAIT)
            drv.readinto(4096, buf)                 # the first is busy: a second one
            assert bytes(buf) == img.read_bytes()[4096:8192]
            assert len(srv.connections) == 2
            be.release.set()
            t.join(WAIT)
            assert bytes(held) == img.read_bytes()[HELD:HELD + 4096]
            drv.readinto(0, buf)
            assert len(srv.connections) == 2
        finally:
            be.release.set()
            drv.close()
    finally:
        srv.close()
        eng.close()


def test_the_binding_loads_lazily_and_restores_the_dlopen_flags():
    """native/nbd.py loads the libnbd extension with lazy binding and puts
    Python's dlopen flags back as they were (other extensions keep
    RTLD_NOW)."""
    import subprocess
    import sys
    code = ("import os, sys; f = sys.getdlopenflags(); import blkjobs.native.nbd as n; "
            "assert n.AVAILABLE, n.WHY_NOT; assert sys.getdlopenflags() == f; "
            "c = n.Connection; print('ok')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout == "ok\n", p.stderr
