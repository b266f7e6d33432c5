"""NBD copies: blkjobs convert against nbdcopy and qemu-img convert on the
same servers, in one run.

Cases: an ``nbdkit sparse-random`` export to a local file, a ``qemu-nbd``
export (read-only, of a raw file with data) to a local file, and a local file
to a writable ``qemu-nbd`` export. Per case: one warm-up round, then ROUNDS
rounds in which the contenders run one after another in an order that
rotates each round; the figure is the median over rounds of each round's
ratio (ours / theirs: below 1 is faster). Each target file is removed before
a run (a fresh file for everyone).

    .venv/bin/python benchmarks/nbd_copy.py [--size 512M] [--rounds 5] [--busy]

``--busy``: two CPU hogs (busy loops, one per core of the 2-core test
machine) run during the whole measurement, so that the figures show how
the contenders fare when the CPU is contended (as on the shared machine,
where start-up CPU time costs several times its length in wall time). The
load average is printed before and after.
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
BLKJOBS = [sys.executable, "-m", "blkjobs"]


def _size(s: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1].upper()] if s[-1].upper() in units else int(s)


class Server:
    def __init__(self, argv: list[str], sock: str):
        self.sock = sock
        self.uri = f"nbd+unix:///?socket={sock}"
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{argv[0]} did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(15)


def timed(argv: list[str]) -> float:
    t0 = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True)
    dt = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {r.stderr.strip()}")
    return dt


def run_case(name: str, contenders: dict[str, list[str]], before, rounds: int) -> dict:
    names = list(contenders)
    for n in names:                    # warm-up
        before()
        timed(contenders[n])
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            before()
            times[n].append(timed(contenders[n]))
    out = {"case": name, "median_s": {n: statistics.median(v) for n, v in times.items()}}
    out["ratio"] = {n: statistics.median(a / b for a, b in zip(times["blkjobs"], times[n], strict=True))
                    for n in names if n != "blkjobs"}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="512M")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--busy", action="store_true", help="two CPU hogs during the run")
    a = ap.parse_args()
    size = _size(a.size)
    for tool in ("nbdkit", "qemu-nbd", "nbdcopy", "qemu-img"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed (make deps)")
    d = tempfile.mkdtemp(prefix="nbd-bench-")
    servers: list[Server] = []
    results = []
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(2 if a.busy else 0)]
    load0 = os.getloadavg()
    try:
        out = os.path.join(d, "out.raw")

        def fresh() -> None:
            if os.path.exists(out):
                os.unlink(out)

        # 1. nbdkit sparse-random -> file
        s = Server(["nbdkit", "-f", "-U", f"{d}/sr.sock", "sparse-random", str(size),
                    "seed=1", "percent=50"], f"{d}/sr.sock")
        servers.append(s)
        results.append(run_case("sparse-random -> file", {
            "blkjobs": BLKJOBS + ["convert", s.uri, out],
            "nbdcopy": ["nbdcopy", s.uri, out],
            "qemu-img": ["qemu-img", "convert", "-O", "raw", s.uri, out]}, fresh, a.rounds))
        # 2. qemu-nbd (read-only, raw file of data) -> file
        img = os.path.join(d, "src.raw")
        subprocess.run(["nbdkit", "-U", "-", "sparse-random", str(size), "seed=2",
                        "percent=100", "--run", f"nbdcopy \"$uri\" {img}"], check=True)
        q = Server(["qemu-nbd", "-r", "-t", "-e", "8", "-f", "raw", "-k", f"{d}/q.sock", img],
                   f"{d}/q.sock")
        servers.append(q)
        results.append(run_case("qemu-nbd -> file", {
            "blkjobs": BLKJOBS + ["convert", q.uri, out],
            "nbdcopy": ["nbdcopy", q.uri, out],
            "qemu-img": ["qemu-img", "convert", "-O", "raw", q.uri, out]}, fresh, a.rounds))
        # 3. file -> qemu-nbd (writable)
        tgt = os.path.join(d, "tgt.raw")
        with open(tgt, "wb") as f:
            f.truncate(size)
        w = Server(["qemu-nbd", "-t", "-e", "8", "-f", "raw", "-k", f"{d}/w.sock", tgt],
                   f"{d}/w.sock")
        servers.append(w)
        results.append(run_case("file -> qemu-nbd", {
            "blkjobs": BLKJOBS + ["convert", "-n", img, w.uri],
            "nbdcopy": ["nbdcopy", img, w.uri],
            "qemu-img": ["qemu-img", "convert", "-n", "-O", "raw", img, w.uri]},
            lambda: None, a.rounds))
    finally:
        load1 = os.getloadavg()
        for h in hogs:
            h.kill()
            h.wait()
        for s in servers:
            s.stop()
        shutil.rmtree(d, ignore_errors=True)
    print(f"size {a.size}, {a.rounds} rounds (median of per-round ratios; < 1: blkjobs faster)"
          f"{', 2 CPU hogs' if a.busy else ''}; load average {load0[0]:.1f} before, "
          f"{load1[0]:.1f} after")
    for r in results:
        med = "  ".join(f"{n} {t:.3f}s" for n, t in r["median_s"].items())
        rat = "  ".join(f"vs {n} {x:.2f}" for n, x in r["ratio"].items())
        print(f"{r['case']:<24} {med}   {rat}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
