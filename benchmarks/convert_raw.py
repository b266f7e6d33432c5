#!/usr/bin/env python3
"""raw -> raw copies, every comparison in one run: blkjobs convert against
qemu-img convert (defaults, and -m 16 -W), cp --sparse=always, dd
conv=sparse bs=4M and nbdcopy, on a dense random image and a VM-shaped one
(4 KiB-granular extents of data, written zeroes and holes), page cache and
durable, on a quiet machine and with every core busy.

Method: per (image, load), one warm-up round, then ROUNDS rounds; in each
round every contender runs once, in an order rotated per round, so drift
hits all alike. The source stays in the page cache (drop_caches is not
available here: it is read once with cat before the rounds, the same for
every contender). Two measurements per run:
  page cache : the command alone (none of the others flushes its target)
  durable    : the command followed by sync(2), i.e. until the copy is on disk
The target is deleted and the system synced between runs (not timed).
busy: one CPU hog per core (a busy loop in its own process) runs for the
whole (image, busy) block, as on a host busy running its VMs; busy-apart:
the same hogs, each in a session of its own (see Hogs: how the scheduler
shares the CPU differs).
We report per contender the median and min time, MB/s of virtual size, user
and system CPU seconds (GNU time, median), peak RSS, and the MEDIAN OF THE
PER-ROUND RATIOS peer time / blkjobs time (> 1: blkjobs is faster), with
their min-max: within one round the two ran back to back under the same
drift. --baseline BLKJOBS adds another blkjobs (e.g. the main branch's
.venv/bin/blkjobs) as "blkjobs before"; --threads 1,2 adds "blkjobs -m 1"
and "blkjobs -m 2" (worker threads).

Usage: benchmarks/convert_raw.py [--size 2G] [--rounds 5] [--image dense,vm]
       [--load quiet,busy,busy-apart] [--mode cache,durable] [--only NAME,...]
       [--baseline PATH] [--threads 1,2] [--dir DIR] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from blkjobs.units import parse_size  # noqa: E402
from blkjobs.imageops.vmimage import make_vm_image  # noqa: E402

BLKJOBS = os.path.join(os.path.dirname(sys.executable), "blkjobs")


def contenders(src, dst, baseline=None, threads=()):
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
        # nbdcopy takes local files itself (no nbdkit needed); --flush only
        # for durable copies would not be like for like: sync(2) follows
        "nbdcopy": ["nbdcopy", src, dst],
    }
    if baseline:
        c["blkjobs before"] = [baseline, "convert", src, dst]
    for m in threads:
        c[f"blkjobs -m {m}"] = [BLKJOBS, "convert", "-m", str(m), src, dst]
    return {k: v for k, v in c.items() if shutil.which(v[0])}


def make_dense(path, size, seed=1):
    """Random bytes, every block data: nothing to skip, all to write."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        for off in range(0, size, 1 << 20):
            f.write(rnd.randbytes(min(1 << 20, size - off)))


class Hogs:
    """One busy-looping process per core, for the busy loads.

    ``busy``: the hogs run in the benchmark's own session. With the kernel's
    autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``, on
    in Debian's kernels) a session is one scheduling group, and inside it
    the CPU is shared per runnable thread: a contender with 16 threads gets
    more of it than one with a single busy thread. ``busy-apart``: each hog
    in a session of its own (``setsid``), as VMs started by libvirtd or a
    systemd unit are: the groups then share the CPU, whatever their thread
    counts. Both are real hosts; the tables say which one they measured."""

    def __init__(self, n, own_session=False):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                       start_new_session=own_session)
                      for _ in range(n)]

    @classmethod
    def for_load(cls, load):
        """The hogs of a --load value (None for quiet)."""
        if load == "quiet":
            return None
        if load not in ("busy", "busy-apart"):
            raise SystemExit(f"unknown load {load!r}: quiet, busy or busy-apart")
        return cls(os.cpu_count() or 1, own_session=load == "busy-apart")

    def close(self):
        for p in self.procs:
            p.send_signal(signal.SIGKILL)
            p.wait()


def run_once(cmd, durable, rss_file):
    """(seconds, peak RSS, user s, system s) of one run."""
    # GNU time reports the peak RSS and CPU of the command itself: wait4() on
    # our own child would count the memory it inherited from this Python.
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", rss_file] + cmd,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if durable:
        os.sync()
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed: {p.stderr.decode()}")
    with open(rss_file) as f:
        rss, user, sys_ = f.read().split()[-3:]
    return dt, int(rss) * 1024, float(user), float(sys_)


def bench_block(a, names, cs, src, dst, d, load, modes):
    """Rounds of one (image, load) block: {(name, mode): [(s, user, sys)]}."""
    res = {(n, m): [] for n in names for m in modes}
    rss = {n: 0 for n in names}
    hogs = Hogs.for_load(load)
    try:
        for rnd in range(a.rounds + 1):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for mode in modes:
                for n in order:
                    if os.path.exists(dst):
                        os.unlink(dst)
                    os.sync()
                    dt, r, us, sy = run_once(cs[n], mode == "durable", os.path.join(d, "rss"))
                    if rnd > 0:                       # round 0 is the warm-up
                        res[(n, mode)].append((dt, us, sy))
                        rss[n] = max(rss[n], r)
                    print(f"  round {rnd} {mode:7s} {n:20s} {dt:7.3f} s  user {us:5.2f} "
                          f"sys {sy:5.2f}", file=sys.stderr)
    finally:
        if hogs:
            hogs.close()
    # check the last copy is right (cheap: qemu-img compare)
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", src, dst], check=True)
    return res, rss


def report(title, size, names, res, rss, modes):
    out = {}
    for mode in modes:
        base = [t for t, _, _ in res[("blkjobs convert", mode)]]
        print(f"\n{title}, {mode}:\n  {'contender':22s} {'median s':>9s} {'min s':>8s} "
              f"{'MB/s':>7s} {'user s':>7s} {'sys s':>6s} {'peak RSS':>9s} "
              f"{'ratio peer/blkjobs (per round: median [min-max])':>10s}")
        for n in names:
            rows = res[(n, mode)]
            ts = [t for t, _, _ in rows]
            med, mn = statistics.median(ts), min(ts)
            us = statistics.median(u for _, u, _ in rows)
            sy = statistics.median(s for _, _, s in rows)
            ratios = [t / b for t, b in zip(ts, base, strict=True)]
            rm = statistics.median(ratios)
            rtxt = "" if n == "blkjobs convert" else \
                f"{rm:6.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"
            print(f"  {n:22s} {med:9.3f} {mn:8.3f} {size / med / 1e6:7.0f} {us:7.2f} {sy:6.2f} "
                  f"{rss[n] / 2**20:6.1f} MiB  {rtxt}")
            out.setdefault(mode, {})[n] = {
                "median_s": med, "min_s": mn, "times": ts, "user_s": us, "sys_s": sy,
                "peak_rss": rss[n], "ratio_median": rm, "ratios": ratios}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2G")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--image", default="dense,vm", help="dense,vm (both by default)")
    ap.add_argument("--load", default="quiet,busy", help="quiet,busy,busy-apart (quiet,busy by default; see Hogs)")
    ap.add_argument("--mode", default="cache,durable", help="cache,durable (both by default)")
    ap.add_argument("--only", default=None, help="contenders to run (comma list of names)")
    ap.add_argument("--baseline", default=None, metavar="BLKJOBS",
                    help="another blkjobs executable to compare, e.g. main's")
    ap.add_argument("--threads", default="", metavar="N,...",
                    help="add blkjobs convert -m N for each N (worker threads)")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    size = parse_size(a.size)
    images = a.image.split(",")
    loads = a.load.split(",")
    modes = a.mode.split(",")
    d = a.dir or tempfile.mkdtemp(prefix="blkjobs-bench-", dir="/var/tmp")
    dst = os.path.join(d, "dst.raw")
    out = {"size": size, "rounds": a.rounds, "results": {}}
    try:
        for image in images:
            src = os.path.join(d, f"{image}.raw")
            print(f"building {a.size} {image} image in {d} ...", file=sys.stderr)
            if image == "dense":
                make_dense(src, size)
            else:
                lay = make_vm_image(src, size)
                print(f"data {lay.data >> 20} MiB, zeroes-as-data {lay.zero >> 20} MiB, holes "
                      f"{lay.hole >> 20} MiB", file=sys.stderr)
                out["layout"] = lay.__dict__
            cs = contenders(src, dst, a.baseline,
                            [int(m) for m in a.threads.split(",") if m])
            names = [n for n in cs if a.only is None or n in a.only.split(",")
                     or n == "blkjobs convert"]
            names.remove("blkjobs convert")
            names.insert(0, "blkjobs convert")
            for load in loads:
                subprocess.run(["cat", src], stdout=subprocess.DEVNULL)   # warm the source
                print(f"{image} image, {load}:", file=sys.stderr)
                la0 = os.getloadavg()[0]
                res, rss = bench_block(a, names, cs, src, dst, d, load, modes)
                title = (f"{image} {a.size} raw->raw, {load} (load average {la0:.1f} before, "
                         f"{os.getloadavg()[0]:.1f} after)")
                out["results"][f"{image}/{load}"] = report(title, size, names, res, rss, modes)
            os.unlink(src)
    finally:
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=2)
        if not a.dir:
            shutil.rmtree(d)


if __name__ == "__main__":
    main()
