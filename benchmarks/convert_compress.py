#!/usr/bin/env python3
"""``convert -c`` (zlib-compressed qcow2) against ``qemu-img convert -c``, on
a deterministic compressible image, quiet and with every core busy.

The image: 64 KiB clusters of text-like data (compresses ~3:1), random bytes
(does not compress: stored as plain clusters), and written zeroes, in a
seeded order. Method as in convert_raw.py: one warm-up round, then ROUNDS
rounds with the contenders in an order rotated per round, the target deleted
and the system synced between runs (not timed), the MEDIAN OF THE PER-ROUND
RATIOS peer time / blkjobs time (> 1: blkjobs is faster). busy: one CPU hog
per core for the whole block. The last targets are checked with
``qemu-img compare`` and ``qemu-img check``.

Usage: benchmarks/convert_compress.py [--size 512M] [--rounds 7]
       [--load quiet,busy] [--baseline PATH] [--dir DIR]
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from convert_raw import BLKJOBS, Hogs, report, run_once  # noqa: E402
from blkjobs.units import parse_size  # noqa: E402

WORDS = ("block job mirror backup stream commit cluster image qcow2 raw guest host "
         "the of and to in is was for on that with as by at from this be are").split()


def make_compressible(path: str, size: int, seed: int = 3) -> None:
    rnd = random.Random(seed)
    text = " ".join(rnd.choice(WORDS) + str(rnd.randrange(100)) for _ in range(400000))
    pool_t = text.encode()
    pool_r = rnd.randbytes(4 << 20)
    cl = 65536
    with open(path, "wb") as f:
        for _ in range(0, size, cl):
            k = rnd.random()
            if k < 0.6:
                s = rnd.randrange(0, len(pool_t) - cl)
                f.write(pool_t[s:s + cl])
            elif k < 0.8:
                s = rnd.randrange(0, len(pool_r) - cl)
                f.write(pool_r[s:s + cl])
            else:
                f.write(bytes(cl))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="512M")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--load", default="quiet,busy")
    ap.add_argument("--baseline", default=None, metavar="BLKJOBS")
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    size = parse_size(a.size)
    d = a.dir or tempfile.mkdtemp(prefix="blkjobs-bench-c-", dir="/var/tmp")
    src, dst = os.path.join(d, "src.raw"), os.path.join(d, "dst.qcow2")
    cs = {"blkjobs convert": [BLKJOBS, "convert", "-c", "-O", "qcow2", src, dst],
          "qemu-img convert": ["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", src, dst]}
    if a.baseline:
        cs["blkjobs before"] = [a.baseline, "convert", "-c", "-O", "qcow2", src, dst]
    names = list(cs)
    try:
        make_compressible(src, size)
        subprocess.run(["cat", src], stdout=subprocess.DEVNULL)
        print(f"load average before: {os.getloadavg()[0]:.1f}", file=sys.stderr)
        for load in a.load.split(","):
            res: dict = {(n, "cache"): [] for n in names}
            rss = {n: 0 for n in names}
            hogs = Hogs(os.cpu_count() or 1) if load == "busy" else None
            try:
                for rnd in range(a.rounds + 1):
                    for n in names[rnd % len(names):] + names[:rnd % len(names)]:
                        if os.path.exists(dst):
                            os.unlink(dst)
                        os.sync()
                        dt, r, us, sy = run_once(cs[n], False, os.path.join(d, "rss"))
                        if rnd > 0:
                            res[(n, "cache")].append((dt, us, sy))
                            rss[n] = max(rss[n], r)
                        print(f"  {load} round {rnd} {n:18s} {dt:7.3f} s user {us:5.2f}",
                              file=sys.stderr)
            finally:
                if hogs:
                    hogs.close()
            subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", src, dst],
                           check=True)
            subprocess.run(["qemu-img", "check", "-q", dst], check=True)
            report(f"convert -c {a.size} raw->qcow2, {load} (load average "
                   f"{os.getloadavg()[0]:.1f})", size, names, res, rss, ["cache"])
    finally:
        if not a.dir:
            shutil.rmtree(d)


if __name__ == "__main__":
    main()
