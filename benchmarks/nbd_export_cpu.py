#!/usr/bin/env python3
"""The NBD export's server CPU per copy of the 256 MiB sparse qcow2 image
of benchmarks/nbd_export.py, against qemu-nbd (benchmarks/README.md, "Issue
14: the sparse qcow2 export (`nbdq2`)").

Default mode: the servers -- ours, ``--baseline`` (another build's
blkjobs), ``qemu-nbd -r`` and ``qemu-nbd -r -e 4`` -- serve the same image
for the whole run; each round (the order rotated) gives each ``--copies``
``nbdcopy -C 4 URI null:`` in a row and reads the server's CPU (user +
system, /proc/PID/stat: 10 ms ticks, hence several copies a round) and the
wall time around them. Reported: medians per copy, and the median [min-max]
of the per-round ratios against ours.

``--plan``: no server; the export's read planning alone in this process
(``BlockIO.guest_read_segments`` + ``guest_read_end``, the C path's
mapping) over batches shaped as nbdcopy's (a block status of 128 MiB, then
256 KiB reads four at a time), the qcow2 reads mapped in C against the
Python path (``graph.readplan._plan_c`` off), alternated: thread CPU per
batch.

Usage: benchmarks/nbd_export_cpu.py [--rounds 15] [--copies 10]
       [--baseline BLKJOBS] [--plan] [--dir /var/tmp]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from nbd_export import BLKJOBS, fresh_bytecode, make_sparse, wait_for  # noqa: E402


def start(name: str, exe: str | None, img: str, d: str) -> tuple[subprocess.Popen[str], str]:
    sock = os.path.join(d, name.replace(" ", "") + ".sock")    # (a URI: no spaces)
    if exe is None:         # qemu-nbd (-e 4: multi-conn, as our export)
        extra = ["-e", "4"] if name == "qemu-nbd -e 4" else []
        p = subprocess.Popen(["qemu-nbd", "-t", "-r", "-f", "qcow2", f"--socket={sock}", "-x",
                              "disk", *extra, img], stderr=subprocess.DEVNULL, text=True)
        wait_for(sock, p, name)
    else:
        p = subprocess.Popen([exe, "serve", "--socket", os.path.join(d, name.replace(" ", "") + ".qmp"),
                              "--export", f"disk={img}", "--nbd-socket", sock, "--print-ready"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if not p.stdout or not p.stdout.readline():
            raise SystemExit(f"nbd_export_cpu.py: {name} did not start")
    return p, f"nbd+unix:///disk?socket={sock}"


def cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def servers(a: argparse.Namespace, img: str, d: str) -> None:
    contenders: dict[str, str | None] = {"ours": BLKJOBS}
    if a.baseline:
        contenders["baseline"] = a.baseline
    contenders["qemu-nbd"] = None
    contenders["qemu-nbd -e 4"] = None
    procs: dict[str, subprocess.Popen[str]] = {}
    uris: dict[str, str] = {}
    try:
        for name, exe in contenders.items():
            procs[name], uris[name] = start(name, exe, img, d)
        names = list(uris)
        c: dict[str, list[float]] = {n: [] for n in names}
        w: dict[str, list[float]] = {n: [] for n in names}
        for r in range(a.rounds + 1):       # round 0: warm-up
            for n in names[r % len(names):] + names[:r % len(names)]:
                c0, t0 = cpu(procs[n].pid), time.perf_counter()
                for _ in range(a.copies):
                    subprocess.run(["nbdcopy", "-C", "4", uris[n], "null:"], check=True)
                if r:
                    w[n].append((time.perf_counter() - t0) / a.copies)
                    c[n].append((cpu(procs[n].pid) - c0) / a.copies)
        print(f"sparse qcow2 256 MiB, {a.rounds} rounds x {a.copies} nbdcopy -C 4 -> null:, "
              f"load average {os.getloadavg()[0]:.1f}")
        for n in names:
            print(f"  {n:13s} server CPU per copy {1000 * statistics.median(c[n]):6.2f} ms, "
                  f"wall {1000 * statistics.median(w[n]):6.1f} ms (medians)")
        for n in names[1:]:
            cr = sorted(x / y for x, y in zip(c[n], c["ours"], strict=True) if y)
            wr = sorted(x / y for x, y in zip(w[n], w["ours"], strict=True))
            print(f"  {n} / ours: CPU {statistics.median(cr):.2f} [{cr[0]:.2f}-{cr[-1]:.2f}], "
                  f"wall {statistics.median(wr):.2f} [{wr[0]:.2f}-{wr[-1]:.2f}]")
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def plan(a: argparse.Namespace, img: str) -> None:
    sys.path.insert(0, os.path.join(HERE, "..", "src"))
    from blkjobs import Engine
    from blkjobs.graph import readplan
    eng = Engine()
    node = eng.open(img, "qcow2", node_name="d", read_only=True)
    with eng.io:
        fe = eng.io.attach(node, writable=False)
    batches: list[list[tuple[int, int]]] = []
    for start_ in (0, 128 << 20):
        batches.append([(start_, 128 << 20)])
        offs = list(range(start_, start_ + (128 << 20), 256 << 10))
        batches += [[(o, 256 << 10) for o in offs[i:i + 4]] for i in range(0, len(offs), 4)]
    in_c = readplan._plan_c

    def run() -> float:
        t0 = time.thread_time()
        for b in batches:
            got = eng.io.guest_read_segments(fe, b)
            eng.io.guest_read_end([g[1] for g in got if g is not None])
        return (time.thread_time() - t0) / len(batches)
    res: dict[str, list[float]] = {"C": [], "Python": []}
    try:
        for r in range(a.rounds):
            for k in (["C", "Python"] if r % 2 else ["Python", "C"]):
                readplan._plan_c = in_c if k == "C" else (lambda *_: None)
                res[k].append(run())
    finally:
        readplan._plan_c = in_c
        eng.close()
    print(f"{len(batches)} batches ({sum(map(len, batches))} requests) a pass, {a.rounds} "
          f"alternated passes, load average {os.getloadavg()[0]:.1f}")
    for k, v in res.items():
        print(f"  {k:6s} CPU per batch {1e6 * statistics.median(v):6.1f} us (median)")
    rs = sorted(p / c for p, c in zip(res["Python"], res["C"], strict=True))
    print(f"  Python / C per pass: {statistics.median(rs):.2f} [{rs[0]:.2f}-{rs[-1]:.2f}]")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--baseline", default=None, metavar="BLKJOBS")
    ap.add_argument("--plan", action="store_true")
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    if a.rounds < 5:
        ap.error("--rounds: at least 5 (the method needs a median)")
    fresh_bytecode()
    d = tempfile.mkdtemp(prefix="nbd-export-cpu.", dir=a.dir)
    try:
        raw, img = os.path.join(d, "sparse.raw"), os.path.join(d, "sparse.qcow2")
        make_sparse(raw, 256 << 20)
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, img], check=True)
        os.unlink(raw)
        if a.plan:
            plan(a, img)
        else:
            servers(a, img, d)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
