#!/usr/bin/env python3
"""Where a copy's threads spend their time: run, wait for a CPU, sleep.

Runs each command under ``perf sched record`` (optionally with the CPU hogs
of benchmarks/convert_raw.py: --load busy or busy-apart), then reads
``perf sched timehist`` for the command's own threads and prints per thread
the time on a CPU (run), runnable but waiting for a CPU (delay: after a
wake-up, or preempted)
and asleep (waiting on a lock or I/O), and for the process the time its
second thread started (the one-thread phase before it: a blkjobs command's
Python start-up and set-up before the copy engine's workers), the average
number of runnable threads: (run + delay) / wall. The scheduler shares a busy
CPU per runnable thread (within one autogroup), so that number is what a
copy asks of a busy host. Rounds alternate the commands; medians reported.

Usage: benchmarks/sched_threads.py [--load busy] [--rounds 3] SRC -- NAME=CMD ...
  e.g. sched_threads.py --load busy /var/tmp/d.raw \\
         'ours=.venv/bin/blkjobs convert {src} {dst}' \\
         'qemu-img -m 16 -W=qemu-img convert -m 16 -W -O raw {src} {dst}'
{src} and {dst} are replaced (dst is SRC.sched-dst, removed after each run).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from convert_raw import Hogs  # noqa: E402

LINE = re.compile(r"^\s*(?P<ts>\d+\.\d+)\s+\[\d+\]\s+(?P<name>.+?)\[(?P<tid>\d+)(?:/(?P<pid>\d+))?\]"
                  r"\s+(?P<wait>[\d.]+)\s+(?P<delay>[\d.]+)\s+(?P<run>[\d.]+)\s*(?P<state>\S*)\s*$")

# states at switch-out that leave a thread runnable: R (running: it yielded, or
# was woken before it was off the CPU) and perf's W for the kernel's
# preempted state (TASK_REPORT_MAX, which the kernel's own trace prints R+)
RUNNABLE = ("R", "R+", "W")


def parse_timehist(text: str, pid: int) -> dict[int, dict]:
    """{tid: {"name", "run", "delay", "sleep" (ms), "n" (times on a CPU),
    "first", "last" (s: its first and last moment on a CPU), "state"}} of
    process pid's threads, from ``perf sched timehist --state`` output. A
    line's wait time is the time since the thread's previous switch-out: it
    counts as delay (with the line's wake-up latency) when the thread left
    the CPU runnable (preempted), else as sleep."""
    out: dict[int, dict] = {}
    for line in text.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        tid = int(m["tid"])
        owner = int(m["pid"]) if m["pid"] else tid
        if owner != pid:
            continue
        t = out.setdefault(tid, {"name": m["name"], "run": 0.0, "delay": 0.0, "sleep": 0.0,
                                 "n": 0, "first": float(m["ts"]) - float(m["run"]) / 1e3,
                                 "state": ""})
        t["run"] += float(m["run"])
        t["name"] = m["name"]
        t["delay"] += float(m["delay"])
        if t["state"] in RUNNABLE:
            t["delay"] += float(m["wait"])
        else:
            t["sleep"] += float(m["wait"])
        t["state"] = m["state"]
        t["n"] += 1
        t["last"] = float(m["ts"])
    return out


def measure(cmd: list[str], data: str) -> int:
    """Run cmd under perf sched record into data; its pid."""
    pidfile = data + ".pid"
    # the command's pid as it runs (a shell that execs it): perf records the
    # whole host, where other processes may have the same name
    p = subprocess.Popen(["perf", "sched", "record", "-q", "-o", data, "--", "sh", "-c",
                          f'echo $$ > {pidfile}; exec "$@"', "sh"] + cmd,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = p.communicate()
    if p.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed: {err.decode().strip()}")
    with open(pidfile) as f:
        pid = int(f.read())
    os.unlink(pidfile)
    return pid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--load", default="busy", help="quiet, busy or busy-apart")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("src")
    ap.add_argument("cmds", nargs="+", metavar="NAME=CMD")
    a = ap.parse_args()
    dst = a.src + ".sched-dst"
    cmds = {}
    for c in a.cmds:
        name, _, line = c.partition("=")
        cmds[name] = [w.format(src=a.src, dst=dst) for w in shlex.split(line)]
    res: dict[str, list[dict]] = {n: [] for n in cmds}
    names = list(cmds)
    hogs = Hogs.for_load(a.load)
    tmp = tempfile.mkdtemp(prefix="sched-", dir="/var/tmp")
    data = os.path.join(tmp, "perf.data")
    try:
        subprocess.run(["cat", a.src], stdout=subprocess.DEVNULL)
        for rnd in range(a.rounds):
            for n in names[rnd % len(names):] + names[:rnd % len(names)]:
                if os.path.exists(dst):
                    os.unlink(dst)
                os.sync()
                # wall: the process's first to last moment on a CPU in the trace
                # (perf's own start and end are not the command's)
                pid = measure(cmds[n], data)
                text = subprocess.run(["perf", "sched", "timehist", "--state", "-i", data],
                                      capture_output=True, text=True).stdout
                threads = parse_timehist(text, pid)
                wall = (max(t["last"] for t in threads.values())
                        - min(t["first"] for t in threads.values()))
                run = sum(t["run"] for t in threads.values())
                delay = sum(t["delay"] for t in threads.values())
                sleep = sum(t["sleep"] for t in threads.values())
                # the one-thread start: from the process's first moment on a CPU
                # to its second thread's (blkjobs: Python's start-up, options,
                # locks and target creation before the copy engine's workers)
                t0 = threads[pid]["first"] if pid in threads else 0.0
                others = [t["first"] for tid, t in threads.items() if tid != pid]
                start = (min(others) - t0) if others and pid in threads else wall
                r = {"wall": wall, "start": start, "run": run / 1e3, "delay": delay / 1e3, "sleep": sleep / 1e3,
                     "threads": len(threads), "runnable": (run + delay) / 1e3 / wall,
                     "per_thread": sorted(threads.values(), key=lambda t: -t["run"])}
                res[n].append(r)
                print(f"  round {rnd} {n:22s} wall {wall:6.3f} s  2nd thread at {start:6.3f}  run {r['run']:6.3f}  "
                      f"delay {r['delay']:6.3f}  sleep {r['sleep']:7.3f}  threads "
                      f"{r['threads']:3d}  runnable {r['runnable']:.2f}", file=sys.stderr)
    finally:
        if hogs:
            hogs.close()
        if os.path.exists(dst):
            os.unlink(dst)
        for f in os.listdir(tmp):
            os.unlink(os.path.join(tmp, f))
        os.rmdir(tmp)
    print(f"{a.load}, {a.rounds} rounds (median; s): wall, the second thread's start (the "
          "one-thread phase before it), on CPU, waiting for a CPU, asleep, threads, average "
          "runnable threads = (run + delay) / wall")
    for n in names:
        rs = res[n]
        med = {k: statistics.median(r[k] for r in rs) for k in
               ("wall", "start", "run", "delay", "sleep", "threads", "runnable")}
        print(f"  {n:22s} wall {med['wall']:6.3f}  2nd thread at {med['start']:6.3f}  run {med['run']:6.3f}  delay "
              f"{med['delay']:6.3f}  sleep {med['sleep']:7.3f}  threads {med['threads']:3.0f}"
              f"  runnable {med['runnable']:.2f}")
        last = rs[-1]["per_thread"]
        for t in last[:6]:
            print(f"      {t['name']:16s} run {t['run']:8.1f} ms  delay {t['delay']:8.1f}  "
                  f"sleep {t['sleep']:8.1f}  switches {t['n']}")


if __name__ == "__main__":
    main()
