#!/usr/bin/env python3
"""The phases of one chain-path convert (raw or qcow2 or a chain -> qcow2,
qcow2 -> raw), timed inside the process: opening the source
(``ChainConvert._open``), creating the target (``_create_target``), the
planning on the main thread while the engine copies (``_feed``: block
status, the zero-cluster scan, allocation, queueing) and what is left after
the copy (``_finish``: sparsify, the metadata flush) -- wall and the main
thread's CPU (``time.thread_time``), ms. The head and the tail are the
serial parts around the copy, which whole-process wall times on the shared
machine do not resolve (their per-round spread is 0.3-3x).

    benchmarks/convert_phases.py --rounds 9 [--baseline /path/to/other/src] SRC FMT

Each round runs ``blkjobs convert -t unsafe -O FMT SRC DST`` once with this
tree's ``src`` and once with the baseline's (a ``git archive main src`` copy
with the built ``_core``/``_nbd`` modules), in a rotated order; DST (next to
SRC, ``.phases.FMT``) is deleted and the system synced before each run.
Prints the median [min-max] of each phase per build."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
PHASES = ("_open", "_create_target", "_feed", "_finish")

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
fmt, src, dst = sys.argv[2:5]
PHASES = sys.argv[5].split(",")
sys.argv = ["blkjobs", "convert", "-t", "unsafe", "-O", fmt, src, dst]
import blkjobs.cli.main as m
import blkjobs.imageops.convert_chain as cc
out = {}
def wrap(name):
    orig = getattr(cc.ChainConvert, name)
    def timed(*a, **k):
        t, c = time.perf_counter(), time.thread_time()
        try:
            return orig(*a, **k)
        finally:
            w, u = out.get(name, (0.0, 0.0))
            out[name] = (w + time.perf_counter() - t, u + time.thread_time() - c)
    setattr(cc.ChainConvert, name, timed)
for n in PHASES:
    wrap(n)
m._quick_exit_ok = lambda: False
try:
    m.run()
except SystemExit as e:
    if e.code:
        raise
print(json.dumps({k: [v[0] * 1e3, v[1] * 1e3] for k, v in out.items()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--baseline", help="another tree's src directory")
    ap.add_argument("src")
    ap.add_argument("fmt", choices=("raw", "qcow2"))
    a = ap.parse_args()
    builds = {"this": SRC}
    if a.baseline:
        if not os.path.isdir(os.path.join(a.baseline, "blkjobs")):
            raise SystemExit(f"no blkjobs package in {a.baseline!r}")
        builds["baseline"] = a.baseline
    if not os.path.isfile(a.src):
        raise SystemExit(f"no such file: {a.src!r}")
    dst = f"{a.src}.phases.{a.fmt}"
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)     # as a user runs it: compiled once
    res: dict[str, dict[str, list[tuple[float, float]]]] = {b: {} for b in builds}
    names = list(builds)
    try:
        for r in range(a.rounds + 1):           # round 0 warms up (not counted)
            for b in names[r % len(names):] + names[:r % len(names)]:
                if os.path.exists(dst):
                    os.unlink(dst)
                os.sync()
                p = subprocess.run([sys.executable, "-c", CHILD, builds[b], a.fmt, a.src, dst,
                                    ",".join(PHASES)],
                                   capture_output=True, text=True, env=env)
                if p.returncode:
                    raise SystemExit(f"{b}: convert failed: {p.stderr.strip()[-300:]}")
                if r:
                    for k, v in json.loads(p.stdout.splitlines()[-1]).items():
                        res[b].setdefault(k, []).append(tuple(v))
    finally:
        if os.path.exists(dst):
            os.unlink(dst)
    print(f"{os.path.basename(a.src)} -> {a.fmt}, {a.rounds} rounds; ms, median [min-max]")
    for b in names:
        cells = []
        for k in PHASES:
            v = res[b].get(k)
            if v:
                w, c = [x[0] for x in v], [x[1] for x in v]
                cells.append(f"{k.lstrip('_')} {statistics.median(w):.2f} [{min(w):.2f}-"
                             f"{max(w):.2f}] cpu {statistics.median(c):.2f}")
        print(f"  {b:<9} " + "; ".join(cells))


if __name__ == "__main__":
    main()
