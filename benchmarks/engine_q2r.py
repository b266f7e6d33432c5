#!/usr/bin/env python3
"""Benchmark: the copy engine alone on a qcow2 -> raw copy, with and
without ``prealloc`` (issue 15, stop 20), alternated every round.

Not a test. The items are the source's data runs as ``qemu-img map`` gives
them (host offset -> guest offset), as convert_chain queues them; the target
is a new sparse raw file of the image's size, zero detection at 4 KiB, 4
workers, 512 KiB requests (convert's defaults for qcow2 -> raw). Only the
engine's run is timed (no start-up, no planning); CPU = the process's user +
system time over the run. Prints the median wall and CPU and the median of
the per-round ratios (without / with prealloc: > 1, prealloc is faster).

    python3 benchmarks/engine_q2r.py IMAGE.qcow2 [--rounds 15] [--dir /var/tmp]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

from blkjobs.native.copy import COPY, CopyEngine  # noqa: E402


def items_of(src: str) -> tuple[int, list[tuple[int, int, int, int]]]:
    m = json.loads(subprocess.check_output(["qemu-img", "map", "--output", "json", src]))
    size = m[-1]["start"] + m[-1]["length"]
    return size, [(e["offset"], e["start"], e["length"], COPY) for e in m
                  if e["data"] and "offset" in e]


def one(src: str, dst: str, size: int, items: list, prealloc: bool) -> tuple[float, float]:
    if os.path.exists(dst):
        os.unlink(dst)
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(dfd, size)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t = time.monotonic()
        with CopyEngine(sfd, dfd, threads=4, request_size=512 << 10, zero_block=4096,
                        target_is_zero=True, prealloc=prealloc) as eng:
            eng.add(items)
            eng.run_to_end()
        wall = time.monotonic() - t
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    finally:
        os.close(sfd)
        os.close(dfd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("image")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--dir", default="/var/tmp")
    a = ap.parse_args()
    size, items = items_of(a.image)
    res: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        dst = os.path.join(d, "out.raw")
        for r in range(a.rounds + 1):            # round 0: warm-up
            for pre in ((False, True) if r % 2 == 0 else (True, False)):
                x = one(a.image, dst, size, items, pre)
                if r:
                    res[pre].append(x)
    print(f"load average {os.getloadavg()[0]:.1f}; {a.rounds} rounds")
    for pre in (False, True):
        w = [x[0] for x in res[pre]]
        c = [x[1] for x in res[pre]]
        print(f"prealloc={'on ' if pre else 'off'}  wall median {statistics.median(w) * 1e3:6.1f} ms"
              f" (min {min(w) * 1e3:6.1f})  CPU median {statistics.median(c) * 1e3:6.1f} ms")
    ratio = [x[0] / y[0] for x, y in zip(res[False], res[True], strict=True)]
    print(f"per-round wall off/on: median {statistics.median(ratio):.2f} "
          f"[{min(ratio):.2f}-{max(ratio):.2f}]")


if __name__ == "__main__":
    main()
