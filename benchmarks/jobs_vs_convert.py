#!/usr/bin/env python3
"""A full backup and a full mirror against our own ``convert`` of the same
data (the bar: a job costs at most 10% more), and against ``qemu-img
convert``, quiet and with every core busy.

The source: the VM-shaped qcow2 of benchmarks/jobs.py. Every command writes
a new qcow2 with ``-t unsafe`` semantics (no final fsync, as qemu-img
convert and our convert's default). One warm-up round, then ROUNDS rounds in
an order rotated per round, target removed and the system synced between
runs (not timed); printed: the median time and CPU of each, and the MEDIAN
OF THE PER-ROUND RATIOS job time / convert time (< 1.10: within the bar).

Usage: benchmarks/jobs_vs_convert.py [--size 1G] [--rounds 7] [--load quiet,busy]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from convert_raw import BLKJOBS, Hogs, run_once  # noqa: E402
from jobs import make_vm_raw  # noqa: E402
from blkjobs.units import parse_size  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--load", default="quiet,busy")
    ap.add_argument("--dir", default="/var/tmp")
    a = ap.parse_args()
    size = parse_size(a.size)
    d = tempfile.mkdtemp(prefix="blkjobs-jobs-conv.", dir=a.dir)
    vm, out = os.path.join(d, "vm.qcow2"), os.path.join(d, "out.qcow2")
    cmds = {
        "blkjobs convert": [BLKJOBS, "convert", "-O", "qcow2", vm, out],
        "blkjobs backup": [BLKJOBS, "backup", "-t", "unsafe", vm, out],
        "blkjobs mirror": [BLKJOBS, "mirror", "-t", "unsafe", vm, out],
        "qemu-img convert": ["qemu-img", "convert", "-O", "qcow2", vm, out],
    }
    names = list(cmds)
    try:
        raw = os.path.join(d, "vm.raw")
        make_vm_raw(raw, size)
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, vm], check=True)
        os.unlink(raw)
        subprocess.run(["cat", vm], stdout=subprocess.DEVNULL)
        for load in a.load.split(","):
            res: dict = {n: [] for n in names}
            hogs = Hogs.for_load(load)
            la = os.getloadavg()[0]
            try:
                for rnd in range(a.rounds + 1):
                    for n in names[rnd % len(names):] + names[:rnd % len(names)]:
                        if os.path.exists(out):
                            os.unlink(out)
                        os.sync()
                        dt, _, us, sy = run_once(cmds[n], False, os.path.join(d, "rss"))
                        if rnd:
                            res[n].append((dt, us, sy))
                        print(f"  {load} round {rnd} {n:17s} {dt:6.3f} s", file=sys.stderr)
            finally:
                if hogs:
                    hogs.close()
            subprocess.run(["qemu-img", "compare", "-q", vm, out], check=True)
            base = [t for t, _, _ in res["blkjobs convert"]]
            print(f"\n{a.size} VM-shaped qcow2 -> qcow2, {load} (load average {la:.1f}):")
            for n in names:
                ts = [t for t, _, _ in res[n]]
                r = [t / b for t, b in zip(ts, base, strict=True)]
                print(f"  {n:17s} median {statistics.median(ts):6.3f} s  user "
                      f"{statistics.median(u for _, u, _ in res[n]):5.2f}  sys "
                      f"{statistics.median(s for _, _, s in res[n]):5.2f}   time / our convert: "
                      f"{statistics.median(r):5.2f} [{min(r):.2f}-{max(r):.2f}]")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
