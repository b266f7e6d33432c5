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

With ``--agreement`` it checks `blkjobs bench --compare fio` itself instead
(issue 16: latency percentiles and device counters that agree with fio's):

    python3 benchmarks/fio_compare.py --agreement /var/tmp --rounds 7

Each round runs one `blkjobs bench DIR --compare fio --direct --repeat 2
--warmup 1 --output json` per case (randread and seqwrite at 4k and 1M, one
thread unless --threads): after a discarded warm-up each tool runs twice,
once first and once second, so neither always follows the other's writes.
It prints the median over rounds of the per-round blkjobs/fio ratios of
p50, p90, p99, p99.9 (each over the round's two runs), MB/s, the bytes
that reached the device (its counters: a neighbour's I/O is in them) and
the tool's own block-layer bytes, with their min-max. It exits 1 when a
median ratio of p50, p90 or own bytes is off 1 by more than 10%.

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


# -- --agreement: blkjobs bench --compare fio, ratio by ratio --------------------
#: (workload, request size, --size): enough requests for a p99 in each run
AGREEMENT_CASES = [("randread", "4k", "64M"), ("randread", "1M", "1G"),
                   ("seqwrite", "4k", "64M"), ("seqwrite", "1M", "1G")]
RATIOS = ("p50", "p90", "p99", "p99.9", "MB/s", "dev bytes", "own bytes")


def bench_round(d, workload, bs, size, threads):
    """One `blkjobs bench --compare fio` of one case: {tool: row}."""
    argv = [sys.executable, "-m", "blkjobs", "bench", d, "-q", "-w", workload, "-b", bs,
            "--rand-bs", bs, "-j", str(threads), "--size", size, "--direct", "--repeat", "2",
            "--warmup", "1", "--compare", "fio", "--output", "json"]
    p = subprocess.run(argv, capture_output=True, text=True)
    try:
        rows = {r["tool"]: r for r in json.loads(p.stdout)["results"]}
    except ValueError:
        sys.exit(f"blkjobs bench failed (exit {p.returncode}): {p.stderr.strip()}")
    errors = [f"{t}: {r['error']}" for t, r in rows.items() if r["error"]]
    if errors:      # a failed run (a neighbour filled the disk...): the round goes
        sys.stderr.write(f"\n{workload} {bs}: {'; '.join(errors)}: round left out\n")
        return None
    return rows


def figures(row):
    lat = row["latency"]["percentiles_ns"]
    runs = row["runs"]
    devs = [r["device"]["read_bytes"] + r["device"]["write_bytes"] for r in runs
            if r["device"]]
    own = [r["block_io"]["read_bytes"] + r["block_io"]["write_bytes"] for r in runs]
    return {"p50": lat["p50"], "p90": lat["p90"], "p99": lat["p99"], "p99.9": lat["p99.9"],
            "MB/s": row["summary"]["median_mb_s"],
            "dev bytes": statistics.mean(devs) if devs else None,
            "own bytes": statistics.mean(own)}


def agreement(a):
    threads = [int(t) for t in a.threads.split(",")]
    load0 = os.getloadavg()
    per = {}     # (case, threads) -> {ratio name: [per-round ratios]}
    raw = {}     # (case, threads) -> [{tool: figures}] per round
    for rnd in range(a.rounds):
        for w, bs, size in [c for c in AGREEMENT_CASES if f"{c[0]}/{c[1]}" in a.cases]:
            for n in threads:
                sys.stderr.write(f"\r\x1b[Kround {rnd + 1}/{a.rounds}: {w} {bs} j{n}")
                rows = bench_round(a.dir, w, bs, size, n)
                if rows is None:
                    continue
                f = {t: figures(r) for t, r in rows.items()}
                raw.setdefault((w, bs, n), []).append(f)
                rs = per.setdefault((w, bs, n), {k: [] for k in RATIOS})
                for k in RATIOS:
                    if f["blkjobs"][k] and f["fio"][k]:
                        rs[k].append(f["blkjobs"][k] / f["fio"][k])
    sys.stderr.write("\r\x1b[K")
    load1 = os.getloadavg()
    print(f"blkjobs bench --compare fio in {a.dir}, O_DIRECT, {a.rounds} rounds (each: one "
          f"warm-up run then two measured runs of each tool, alternating); load average "
          f"{load0[0]:.1f} at the start, {load1[0]:.1f} at the end, {os.cpu_count()} CPUs")
    print("blkjobs/fio: median of the per-round ratios (min-max)")
    print(f"{'case':15}" + "".join(f"{k:>17}" for k in RATIOS))
    worst = 1.0
    for (w, bs, n), rs in per.items():
        cells = []
        for k in RATIOS:
            v = rs[k]
            if not v:
                cells.append(f"{'-':>17}")
                continue
            m = statistics.median(v)
            if k in ("p50", "p90", "own bytes") and abs(m - 1) > abs(worst - 1):
                worst = m
            cells.append(f"{m:5.2f} ({min(v):.2f}-{max(v):.2f})".rjust(17))
        print(f"{f'{w} {bs} j{n}':15}" + "".join(cells))
    print("medians of the figures over the rounds (us; MB/s; MB), blkjobs | fio:")
    for key, rounds in raw.items():
        med = {t: {k: statistics.median(r[t][k] for r in rounds if r[t][k] is not None)
                   for k in RATIOS} for t in ("blkjobs", "fio")}
        print(f"  {key[0]} {key[1]} j{key[2]}: " + ", ".join(
            f"{k} {_fmt(k, med['blkjobs'][k])} | {_fmt(k, med['fio'][k])}" for k in RATIOS))
    if a.json:
        print(json.dumps({f"{w}/{bs}/{n}": r for (w, bs, n), r in raw.items()}))
    ok = abs(worst - 1) <= 0.10
    print(f"median ratio of p50, p90 and own bytes farthest from 1: {worst:.2f} "
          f"({'within' if ok else 'NOT within'} 10%)")
    return 0 if ok else 1


def _fmt(k, v):
    if k.startswith("p"):
        return f"{v / 1000:.1f}"
    return f"{v / 1e6:.1f}" if k.endswith("bytes") else f"{v:.1f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", nargs="?", default="/var/tmp")
    p.add_argument("--size", default="2G")
    p.add_argument("--bs", default="1M")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--threads", default="1,4")
    p.add_argument("--rw", default="read,write")
    p.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    p.add_argument("--agreement", action="store_true",
                   help="check `blkjobs bench --compare fio`: latency and device ratios")
    p.add_argument("--cases", default=",".join(f"{w}/{b}" for w, b, _ in AGREEMENT_CASES),
                   help="--agreement's cases (default: all of randread,seqwrite x 4k,1M)")
    a = p.parse_args()
    if not shutil.which("fio"):
        sys.exit("fio is not installed (Debian: apt install fio)")
    if a.agreement:
        if a.threads == "1,4":
            a.threads = "1"
        if a.rounds == 11:
            a.rounds = 5
        return agreement(a)
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
