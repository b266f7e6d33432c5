#!/usr/bin/env python3
"""raw -> raw copy of a deterministic 4 GiB VM-shaped image, side by side:
blkjobs convert, qemu-img convert (defaults, and -m 16 -W), cp --sparse=always,
dd conv=sparse bs=4M and nbdcopy.

Method: one warm-up round, then ROUNDS rounds; in each round every contender
runs once, in an order rotated per round, so drift hits all alike. The
source stays in the page cache (warm). Two measurements per run:
  page cache : the command alone (none of the others flushes its target)
  durable    : the command followed by sync(2), i.e. until the copy is on disk
The target is deleted and the system synced between runs (not timed).
Peak RSS comes from GNU time (%M). We report median and min, MB/s of virtual size
and the ratio of each contender's median time to blkjobs'.

Usage: benchmarks/convert_raw.py [--size 4G] [--rounds 5] [--dir DIR] [--json FILE]
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
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from blkjobs.cli.sizes import parse_size  # noqa: E402
from blkjobs.imageops.vmimage import make_vm_image  # noqa: E402

BLKJOBS = os.path.join(os.path.dirname(sys.executable), "blkjobs")


def contenders(src, dst):
    c = {
        "blkjobs convert": [BLKJOBS, "convert", src, dst],     # default: -t unsafe, as qemu-img
        # durable copies: blkjobs flushes itself (-t writeback, with write-behind)
        "blkjobs -t writeback": [BLKJOBS, "convert", "-t", "writeback", src, dst],
        "qemu-img convert": ["qemu-img", "convert", "-f", "raw", "-O", "raw", src, dst],
        "qemu-img -m 16 -W": ["qemu-img", "convert", "-m", "16", "-W", "-f", "raw", "-O", "raw",
                              src, dst],
        "cp --sparse=always": ["cp", "--sparse=always", src, dst],
        "dd conv=sparse 4M": ["dd", f"if={src}", f"of={dst}", "bs=4M", "conv=sparse",
                              "status=none"],
        "nbdcopy": ["nbdcopy", src, dst],
    }
    return {k: v for k, v in c.items() if shutil.which(v[0])}


def run_once(cmd, durable, rss_file):
    # GNU time reports the peak RSS of the command itself: wait4() on our own
    # child would count the memory it inherited from this Python at fork.
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss_file] + cmd,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if durable:
        os.sync()
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed: {p.stderr.decode()}")
    with open(rss_file) as f:
        return dt, int(f.read().split()[-1]) * 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="4G")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    size = parse_size(a.size)
    d = a.dir or tempfile.mkdtemp(prefix="blkjobs-bench-", dir="/var/tmp")
    src, dst = os.path.join(d, "src.raw"), os.path.join(d, "dst.raw")
    print(f"building {a.size} VM-shaped image in {d} ...", file=sys.stderr)
    lay = make_vm_image(src, size)
    print(f"data {lay.data >> 20} MiB, zeroes-as-data {lay.zero >> 20} MiB, holes "
          f"{lay.hole >> 20} MiB", file=sys.stderr)
    subprocess.run(["cat", src], stdout=subprocess.DEVNULL)   # warm the page cache
    cs = contenders(src, dst)
    names = list(cs)
    res = {(n, m): [] for n in names for m in ("cache", "durable")}
    rss = {n: 0 for n in names}
    for rnd in range(a.rounds + 1):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for mode in ("cache", "durable"):
            for n in order:
                if os.path.exists(dst):
                    os.unlink(dst)
                os.sync()
                dt, r = run_once(cs[n], mode == "durable", os.path.join(d, "rss"))
                if rnd > 0:                       # round 0 is the warm-up
                    res[(n, mode)].append(dt)
                    rss[n] = max(rss[n], r)
                print(f"round {rnd} {mode:7s} {n:20s} {dt:7.3f} s", file=sys.stderr)
        # check the last copy is right (cheap: qemu-img compare)
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", src, dst], check=True)
    out = {"size": size, "layout": lay.__dict__, "rounds": a.rounds, "results": {}}
    for mode in ("cache", "durable"):
        base = statistics.median(res[("blkjobs convert", mode)])
        print(f"\n{mode}: {'contender':22s} {'median s':>9s} {'min s':>8s} {'MB/s':>8s} "
              f"{'time/blkjobs':>13s} {'peak RSS':>9s}")
        for n in names:
            ts = res[(n, mode)]
            med, mn = statistics.median(ts), min(ts)
            print(f"{'':{len(mode) + 2}s}{n:22s} {med:9.3f} {mn:8.3f} {size / med / 1e6:8.0f} "
                  f"{med / base:13.2f} {rss[n] / 2**20:7.1f} MiB")
            out["results"].setdefault(mode, {})[n] = {"median_s": med, "min_s": mn, "times": ts,
                                                      "peak_rss": rss[n]}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    if not a.dir:
        shutil.rmtree(d)


if __name__ == "__main__":
    main()
