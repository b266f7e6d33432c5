#!/usr/bin/env python3
"""The export's cost per NBD session in user-space instructions, which the
machine's load does not change (benchmarks/README.md, "Issue 14: the
export's per-session cost, stop 21 (`nbd21`)").

Per build (``--src DIR``: a ``src/`` tree with its C extension, e.g. main's
copied aside; the first is this tree's): ``blkjobs serve --export`` runs
under ``valgrind --tool=callgrind`` three times -- idle, then serving
``--sessions`` ``nbdinfo`` sessions, then as many ``nbdcopy URI null:``
sessions -- and the per-session count is (run - idle) / sessions, the
instructions of every thread of the server (not the kernel's). The image:
a 1 MiB qcow2, 64 KiB of data. A run takes about 40 s (the start-up under
valgrind), so three per build.

``--copy SIZE``: instead, per copy of nbd_export.py's sparse image of that
size as qcow2 (5 % data in 64 KiB pieces): idle, then ``--copies``
``nbdcopy URI null:``.

Usage: benchmarks/nbd_export_instr.py [--sessions 40] [--copy 256M [--copies 5]]
       [--src DIR]... [--dir /var/tmp]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from nbd_export import make_sparse  # noqa: E402

OURS = os.path.join(HERE, "..", "src")
RUN = ("import sys; sys.argv[0] = 'blkjobs'; from blkjobs.cli.main import run; "
       "sys.exit(run())")


def instructions(src: str, image: str, client: str, n: int, d: str) -> int:
    """User-space instructions of a server over ``n`` sessions of ``client``."""
    run = tempfile.mkdtemp(prefix="instr.", dir=d)
    try:
        sock, out = os.path.join(run, "n.sock"), os.path.join(run, "cg.out")
        env = dict(os.environ, PYTHONPATH=src)
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
             sys.executable, "-c", RUN, "serve", "--socket", os.path.join(run, "qmp.sock"),
             "--export", f"d={image}", "--nbd-socket", sock],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + 120
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("nbd_export_instr.py: the server did not start")
            time.sleep(0.1)
        time.sleep(2)
        uri = f"nbd+unix:///d?socket={sock}"
        for _ in range(n):
            argv = ["nbdinfo", uri] if client == "nbdinfo" else ["nbdcopy", uri, "null:"]
            subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        with open(out) as f:
            for line in f:
                if line.startswith(("summary:", "totals:")):
                    return int(line.split()[1])
        raise SystemExit("nbd_export_instr.py: no totals in callgrind's output")
    finally:
        shutil.rmtree(run, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=40)
    ap.add_argument("--src", action="append", default=[],
                    help="another build's src/ directory (repeatable)")
    ap.add_argument("--copy", metavar="SIZE", help="per copy of a sparse qcow2 of SIZE")
    ap.add_argument("--copies", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp")
    a = ap.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("nbd_export_instr.py: valgrind is not installed")
    d = tempfile.mkdtemp(prefix="nbd-export-instr.", dir=a.dir)
    try:
        image = os.path.join(d, "s.qcow2")
        if a.copy:
            from blkjobs.units import parse_size
            make_sparse(os.path.join(d, "s.raw"), parse_size(a.copy))
            subprocess.run(["qemu-img", "convert", "-O", "qcow2", os.path.join(d, "s.raw"),
                            image], check=True)
            os.unlink(os.path.join(d, "s.raw"))
        else:
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "1M"], check=True)
            subprocess.run(["qemu-io", "-c", "write -P 1 0 64k", image], check=True,
                           stdout=subprocess.DEVNULL)
        for src in [OURS, *a.src]:
            subprocess.run([sys.executable, "-m", "compileall", "-q", src], check=True)
            idle = instructions(src, image, "nbdinfo", 0, d)
            if a.copy:
                per_copy = (instructions(src, image, "nbdcopy", a.copies, d) - idle) / a.copies
                print(f"{os.path.abspath(src)}: per {a.copy} copy {per_copy / 1e6:.2f} M "
                      f"instructions (idle run {idle / 1e6:.1f} M)", flush=True)
                continue
            per = {c: (instructions(src, image, c, a.sessions, d) - idle) / a.sessions
                   for c in ("nbdinfo", "nbdcopy")}
            print(f"{os.path.abspath(src)}: per session nbdinfo {per['nbdinfo'] / 1e3:.0f} K, "
                  f"nbdcopy {per['nbdcopy'] / 1e3:.0f} K instructions (idle run "
                  f"{idle / 1e6:.1f} M)", flush=True)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
