#!/usr/bin/env python3
"""The bar of issue 6: blkjobs' sequential O_DIRECT loops against fio, side
by side, on the same file with the same settings.

    python3 benchmarks/fio_compare.py /var/tmp --size 2G --rounds 11

For each of read/write x threads (1, 4) it runs, round after round in a
rotated order (so drift hits all alike), after one discarded warm-up round:

  blkjobs      csrc/ioloop.c through blkjobs.native.ioloop.IOLoop: N threads
               doing pread/pwrite, each streaming its own 1/N of the file
  fio-jobs     fio --ioengine=psync --thread --numjobs=N, each job reading or
               writing its own 1/N of the file (offset_increment): the same
               settings, and the figure of the bar
  fio-depth    fio --ioengine=libaio --iodepth=N, one job: one sequential
               stream with N requests in flight (for information)

Writes use --end_fsync=1 in fio and an fsync in blkjobs, both timed. fio's
figures are its own (io_bytes / runtime); blkjobs' are the C loop's clock.
It prints median and min..max in MB/s (10^6 B/s), the ratio of the medians
to fio-jobs, and the paired ratio: the median over rounds of blkjobs/fio-jobs
within one round (each round runs them back to back, so drift of the shared
disk between rounds -- +-20% here -- cancels). It exits 1 when a paired
blkjobs ratio is off 1 by more than 10%. Needs fio (Debian: fio) and a built blkjobs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from blkjobs.units import parse_size
from blkjobs.native.ioloop import IOLoop


def run_blkjobs(path, rw, n, size, bs):
    flags = os.O_DIRECT | (os.O_RDWR if rw == "write" else os.O_RDONLY)
    fd = os.open(path, flags)
    try:
        with IOLoop(fd, write=rw == "write", random=False, bs=bs, size=size, threads=n,
                    fsync=True, path=path) as loop:
            r = loop.run()
        return r.bytes / (r.elapsed_ns / 1e9)
    finally:
        os.close(fd)


def run_fio(path, rw, n, size, bs, mode):
    a = ["fio", "--name=cmp", f"--filename={path}", f"--rw={rw}", f"--bs={bs}", "--direct=1",
         "--output-format=json", "--allow_file_create=0", "--invalidate=1"]
    if mode == "jobs":
        per = size // n // bs * bs
        a += ["--ioengine=psync", "--thread", f"--numjobs={n}", "--group_reporting",
              f"--size={per}", f"--offset_increment={per}"]
    else:
        a += ["--ioengine=libaio", f"--iodepth={n}", f"--size={size}"]
    if rw == "write":
        # blkjobs writes one unchanging buffer, as fio does with
        # scramble_buffers=0 (fio's default scrambles every buffer, which costs
        # CPU per request and measured 20-30% slower here: not the same work)
        a += ["--end_fsync=1", "--scramble_buffers=0"]
    out = subprocess.run(a, check=True, capture_output=True, text=True).stdout
    part = json.loads(out[out.find("{"):])["jobs"][0][rw]
    return part["io_bytes"] / (part["runtime"] / 1000.0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", nargs="?", default="/var/tmp")
    p.add_argument("--size", default="2G")
    p.add_argument("--bs", default="1M")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--threads", default="1,4")
    p.add_argument("--rw", default="read,write")
    p.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    a = p.parse_args()
    if not shutil.which("fio"):
        sys.exit("fio is not installed (Debian: apt install fio)")
    size, bs = parse_size(a.size), parse_size(a.bs)
    work = tempfile.mkdtemp(prefix="fio-compare.", dir=a.dir)
    path = os.path.join(work, "data.dat")
    results = {}
    try:
        # Lay the file out once, fully written, so neither side allocates.
        subprocess.run(["fio", "--name=layout", f"--filename={path}", f"--size={size}",
                        "--rw=write", "--bs=1M", "--direct=1", "--end_fsync=1",
                        "--output=/dev/null"], check=True)
        contenders = {
            "blkjobs": lambda rw, n: run_blkjobs(path, rw, n, size, bs),
            "fio-jobs": lambda rw, n: run_fio(path, rw, n, size, bs, "jobs"),
            "fio-depth": lambda rw, n: run_fio(path, rw, n, size, bs, "depth"),
        }
        names = list(contenders)
        for rw in a.rw.split(","):
            for n in map(int, a.threads.split(",")):
                figs = {k: [] for k in names}
                for rnd in range(a.rounds + 1):
                    for k in range(len(names)):
                        name = names[(rnd + k) % len(names)]
                        v = contenders[name](rw, n)
                        if rnd:  # round 0 is the warm-up
                            figs[name].append(v)
                    sys.stderr.write(f"\r{rw} threads={n} round {rnd}/{a.rounds}")
                sys.stderr.write("\r\x1b[K")
                results[(rw, n)] = figs
    finally:
        shutil.rmtree(work, ignore_errors=True)

    worst = 1.0   # the blkjobs/fio ratio farthest from 1
    print(f"sequential {a.bs} O_DIRECT, {a.size} file in {a.dir}, median of {a.rounds} "
          f"rounds after 1 warm-up, MB/s = 10^6 B/s")
    print(f"{'rw':6} {'thr':>3}  {'contender':10} {'median':>8}  {'min-max':>15}  ratio  "
          f"best-ratio  paired (IQR)")
    for (rw, n), figs in results.items():
        med = {k: statistics.median(v) for k, v in figs.items()}
        for k, v in figs.items():
            ratio = med[k] / med["fio-jobs"]
            best = max(v) / max(figs["fio-jobs"])  # the least disturbed runs
            pr = sorted(x / y for x, y in zip(v, figs["fio-jobs"], strict=True))
            paired = statistics.median(pr)
            q1, q3 = pr[len(pr) // 4], pr[(3 * len(pr)) // 4]
            if k == "blkjobs" and abs(paired - 1) > abs(worst - 1):
                worst = paired
            print(f"{rw:6} {n:>3}  {k:10} {med[k] / 1e6:8.0f}  "
                  f"{min(v) / 1e6:7.0f}-{max(v) / 1e6:<7.0f}  {ratio:5.2f}  {best:9.2f}  "
                  f"{paired:6.2f} ({q1:.2f}-{q3:.2f})")
    if a.json:
        print(json.dumps({f"{rw}/{n}": f for (rw, n), f in results.items()}))
    ok = abs(worst - 1) <= 0.10
    print(f"blkjobs/fio paired ratio farthest from 1: {worst:.2f} "
          f"({'within' if ok else 'NOT within'} 10%)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
