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

    python3 benchmarks/fio_compare.py --agreement /var/tmp --rounds 10 --max-rounds 40

Each round runs one `blkjobs bench DIR --compare fio --direct --repeat 2
--warmup 1 --output json` per case (randread and seqwrite at 4k and 1M, one
thread unless --threads): after a discarded warm-up each tool runs twice,
once first and once second, so neither always follows the other's writes.
For p50, p90, p99 and p99.9 it prints the ratio blkjobs/fio of the
percentiles of all rounds pooled (every request of every measured run) with
a 95% paired bootstrap interval over the rounds (blkjobs.diskbench.agreement),
beside it the median (min-max) of the rounds' own ratios, and the noise
floor: fio's first measured run of each round against its second, pooled
the same way, and blkjobs' likewise. The verdict per cell
(agreement.cell_verdict): 'agree' when the interval lies within [0.90,
1.10]; for p99 and p99.9 also 'agree (noise)' when it is no wider (high/low)
than fio-against-itself's for that cell; 'differ' when it lies wholly
outside [0.90, 1.10] (a tail too, however narrow); else 'open' (always
below 5 rounds). Then the per-round ratios of MB/s, the bytes that
reached the device (its counters: a neighbour's I/O is in them), the tool's
own block-layer bytes, the CPU time per request (user + sys; fio's
includes its start-up, about 0.1 s a run) and the device's requests per
request (1.00: each request reached the device whole; 2.00: each was split
in two, as a 1 MiB O_DIRECT request from 256 scattered pages is on a
virtio disk: csrc/ioloop.c), and a markdown table of the cells.
--max-rounds goes on, after --rounds, with the cases that still have an
open cell. --save DIR keeps each round's JSON, --load FILE... analyses
saved ones. It exits 1 when a cell differs, or the median ratio of own
bytes is off 1 by more than 10%.

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
PCTS = ("p50", "p90", "p99", "p99.9")
RATIOS = PCTS + ("MB/s", "dev bytes", "own bytes")
#: printed per round and in the medians: device requests per request of the
#: tool (1.00: each went to the device whole; 2.00: each was split in two)
EXTRA = ("cpu us/req", "dev req/req")
CRITERION = ("a cell agrees when its ratio's 95% interval lies within [0.90, 1.10] "
             "('agree'), or, for p99 and p99.9, when it is no wider (high/low) than fio "
             "against itself's for that cell ('agree (noise)'); it differs when the whole "
             "interval lies outside [0.90, 1.10] ('differ', exit 1); otherwise it is "
             "'open' (more rounds narrow it; always below 5 rounds)")


def bench_round(d, workload, bs, size, threads):
    """One `blkjobs bench --compare fio` of one case: its JSON document."""
    argv = [sys.executable, "-m", "blkjobs", "bench", d, "-q", "-w", workload, "-b", bs,
            "--rand-bs", bs, "-j", str(threads), "--size", size, "--direct", "--repeat", "2",
            "--warmup", "1", "--compare", "fio", "--output", "json"]
    p = subprocess.run(argv, capture_output=True, text=True)
    try:
        return json.loads(p.stdout)
    except ValueError:
        sys.exit(f"blkjobs bench failed (exit {p.returncode}): {p.stderr.strip()}")


def rows_of(doc):
    """{case key: {tool: row}} of one bench document; None for a case with
    a failed row (a neighbour filled the disk...): that round goes."""
    out = {}
    for r in doc["results"]:
        c = r["case"]
        key = (c["workload"], c["bs"], c["threads"])
        out.setdefault(key, {})[r["tool"]] = r
    for key, rows in list(out.items()):
        errors = [f"{t}: {r['error']}" for t, r in rows.items() if r["error"]]
        if errors or set(rows) != {"blkjobs", "fio"}:
            sys.stderr.write(f"\n{key}: {'; '.join(errors) or 'no fio row'}: round left out\n")
            out[key] = None
    return out


def run_hists(row):
    """Each measured run's latency histogram, dense (latency.py's buckets)."""
    from blkjobs.native._lib import lib
    n = int(lib.BJ_LAT_BUCKETS)
    out = []
    for run in row["runs"]:
        h = [0] * n
        hist = run["latency"]["histogram"]
        for low, c in zip(hist["bucket_low_ns"], hist["count"], strict=True):
            h[int(lib.bj_lat_bucket(int(low)))] += int(c)
        out.append(h)
    return out


def figures(row):
    lat = row["latency"]["percentiles_ns"]
    runs = row["runs"]
    devs = [r["device"]["read_bytes"] + r["device"]["write_bytes"] for r in runs
            if r["device"]]
    own = [r["block_io"]["read_bytes"] + r["block_io"]["write_bytes"] for r in runs]
    return {"p50": lat["p50"], "p90": lat["p90"], "p99": lat["p99"], "p99.9": lat["p99.9"],
            "MB/s": row["summary"]["median_mb_s"],
            "dev bytes": statistics.mean(devs) if devs else None,
            "own bytes": statistics.mean(own),
            "cpu us/req": statistics.median(r["cpu_s"] / r["ops"] * 1e6 for r in runs),
            "dev req/req": statistics.mean(
                (r["device"]["read_ios"] + r["device"]["write_ios"]) / r["ops"]
                for r in runs if r["device"] and r["ops"]) if devs else None}


def add_doc(per, doc):
    for key, rows in rows_of(doc).items():
        if rows:
            per.setdefault(key, []).append(
                {t: (figures(r), run_hists(r)) for t, r in rows.items()})


def verdicts(rounds, resamples=2000):
    """{percentile: (blkjobs/fio interval, fio#1/fio#2 interval, blkjobs#1/#2
    interval, verdict)} of a case's rounds (agreement.cell_verdict)."""
    from blkjobs.diskbench.agreement import cell_verdict, percentile_ratios
    blk = [r["blkjobs"][1] for r in rounds]
    fio = [r["fio"][1] for r in rounds]
    vs = percentile_ratios(blk, fio, resamples=resamples)
    # the noise floor: fio's first measured run of each round against its
    # second (one ran first and one second), blkjobs' likewise
    ff = percentile_ratios([h[:1] for h in fio], [h[1:2] for h in fio], resamples=resamples)
    bb = percentile_ratios([h[:1] for h in blk], [h[1:2] for h in blk], resamples=resamples)
    return {p: (vs[p], ff[p], bb[p], cell_verdict(p, vs[p], ff[p])) for p in PCTS}


def undecided(rounds):
    """Whether a percentile's verdict is still 'open'."""
    if len(rounds) < 2:
        return True
    return any(v[3] == "open" for v in verdicts(rounds, resamples=500).values())


def collect(a):
    """Run the rounds (or read saved documents): {case: [round]}, a round
    being {tool: (figures, [run histograms])}. After --rounds, a case whose
    interval is still open at some percentile gets more rounds, up to
    --max-rounds."""
    per = {}
    if a.load:
        for f in a.load:
            with open(f) as fh:
                add_doc(per, json.load(fh))
        return per
    threads = [int(t) for t in a.threads.split(",")]
    cases = [(w, bs, size, n) for w, bs, size in AGREEMENT_CASES if f"{w}/{bs}" in a.cases
             for n in threads]
    last = max(a.rounds, a.max_rounds or 0)
    for rnd in range(last):
        for w, bs, size, n in cases:
            key = (w, parse_size(bs), n)
            if rnd >= a.rounds and not undecided(per.get(key, [])):
                continue
            sys.stderr.write(f"\r\x1b[Kround {rnd + 1}/{a.rounds}"
                             f"{f' (up to {last})' if last > a.rounds else ''}: {w} {bs} j{n}")
            doc = bench_round(a.dir, w, bs, size, n)
            if a.save:
                os.makedirs(a.save, exist_ok=True)
                with open(os.path.join(a.save, f"r{rnd + 1}-{w}-{bs}-j{n}.json"), "w") as fh:
                    json.dump(doc, fh)
            add_doc(per, doc)
    sys.stderr.write("\r\x1b[K")
    return per


def agreement(a):
    load0 = os.getloadavg()
    per = collect(a)
    load1 = os.getloadavg()
    src = f"{len(a.load)} saved documents" if a.load else \
        f"{a.dir}, load average {load0[0]:.1f} at the start, {load1[0]:.1f} at the end"
    print(f"blkjobs bench --compare fio, O_DIRECT ({src}; {os.cpu_count()} CPUs); each round: "
          "one warm-up run then two measured runs of each tool, alternating")
    print(f"criterion: {CRITERION}")
    bad = []
    table = []
    for key, rounds in per.items():
        w, bs, n = key
        k = len(rounds)
        if k < 2:
            print(f"\n{w} {bs} j{n}: {k} round: no interval; run more rounds")
            continue
        cells = verdicts(rounds)
        reqs = cells["p50"][0].requests_a, cells["p50"][0].requests_b
        print(f"\n{w} {bs} j{n}: {k} rounds pooled, {reqs[0]:,} requests of blkjobs, "
              f"{reqs[1]:,} of fio; ratio [95% bootstrap interval over the rounds]; per "
              "round: median (min-max) of the rounds' own ratios")
        print(f"  {'':6} {'blkjobs/fio':>20} {'verdict':>13} {'per round':>18}"
              f" {'fio#1/fio#2':>20} {'per round':>18} {'blkjobs#1/#2':>20}")
        row = [f"{w} {_size(bs)}" + (f" j{n}" if n != 1 else "")]
        for p in PCTS:
            ci, ff, bb, v = cells[p]
            per_round = [r["blkjobs"][0][p] / r["fio"][0][p] for r in rounds]
            ff_round = [_pct(r["fio"][1][0], p) / _pct(r["fio"][1][1], p) for r in rounds]
            if v == "differ":
                bad.append(f"{w} {bs} j{n} {p}")
            print(f"  {p:6} {_ci(ci):>20} {v:>13} {_range(per_round):>18} "
                  f"{_ci(ff):>20} {_range(ff_round):>18} {_ci(bb):>20}")
            row.append(f"{_ci(ci, 2)} {v} (fio/fio {_ci(ff, 2)})")
        table.append(row)
        for q in ("MB/s", "dev bytes", "own bytes", "cpu us/req", "dev req/req"):
            vals = [r["blkjobs"][0][q] / r["fio"][0][q] for r in rounds
                    if r["blkjobs"][0][q] and r["fio"][0][q]]
            if q == "own bytes" and vals and abs(statistics.median(vals) - 1) > 0.10:
                bad.append(f"{w} {bs} j{n} own bytes")
            print(f"  {q:10} per round: {_range(vals) if vals else '-'}")
        med = {t: {q: _median(r[t][0][q] for r in rounds) for q in RATIOS + EXTRA}
               for t in ("blkjobs", "fio")}
        print("  medians over the rounds (us; MB/s; MB; CPU us per request, fio's with its "
              "start-up; device requests per request), blkjobs | fio: " + ", ".join(
                  f"{q} {_fmt(q, med['blkjobs'][q])} | {_fmt(q, med['fio'][q])}"
                  for q in RATIOS + EXTRA))
    if table:
        print("\nper cell, blkjobs/fio [95% interval], verdict (fio/fio [its interval]):")
        print("| case | " + " | ".join(PCTS) + " |")
        print("|---|" + "---|" * len(PCTS))
        for row in table:
            print("| " + " | ".join(row) + " |")
    if bad:
        print(f"\nNOT within 10% (the whole interval outside): {', '.join(bad)}")
        return 1
    print("\nno cell differs (no interval wholly outside [0.90, 1.10])")
    return 0


def _pct(hist, p):
    from blkjobs.diskbench.agreement import pooled_percentiles
    return pooled_percentiles([[hist]])[p]


def _ci(ci, digits=3):
    return f"{ci.ratio:.{digits}f} [{ci.low:.2f}-{ci.high:.2f}]"


def _median(values):
    v = [x for x in values if x is not None]
    return statistics.median(v) if v else None


def _size(n):
    return f"{n >> 20}M" if n >= 1 << 20 and n % (1 << 20) == 0 else \
        f"{n >> 10}k" if n % 1024 == 0 else str(n)


def _range(v):
    return f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})"


def _fmt(k, v):
    if v is None:
        return "-"
    if k == "dev req/req":
        return f"{v:.2f}"
    if k.startswith("p"):
        return f"{v / 1000:.1f}"
    if k == "cpu us/req":
        return f"{v:.1f}"
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
    p.add_argument("--max-rounds", type=int, default=0,
                   help="--agreement: after --rounds, go on with the cases whose interval "
                        "is still open at a percentile, up to this many rounds")
    p.add_argument("--save", metavar="DIR", help="--agreement: keep each round's JSON in DIR")
    p.add_argument("--load", nargs="+", metavar="JSON",
                   help="--agreement: analyse saved `bench --compare fio --output json` "
                        "documents instead of running")
    a = p.parse_args()
    if not shutil.which("fio"):
        sys.exit("fio is not installed (Debian: apt install fio)")
    if a.agreement:
        if a.threads == "1,4":
            a.threads = "1"
        if a.rounds == 11:
            a.rounds = 10     # benchmarks/README.md "How many rounds"
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
