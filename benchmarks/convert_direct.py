#!/usr/bin/env python3
"""convert -t none (O_DIRECT target) against qemu-img convert -t none, on a
dense random raw image, raw -> raw and raw -> qcow2.

Method: one warm-up round, then ROUNDS rounds; in each round every pair
runs back to back (blkjobs then qemu-img, the order swapped every other
round, so drift hits both alike). The source is read once with cat before
the rounds and stays in the page cache for both (-T is left at writeback,
as qemu-img's default); the target is written O_DIRECT and flushed by each
tool. The target is deleted between runs (not timed). We report per
contender the median and min wall time, and per pair the MEDIAN OF THE
PER-ROUND RATIOS qemu-img time / blkjobs time (> 1: blkjobs is faster)
with their min-max, and the load average before and after (the machine
may be shared).

Usage: benchmarks/convert_direct.py [--size 1G] [--rounds 5] [--dir /var/tmp]
       [--formats raw,qcow2] [--json FILE]
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

from blkjobs.units import parse_size  # noqa: E402

BLKJOBS = os.path.join(os.path.dirname(sys.executable), "blkjobs")


def timed(argv: list[str]) -> float:
    t0 = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--formats", default="raw,qcow2")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    size = parse_size(a.size)
    work = tempfile.mkdtemp(prefix="convert-direct-", dir=a.dir)
    try:
        src = os.path.join(work, "src.raw")
        with open(src, "wb") as f:
            left = size
            while left:
                n = min(left, 4 << 20)
                f.write(os.urandom(n))
                left -= n
        subprocess.run(["cat", src], check=True, stdout=subprocess.DEVNULL)
        load0 = os.getloadavg()
        times: dict[str, list[float]] = {}
        ratios: dict[str, list[float]] = {}
        for r in range(a.rounds + 1):               # round 0: warm-up, not counted
            for fmt in a.formats.split(","):
                dst = os.path.join(work, f"dst.{fmt}")
                pair = {"blkjobs": [BLKJOBS, "convert", "-t", "none", "-f", "raw", "-O", fmt,
                                    src, dst],
                        "qemu-img": ["qemu-img", "convert", "-t", "none", "-f", "raw",
                                     "-O", fmt, src, dst]}
                order = list(pair) if r % 2 else list(reversed(pair))
                got = {}
                for name in order:
                    got[name] = timed(pair[name])
                    os.unlink(dst)
                    os.sync()
                if r:
                    for name, t in got.items():
                        times.setdefault(f"{name} raw->{fmt}", []).append(t)
                    ratios.setdefault(f"raw->{fmt}", []).append(got["qemu-img"] / got["blkjobs"])
        load1 = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"dense {a.size} raw source, -t none, {a.rounds} rounds (+1 warm-up), "
          f"load average before {load0[0]:.1f} after {load1[0]:.1f}, {os.cpu_count()} cores")
    for k, v in times.items():
        print(f"  {k:22s} median {statistics.median(v):6.2f} s  min {min(v):6.2f} s")
    for k, v in ratios.items():
        print(f"  {k:10s} qemu-img/blkjobs median of per-round ratios {statistics.median(v):.2f} "
              f"(min {min(v):.2f}, max {max(v):.2f})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"times": times, "ratios": ratios, "load": [load0, load1]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
