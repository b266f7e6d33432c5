#!/usr/bin/env python3
"""End-to-end measure of `convert -r RATE`: does the copy keep its rate from
the first second on?

Copies a dense random raw image (every byte data: nothing is skipped, so the
limit is what paces the copy) with `blkjobs convert -r RATE --progress-json`,
reads the progress lines (done bytes every 0.2 s) as they come, stamped
with the time they arrive, and prints per run:
  total      : the copy's time against size / rate (the ideal)
  first 1 s  : bytes done 1 s after the first progress line, / rate
  worst 1 s  : the highest rate over any two progress lines >= 1 s apart
               (bytes between them / time between them), / rate
and the same total for `qemu-img convert -r RATE` (QEMU's limit, for
reference; it prints no progress we can stamp). --baseline BLKJOBS measures
another blkjobs too (e.g. the main branch's .venv/bin/blkjobs).
Progress counts completed writes, so a window can read a little high or low
by the requests in flight at its ends (4 workers x rate/128).

Usage: benchmarks/ratelimit.py [--size 1G] [--rate 200M] [--rounds 3]
       [--baseline PATH] [--dir DIR]
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
sys.path.insert(0, HERE)

from blkjobs.units import parse_size  # noqa: E402
from convert_raw import make_dense  # noqa: E402

BLKJOBS = os.path.join(os.path.dirname(sys.executable), "blkjobs")


def run_blkjobs(exe, src, dst, rate):
    """[(t, done)] from the progress lines, and the total time."""
    t0 = time.perf_counter()
    p = subprocess.Popen([exe, "convert", "-r", str(rate), "--progress-json", src, dst],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples = []
    for line in p.stderr:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        samples.append((time.perf_counter(), int(rec["done"])))
    if p.wait() != 0:
        raise SystemExit(f"{exe} convert failed")
    return samples, time.perf_counter() - t0


def windows(samples, rate):
    """(first 1 s / rate, worst >= 1 s window / rate)."""
    t_start, d_start = samples[0]
    first = None
    for t, d in samples:
        if t - t_start >= 1.0:
            # done at exactly 1 s, interpolated between this sample and the previous
            first = d_start + (d - d_start) * 1.0 / (t - t_start) if first is None else first
            break
    worst, j = 0.0, 0
    for t, d in samples:
        while j < len(samples) and samples[j][0] - t < 1.0:
            j += 1
        if j == len(samples):
            break
        tj, dj = samples[j]
        worst = max(worst, (dj - d) / (tj - t))
    return (first or 0) / rate, worst / rate


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rate", default="200M")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", default=None, metavar="BLKJOBS")
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    size, rate = parse_size(a.size), parse_size(a.rate)
    d = a.dir or tempfile.mkdtemp(prefix="blkjobs-rate-", dir="/var/tmp")
    src, dst = os.path.join(d, "dense.raw"), os.path.join(d, "dst.raw")
    exes = {"blkjobs": BLKJOBS}
    if a.baseline:
        exes["blkjobs before"] = a.baseline
    try:
        make_dense(src, size)
        subprocess.run(["cat", src], stdout=subprocess.DEVNULL)   # warm the source
        ideal = size / rate
        res = {n: [] for n in list(exes) + ["qemu-img -r"]}
        for rnd in range(a.rounds):
            for n, exe in exes.items():
                if os.path.exists(dst):
                    os.unlink(dst)
                os.sync()
                samples, total = run_blkjobs(exe, src, dst, rate)
                first, worst = windows(samples, rate)
                res[n].append((total, first, worst))
                print(f"round {rnd} {n:15s} total {total:6.2f} s (ideal {ideal:.2f}) "
                      f"first 1 s {first:5.3f}x  worst 1 s {worst:5.3f}x", file=sys.stderr)
            os.unlink(dst)
            os.sync()
            t0 = time.perf_counter()
            subprocess.run(["qemu-img", "convert", "-r", str(rate), "-f", "raw", "-O", "raw",
                            src, dst], check=True)
            res["qemu-img -r"].append((time.perf_counter() - t0, None, None))
        print(f"\n{a.size} dense raw->raw at -r {a.rate} (ideal {ideal:.2f} s), "
              f"medians of {a.rounds}:")
        print(f"  {'':15s} {'total s':>8s} {'total/ideal':>11s} {'first 1 s':>10s} "
              f"{'worst 1 s':>10s}")
        for n, rows in res.items():
            tot = statistics.median(r[0] for r in rows)
            f = "" if rows[0][1] is None else f"{statistics.median(r[1] for r in rows):9.3f}x"
            w = "" if rows[0][2] is None else f"{max(r[2] for r in rows):9.3f}x"
            print(f"  {n:15s} {tot:8.2f} {tot / ideal:11.3f} {f:>10s} {w:>10s}")
        print("  (first 1 s: median; worst 1 s: the worst of all rounds; "
              "total includes start-up)")
    finally:
        if not a.dir:
            shutil.rmtree(d)


if __name__ == "__main__":
    main()
