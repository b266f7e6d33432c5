#!/usr/bin/env python3
"""Start-up CPU of the common commands on 1 MiB images, against another
checkout of blkjobs and qemu-img: ``perf stat -r REPEAT -e task-clock`` (CPU
milliseconds per run; the load moves it much less than the wall clock).

ROUNDS rounds; in each, every command's contenders run once each (a
``perf stat -r REPEAT``), in an order rotated per round. Prints per command
the median over the rounds of each contender's mean task-clock [and the
least of them], and the median of the per-round ratios before / ours; and
the interpreter's own start-up (``python -c pass``, ``python -S -c pass``)
measured in the same rounds.

    benchmarks/startup.py [--rounds 5] [--repeat 30] [--before SRC] [--only convert-raw-qcow2,...]
                          [--importtime N] [--instructions] [--first-thread] [--imports]

``--instructions``: instead, the instructions each command executes
(``valgrind --tool=callgrind``, one run each: the same count whatever the
load; millions).

``--first-thread``: instead, with ``--instructions``' callgrind, the
instructions executed before the process's first ``pthread_create``
(``--dump-before``): for a blkjobs convert, the start of the copy engine's
workers (the copy starts as they are made), i.e. the one-thread phase a
busy host gives part of a core; and the total. (qemu-img's first thread is
its RCU thread, made before main(): not comparable, so not run.)

``--imports``: instead, where one run's instructions go, module by module:
callgrind with a hook on ``importlib._bootstrap._find_and_load`` that dumps
the counters (``CALLGRIND_DUMP_STATS_AT``, from a small C helper built with
gcc and valgrind's ``callgrind.h``, loaded with ctypes) as each import
starts and ends; prints how many modules of ours and of others were
imported and their own millions summed, each module's inclusive and own
millions (>= 0.3 inclusive, as a tree) and the work between the top-level
imports (the hook adds ~7 M of its own, mostly ctypes: compare rows, not
totals).

``--importtime N``: instead, ``python -X importtime`` of each command N
times per checkout: the modules imported and the sum over them of the
least self time seen (importtime's own overhead included).

``--before SRC``: a ``src`` directory of another checkout (with its built
``_core``/``_nbd`` modules), run with this interpreter through PYTHONPATH;
ours runs with PYTHONPATH set to this checkout's ``src`` the same way (or
``--ours SRC``: a copy that does not change while the benchmark runs, e.g.
``git archive HEAD src``). Compile both first (``python -m compileall``):
with PYTHONDONTWRITEBYTECODE set, a stale ``.pyc`` is compiled again at
every run.
The images (1 MiB raw with data and a hole; the same as qcow2; a 3-deep
qcow2 chain; a qemu-nbd export of the qcow2 over a Unix socket) are made
in a temporary directory under /var/tmp and removed at the end.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")

#: name -> the arguments, the same for blkjobs and qemu-img (a convert overwrites its target)
COMMANDS = {
    "version": ["--version"],
    "convert-raw-raw": ["convert", "-O", "raw", "{d}/a.raw", "{d}/o.raw"],
    "convert-raw-qcow2": ["convert", "-O", "qcow2", "{d}/a.raw", "{d}/o.qcow2"],
    "convert-qcow2-raw": ["convert", "-O", "raw", "{d}/a.qcow2", "{d}/o.raw"],
    "convert-chain-qcow2": ["convert", "-O", "qcow2", "{d}/top.qcow2", "{d}/o.qcow2"],
    "convert-nbd-raw": ["convert", "-O", "raw", "nbd+unix:///?socket={d}/nbd.sock",
                         "{d}/o.raw"],
    "info": ["info", "{d}/a.qcow2"],
    "info-json": ["info", "--output", "json", "{d}/a.qcow2"],
    "map": ["map", "--output", "json", "{d}/top.qcow2"],
    "check": ["check", "{d}/a.qcow2"],
    "compare": ["compare", "{d}/a.qcow2", "{d}/b.qcow2"],
}


def make_images(d: str) -> None:
    def run(*a: str) -> None:
        subprocess.run(a, check=True, stdout=subprocess.DEVNULL)
    with open(f"{d}/a.raw", "wb") as f:
        f.truncate(1 << 20)
        f.write(b"\1" * 65536)
        f.seek(512 * 1024)
        f.write(os.urandom(131072))
    run("qemu-img", "convert", "-O", "qcow2", f"{d}/a.raw", f"{d}/a.qcow2")
    shutil.copy(f"{d}/a.qcow2", f"{d}/b.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", f"{d}/base.qcow2", "1M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 256k", f"{d}/base.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", f"{d}/base.qcow2", "-F", "qcow2",
        f"{d}/mid.qcow2")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 2 256k 256k", f"{d}/mid.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", f"{d}/mid.qcow2", "-F", "qcow2",
        f"{d}/top.qcow2")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 3 768k 128k", f"{d}/top.qcow2")


def task_clock(argv: list[str], env: dict[str, str], repeat: int) -> float:
    """Mean task-clock (ms) of ``repeat`` runs, as perf stat reports it."""
    p = subprocess.run(["perf", "stat", "-x,", "-r", str(repeat), "-e", "task-clock", "--",
                        *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True)
    if p.returncode not in (0, 1):      # compare/check of a clean pair exit 0
        raise SystemExit(f"{argv} failed: {p.stderr.strip()}")
    for line in p.stderr.splitlines():
        f = line.split(",")
        if len(f) > 2 and f[2].startswith("task-clock"):
            return float(f[0])
    raise SystemExit(f"no task-clock in perf's output for {argv}: {p.stderr.strip()}")


def instructions(argv: list[str], env: dict[str, str]) -> float:
    """Millions of instructions one run executes (callgrind's total Ir)."""
    with tempfile.NamedTemporaryFile(prefix="startup-cg-", dir="/var/tmp") as out:
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out.name}",
                        *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for line in open(out.name):
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1]) / 1e6
    raise SystemExit(f"no callgrind totals for {argv}")


def first_thread(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(millions of instructions before the first pthread_create, total):
    callgrind dumps its counters as the function is entered; the first dump
    holds what ran before it."""
    d = tempfile.mkdtemp(prefix="startup-cg-", dir="/var/tmp")
    try:
        out = os.path.join(d, "cg")
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                        "--dump-before=pthread_create*", *argv], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        parts = {}
        for name in os.listdir(d):
            for line in open(os.path.join(d, name)):
                if line.startswith("totals:"):
                    parts[name] = int(line.split()[1]) / 1e6
        if not parts:
            raise SystemExit(f"no callgrind totals for {argv}")
        before = parts.get("cg.1", parts["cg"])      # no thread made: the whole run
        return before, sum(parts.values())
    finally:
        shutil.rmtree(d)


_CG_HELPER = """#include <valgrind/callgrind.h>
void cg_dump(const char *s) { CALLGRIND_DUMP_STATS_AT(s); }
"""

_HOOK = """
import sys, ctypes, _frozen_importlib as B
dump = ctypes.CDLL(sys.argv.pop(1)).cg_dump
dump.argtypes = [ctypes.c_char_p]
find_and_load = B._find_and_load
def hooked(name, import_):
    dump(b"enter " + name.encode())
    try:
        return find_and_load(name, import_)
    finally:
        dump(b"exit " + name.encode())
B._find_and_load = hooked
sys.argv[0] = "blkjobs"
dump(b"start")
import blkjobs.cli.main as m
run = getattr(m, "run", None)
run() if run else sys.exit(m.main())
"""


def imports(argv: list[str], env: dict[str, str], work: str) -> list[str]:
    """The lines of :func:`main`'s ``--imports`` report for one command."""
    lib = os.path.join(work, "libcgmark.so")
    if not os.path.exists(lib):
        src = os.path.join(work, "cgmark.c")
        with open(src, "w") as f:
            f.write(_CG_HELPER)
        p = subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", lib, src],
                           capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"cannot build the callgrind helper (gcc, valgrind's "
                             f"callgrind.h): {p.stderr.strip()}")
    out = tempfile.mkdtemp(prefix="cg-", dir=work)
    subprocess.run(["valgrind", "--tool=callgrind", "--dump-instr=no",
                    f"--callgrind-out-file={out}/cg.out", argv[0], "-c", _HOOK, lib, *argv[3:]],
                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = []
    for name in os.listdir(out):
        part, trig, tot = 0, "", 0
        with open(os.path.join(out, name)) as f:
            for line in f:
                if line.startswith("part:"):
                    part = int(line.split()[1])
                elif line.startswith("desc: Trigger:"):
                    trig = line.split(":", 2)[2].strip()
                elif line.startswith(("summary:", "totals:")):
                    tot = int(line.split()[1])
                    break
        parts.append((part, trig, tot))
    shutil.rmtree(out)
    parts.sort()
    stack: list[int] = []
    rows: list[list] = []         # [name, depth, inclusive, own]
    between: list[str] = []
    for _, trig, tot in parts:
        # a part's cost ran before its trigger: inside the modules on the stack
        if stack:
            rows[stack[-1]][3] += tot
        for i in stack:
            rows[i][2] += tot
        if not stack and tot >= 200_000:
            last = rows[-1][0] if rows else "(interpreter start)"
            between.append(f"between imports, after {last}: {tot / 1e6:.2f}")
        what, _, mod = trig.partition("Client Request: ")[2].partition(" ")
        if what == "enter":
            stack.append(len(rows))
            rows.append([mod, len(stack) - 1, 0, 0])
        elif what == "exit" and stack:
            stack.pop()
    total = sum(t for _, _, t in parts)
    ours = [r for r in rows if r[0].split(".")[0] == "blkjobs"]
    others = [r for r in rows if r[0].split(".")[0] != "blkjobs"]
    lines = [f"total {total / 1e6:.1f} M (hook included); {len(ours)} modules of ours, "
             f"{sum(r[3] for r in ours) / 1e6:.1f} M own; {len(others)} others "
             f"({', '.join(sorted(r[0] for r in others))}), {sum(r[3] for r in others) / 1e6:.1f} M "
             "own; inclusive, own:"]
    lines += [f"{inc / 1e6:7.2f} {own / 1e6:6.2f}  {'  ' * d}{n}"
              for n, d, inc, own in rows if inc >= 300_000]
    return lines + between


def importtime(argv: list[str], env: dict[str, str], n: int) -> tuple[int, float]:
    """(modules imported, ms: the sum of each module's least self time of n runs)."""
    least: dict[str, int] = {}
    for _ in range(n):
        p = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for line in p.stderr.splitlines():
            if line.startswith("import time:") and "self [us]" not in line:
                us, _, name = line[len("import time:"):].split("|")
                key = name.strip()
                least[key] = min(least.get(key, 1 << 60), int(us))
    return len(least), sum(least.values()) / 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--before", help="src directory of the checkout to compare with")
    ap.add_argument("--ours", default=SRC, help="src directory of ours (default: this one)")
    ap.add_argument("--only", help="comma-separated command names: " + ", ".join(COMMANDS))
    ap.add_argument("--importtime", type=int, metavar="N",
                    help="python -X importtime of each command N times instead")
    ap.add_argument("--instructions", action="store_true",
                    help="instructions of one run of each (callgrind) instead")
    ap.add_argument("--first-thread", action="store_true",
                    help="instructions before the first thread is made, and in all (callgrind)")
    ap.add_argument("--imports", action="store_true",
                    help="one run's instructions module by module (callgrind) instead")
    a = ap.parse_args()
    names = a.only.split(",") if a.only else list(COMMANDS)
    py = sys.executable
    cons: dict[str, tuple[list[str], dict[str, str]]] = {}
    ours = dict(os.environ, PYTHONPATH=a.ours)
    # the console script's entry: run() (main() and the quick exit) where the
    # checkout has it, else main()
    cons["ours"] = ([py, "-c", "import sys; import blkjobs.cli.main as m; sys.argv[0] = 'blkjobs'; "
                     "run = getattr(m, 'run', None); run() if run else sys.exit(m.main())"], ours)
    if a.before:
        cons["before"] = (cons["ours"][0], dict(os.environ, PYTHONPATH=a.before))
    cons["qemu-img"] = (["qemu-img"], dict(os.environ))
    # a SIGTERM unwinds too: qemu-nbd stopped, the images removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    d = tempfile.mkdtemp(prefix="startup-", dir="/var/tmp")
    nbd = None
    try:
        make_images(d)
        nbd = subprocess.Popen(["qemu-nbd", "-t", "-r", "-f", "qcow2", "-k", f"{d}/nbd.sock",
                                f"{d}/a.qcow2"], stdout=subprocess.DEVNULL)
        while not os.path.exists(f"{d}/nbd.sock"):
            if nbd.poll() is not None:
                raise SystemExit("qemu-nbd failed")
            os.sched_yield()
        if a.imports:
            for n in names:
                for c, (pre, env) in cons.items():
                    if c == "qemu-img":
                        continue
                    print(f"== {n}, {c}")
                    print("\n".join(imports(pre + [x.format(d=d) for x in COMMANDS[n]], env, d)))
            return
        def ours_table(title, cell):
            """A table of ``cell(argv, env)`` per command and our contender."""
            print(title)
            hdr = ["command"] + [c for c in cons if c != "qemu-img"]
            print("| " + " | ".join(hdr) + " |")
            print("|" + "---|" * len(hdr))
            for n in names:
                row = [n]
                for c in hdr[1:]:
                    pre, env = cons[c]
                    row.append(cell(pre + [x.format(d=d) for x in COMMANDS[n]], env))
                print("| " + " | ".join(row) + " |")

        if a.importtime:
            def it_cell(argv, env):
                mods, ms = importtime(argv, env, a.importtime)
                return f"{mods}, {ms:.1f}"
            ours_table(f"python -X importtime, {a.importtime} runs: modules, sum of least self ms",
                       it_cell)
            return
        if a.first_thread:
            def ft_cell(argv, env):
                b, t = first_thread(argv, env)
                return f"{b:.1f} / {t:.1f}"
            ours_table("instructions before the first thread / in all, millions (callgrind)",
                       ft_cell)
            return
        if a.instructions:
            print("instructions of one run, millions (valgrind --tool=callgrind)")
            hdr = ["command", *cons] + (["before/ours"] if a.before else [])
            print("| " + " | ".join(hdr) + " |")
            print("|" + "---|" * len(hdr))
            cl_ = {c: 0.0 for c in cons}
            for n in names:
                for c, (pre, env) in cons.items():
                    cl_[c] = instructions(pre + [x.format(d=d) for x in COMMANDS[n]], env)
                row = [n] + [f"{cl_[c]:.1f}" for c in cons]
                if a.before:
                    row.append(f"{cl_['before'] / cl_['ours']:.2f}")
                print("| " + " | ".join(row) + " |")
            for b, argv in (("python -c pass", [py, "-c", "pass"]),
                            ("python -S -c pass", [py, "-S", "-c", "pass"])):
                print(f"| {b} | {instructions(argv, dict(os.environ)):.1f} |"
                      + " |" * (len(hdr) - 2))
            return
        res: dict[tuple[str, str], list[float]] = {(n, c): [] for n in names for c in cons}
        bare = {"python -c pass": [py, "-c", "pass"], "python -S -c pass": [py, "-S", "-c", "pass"]}
        bare_res: dict[str, list[float]] = {b: [] for b in bare}
        la0 = os.getloadavg()[0]
        for r in range(a.rounds):
            for n in names:
                args = COMMANDS[n]
                cl = list(cons)
                cl = cl[r % len(cl):] + cl[:r % len(cl)]
                for c in cl:
                    pre, env = cons[c]
                    argv = pre + [x.format(d=d) for x in args]
                    res[n, c].append(task_clock(argv, env, a.repeat))
            for b, argv in bare.items():
                bare_res[b].append(task_clock(argv, dict(os.environ), a.repeat))
        print(f"task-clock ms, median of {a.rounds} rounds of perf stat -r {a.repeat}; "
              f"load {la0:.1f} -> {os.getloadavg()[0]:.1f}")
        hdr = ["command"] + list(cons) + (["before/ours"] if a.before else [])
        print("| " + " | ".join(hdr) + " |")
        print("|" + "---|" * len(hdr))
        for n in names:
            row = [n] + [f"{statistics.median(res[n, c]):.1f} [{min(res[n, c]):.1f}]"
                         for c in cons]
            if a.before:
                ratios = [b / o for b, o in zip(res[n, "before"], res[n, "ours"], strict=True)]
                row.append(f"{statistics.median(ratios):.2f}")
            print("| " + " | ".join(row) + " |")
        for b, v in bare_res.items():
            print(f"| {b} | {statistics.median(v):.1f} [{min(v):.1f}] |" + " |" * (len(hdr) - 2))
    finally:
        if nbd is not None:
            nbd.terminate()
            nbd.wait()
        shutil.rmtree(d)


if __name__ == "__main__":
    main()
