#!/usr/bin/env python3
"""Our NBD export against qemu-nbd: nbdcopy reads the same image from
``blkjobs serve --export`` and from ``qemu-nbd -r``, to ``null:`` (the
server's read path and the protocol, no target disk) and to a file.

Method: both servers run for the whole benchmark, each serving the image
read-only on a UNIX socket. Per (image, target): one warm-up round, then
ROUNDS rounds; in each round both contenders run once, the order
alternating per round, so drift hits both alike. The image stays in the
page cache (read once with cat before the rounds). We report per contender
the median and min wall time and MB/s of virtual size, and the MEDIAN OF
THE PER-ROUND RATIOS qemu-nbd time / blkjobs time (> 1: blkjobs is faster)
with their min-max, and the median CPU time each server used per run
and per GiB of virtual size (user + system, from /proc: less sensitive to
the machine's load than the wall time).

``BLKJOBS_NBD_C=0`` in the environment serves every request of the
blkjobs export on the Python path (before the C data path) for an A/B run.

Images: ``dense`` (random bytes, all data), ``vm`` (data, written
zeroes and holes; nbdcopy skips what block status says is a hole) and
``sparse`` (5 % data in 64 KiB pieces, the rest holes), each as ``raw``
and as ``qcow2`` (``--format``: qemu-img convert of the raw image, 64 KiB
clusters; both servers serve the same file).

``--qemu-nbd-shared N``: qemu-nbd runs with ``-e N``; with N > 1 it
advertises multi-conn (``qemu-nbd -r`` alone does not: nbdcopy then opens
one connection to it and several to our export, which does), so both
serve nbdcopy the same number of connections.

``--busy``: two CPU hogs (busy-looping processes) run through every round,
both contenders alike.

``--baseline BLKJOBS``: a third contender, another build's ``blkjobs``
(e.g. main's ``.venv/bin/blkjobs``) serving the same image: a before/after
in one run, alternated with the others.

Server CPU: /proc counts it in 10 ms ticks, so on the small images (tens of
ms a run) the per-run median is one or two ticks; the mean over the rounds
(total / rounds) is printed too.

``--sessions N``: the per-session cost instead of the copy: in each round
each server gets N ``nbdinfo`` sessions, then N ``nbdcopy URI null:``
sessions of the image (``--size 1M``: the handshake, the option haggling,
setting up and tearing down the connection weigh most); the server's CPU
and the wall time per session, medians over the rounds, and the per-round
ratios against qemu-nbd (and the baseline's).

Usage: benchmarks/nbd_export.py [--size 512M] [--rounds 5] [--image dense,vm,sparse]
       [--format raw,qcow2] [--target null,file] [--connections N] [--busy] [--python-path]
       [--baseline BLKJOBS] [--qemu-nbd-shared N] [--sessions N] [--proc-cpu]
       [--dir DIR] [--json FILE]
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


def fresh_bytecode() -> None:
    """Compile our package's .pyc files now: with PYTHONDONTWRITEBYTECODE=1
    (set on the shared machine) an edited tree is compiled from source by
    every process, which weighed a 1 MiB NBD convert 35 % more
    (benchmarks/README.md, "Issue 14 remainders"). A --baseline tree needs
    them fresh too (``python -m compileall``)."""
    import compileall
    compileall.compile_dir(os.path.join(HERE, "..", "src", "blkjobs"), quiet=1)
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from blkjobs.imageops.vmimage import make_vm_image  # noqa: E402
from blkjobs.units import parse_size  # noqa: E402

BLKJOBS = os.path.join(os.path.dirname(sys.executable), "blkjobs")


def make_dense(path: str, size: int, seed: int = 1) -> None:
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        for off in range(0, size, 1 << 20):
            f.write(rnd.randbytes(min(1 << 20, size - off)))


def make_sparse(path: str, size: int, seed: int = 3) -> None:
    """5 % of the image random data in 64 KiB pieces, the rest holes."""
    rnd = random.Random(seed)
    piece = 64 << 10
    with open(path, "wb") as f:
        f.truncate(size)
        for k in range(size // piece):
            if rnd.random() < 0.05:
                f.seek(k * piece)
                f.write(rnd.randbytes(piece))


def wait_for(path: str, proc: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"nbd_export.py: {what} did not start")
        time.sleep(0.02)


class Servers:
    """qemu-nbd and blkjobs serving ``image`` read-only, until close()."""

    def __init__(self, d: str, image: str, fmt: str = "raw", python_path: bool = False,
                 baseline: str | None = None, shared: int = 0):
        self.procs: list[subprocess.Popen[str]] = []
        q, b = os.path.join(d, "qemu-nbd.sock"), os.path.join(d, "blkjobs-nbd.sock")
        # (-e N, N > 1: qemu-nbd advertises multi-conn, as our export does;
        # without it nbdcopy opens one connection to qemu-nbd, several to ours)
        p = subprocess.Popen(["qemu-nbd", "-t", "-r", "-f", fmt, f"--socket={q}", "-x", "disk",
                              *(["-e", str(shared)] if shared else []), image],
                             stderr=subprocess.DEVNULL, text=True)
        self.procs.append(p)
        wait_for(q, p, "qemu-nbd")
        p = subprocess.Popen([BLKJOBS, "serve", "--socket", os.path.join(d, "qmp.sock"),
                              "--export", f"disk={image}", "--nbd-socket", b, "--print-ready"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.procs.append(p)
        if not p.stdout or not p.stdout.readline():
            raise SystemExit("nbd_export.py: blkjobs serve did not start")
        self.uris = {"blkjobs export": f"nbd+unix:///disk?socket={b}",
                     "qemu-nbd": f"nbd+unix:///disk?socket={q}"}
        self.pids = {"qemu-nbd": self.procs[0].pid, "blkjobs export": self.procs[1].pid}
        if python_path:         # a third contender: the export without its C data path
            pb = os.path.join(d, "blkjobs-py.sock")
            p = subprocess.Popen([BLKJOBS, "serve", "--socket", os.path.join(d, "qmp-py.sock"),
                                  "--export", f"disk={image}", "--nbd-socket", pb,
                                  "--print-ready"], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True,
                                 env={**os.environ, "BLKJOBS_NBD_C": "0"})
            self.procs.append(p)
            if not p.stdout or not p.stdout.readline():
                raise SystemExit("nbd_export.py: blkjobs serve did not start")
            self.uris["blkjobs (Python)"] = f"nbd+unix:///disk?socket={pb}"
            self.pids["blkjobs (Python)"] = p.pid
        if baseline:            # another build of blkjobs (before/after)
            pb = os.path.join(d, "blkjobs-base.sock")
            p = subprocess.Popen([baseline, "serve", "--socket", os.path.join(d, "qmp-base.sock"),
                                  "--export", f"disk={image}", "--nbd-socket", pb,
                                  "--print-ready"], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True)
            self.procs.append(p)
            if not p.stdout or not p.stdout.readline():
                raise SystemExit("nbd_export.py: the baseline blkjobs serve did not start")
            self.uris["baseline"] = f"nbd+unix:///disk?socket={pb}"
            self.pids["baseline"] = p.pid

    def cpu(self, name: str) -> float:
        """CPU seconds (user + system) the server used so far."""
        with open(f"/proc/{self.pids[name]}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def one(uri: str, target: str, out: str, conns: int) -> float:
    dst = "null:" if target == "null" else out
    t0 = time.perf_counter()
    subprocess.run(["nbdcopy", "-C", str(conns), uri, dst], check=True)
    t = time.perf_counter() - t0
    if target == "file":
        os.unlink(out)
    return t


def bench(servers: Servers, target: str, out: str, rounds: int, conns: int) -> dict:
    names = list(servers.uris)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds + 1):          # round 0: warm-up
        order = names[r % len(names):] + names[:r % len(names)]   # rotated
        got, used = {}, {}
        for n in order:
            c0 = servers.cpu(n)
            got[n] = one(servers.uris[n], target, out, conns)
            used[n] = servers.cpu(n) - c0
        if r:
            for n in names:
                times[n].append(got[n])
                cpu[n].append(used[n])
    ratios = [q / b for q, b in zip(times["qemu-nbd"], times["blkjobs export"], strict=True)]
    return {"times": times, "cpu": cpu, "ratios": ratios}


#: the short sessions of --sessions: what one client session runs
SESSIONS = {"nbdinfo": lambda u: ["nbdinfo", u],
            "nbdcopy": lambda u: ["nbdcopy", u, "null:"]}


def _perf_ok() -> bool:
    """``perf stat -p`` works here (the server's task-clock in ns; /proc
    counts 10 ms ticks, too coarse for sessions of a fraction of a ms)."""
    if not shutil.which("perf"):
        return False
    p = subprocess.run(["perf", "stat", "-e", "task-clock", "-x,", "-p", str(os.getpid()),
                        "--", "true"], capture_output=True, text=True)
    return p.returncode == 0 and "task-clock" in p.stderr


def sessions_cpu(servers: Servers, m: str, cmd: list[str], n: int, perf: bool,
                 d: str) -> tuple[float, float]:
    """``n`` sessions ``cmd`` against server ``m``: (server CPU, wall) in
    seconds per session. With perf: ``perf stat -p`` counts the server's
    task-clock (its threads born meanwhile too) while a shell runs them."""
    if not perf:
        c0, t0 = servers.cpu(m), time.perf_counter()
        for _ in range(n):
            subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
        return (servers.cpu(m) - c0) / n, (time.perf_counter() - t0) / n
    out = os.path.join(d, "perf.csv")
    loop = f"i=0; while [ $i -lt {n} ]; do \"$@\" >/dev/null || exit 1; i=$((i+1)); done"
    t0 = time.perf_counter()
    subprocess.run(["perf", "stat", "-e", "task-clock", "-x,", "-o", out,
                    "-p", str(servers.pids[m]), "--", "sh", "-c", loop, "sh", *cmd],
                   check=True)
    wall = (time.perf_counter() - t0) / n
    with open(out) as f:
        ms = next(float(ln.split(",")[0]) for ln in f if "task-clock" in ln)
    os.unlink(out)
    return ms / 1000 / n, wall


def session_bench(servers: Servers, rounds: int, n: int, d: str, use_perf: bool = True) -> dict:
    """Per round and contender (order rotated per round): ``n`` sessions of
    each kind back to back; the server's CPU and the wall time per session
    (:func:`sessions_cpu`)."""
    names = list(servers.uris)
    perf = use_perf and _perf_ok()
    out: dict = {k: {"cpu": {m: [] for m in names}, "wall": {m: [] for m in names}}
                 for k in SESSIONS}
    out["cpu_from"] = "perf stat -p (task-clock)" if perf else "/proc ticks"
    for r in range(rounds + 1):          # round 0: warm-up
        order = names[r % len(names):] + names[:r % len(names)]
        for kind, argv in SESSIONS.items():
            for m in order:
                cpu, wall = sessions_cpu(servers, m, argv(servers.uris[m]), n, perf, d)
                if r:
                    out[kind]["cpu"][m].append(cpu)
                    out[kind]["wall"][m].append(wall)
    return out


def run_sessions(a: argparse.Namespace, d: str, image: str, label: str, fmt: str) -> dict:
    subprocess.run(["cat", image], stdout=subprocess.DEVNULL, check=True)
    servers = Servers(d, image, fmt, a.python_path, a.baseline, a.qemu_nbd_shared)
    try:
        res = session_bench(servers, a.rounds, a.sessions, d, not a.proc_cpu)
    finally:
        servers.close()
    load = os.getloadavg()[0]
    print(f"\n{label} image, {a.size}: {a.sessions} sessions a round and contender, "
          f"{a.rounds} rounds, server CPU from {res['cpu_from']}, load average {load:.1f}")
    for kind in SESSIONS:
        r = res[kind]
        print(f"  {kind}:")
        for m in r["cpu"]:
            print(f"    {m:15s} server CPU {1000 * statistics.median(r['cpu'][m]):6.3f} ms"
                  f"/session  wall {1000 * statistics.median(r['wall'][m]):6.2f} ms/session")
        for m in r["cpu"]:
            if m == "qemu-nbd":
                continue
            cr = [x / q for x, q in zip(r["cpu"][m], r["cpu"]["qemu-nbd"], strict=True)]
            wr = [x / q for x, q in zip(r["wall"][m], r["wall"]["qemu-nbd"], strict=True)]
            print(f"    {m} / qemu-nbd: CPU median {statistics.median(cr):.2f} "
                  f"(min {min(cr):.2f}, max {max(cr):.2f}), wall median "
                  f"{statistics.median(wr):.2f} (min {min(wr):.2f}, max {max(wr):.2f})")
        if "baseline" in r["cpu"]:
            cr = [x / b for x, b in zip(r["cpu"]["blkjobs export"], r["cpu"]["baseline"],
                                        strict=True)]
            print(f"    blkjobs export / baseline: CPU median {statistics.median(cr):.2f} "
                  f"(min {min(cr):.2f}, max {max(cr):.2f})", flush=True)
    return {"image": label, "sessions": a.sessions, **res}


def run_image(a: argparse.Namespace, d: str, image: str, label: str, fmt: str,
              size: int) -> list[dict]:
    if a.sessions:
        return [run_sessions(a, d, image, label, fmt)]
    subprocess.run(["cat", image], stdout=subprocess.DEVNULL, check=True)
    servers = Servers(d, image, fmt, a.python_path, a.baseline, a.qemu_nbd_shared)
    report = []
    try:
        for target in a.target.split(","):
            res = bench(servers, target, os.path.join(d, "out.raw"), a.rounds, a.connections)
            report.append({"image": label, "target": target, **res})
            load = os.getloadavg()[0]
            print(f"\n{label} image, {a.size}, nbdcopy -C {a.connections} -> {target}"
                  f"{f' (qemu-nbd -e {a.qemu_nbd_shared})' if a.qemu_nbd_shared else ''}"
                  f"{' (busy: 2 hogs)' if a.busy else ''}, load average {load:.1f}")
            for n, ts in res["times"].items():
                med = statistics.median(ts)
                cpu = statistics.median(res["cpu"][n])
                mean = sum(res["cpu"][n]) / len(res["cpu"][n])
                print(f"  {n:15s} median {med:7.3f} s  min {min(ts):7.3f} s  "
                      f"{size / med / 1e6:8.1f} MB/s  server CPU "
                      f"{cpu:6.2f} s ({cpu * (1 << 30) / size:5.2f} s/GiB; mean "
                      f"{mean * (1 << 30) / size:5.3f} s/GiB)")
            rs = res["ratios"]
            print(f"  qemu-nbd / blkjobs: median {statistics.median(rs):.2f} "
                  f"(min {min(rs):.2f}, max {max(rs):.2f}; > 1: blkjobs faster)", flush=True)
            if "baseline" in res["times"]:
                br = [q / b for q, b in zip(res["times"]["qemu-nbd"],
                                            res["times"]["baseline"], strict=True)]
                print(f"  qemu-nbd / baseline: median {statistics.median(br):.2f} "
                      f"(min {min(br):.2f}, max {max(br):.2f})", flush=True)
                ob = [b / o for b, o in zip(res["times"]["baseline"],
                                            res["times"]["blkjobs export"], strict=True)]
                print(f"  baseline / blkjobs: median {statistics.median(ob):.2f} "
                      f"(min {min(ob):.2f}, max {max(ob):.2f}; > 1: this build faster)",
                      flush=True)
            if "blkjobs (Python)" in res["times"]:
                pr = [p / b for p, b in zip(res["times"]["blkjobs (Python)"],
                                            res["times"]["blkjobs export"], strict=True)]
                print(f"  Python path / C path: median {statistics.median(pr):.2f} "
                      f"(min {min(pr):.2f}, max {max(pr):.2f})", flush=True)
    finally:
        servers.close()
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="512M")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--image", default="dense,vm,sparse")
    ap.add_argument("--format", default="raw,qcow2")
    ap.add_argument("--busy", action="store_true", help="two CPU hogs meanwhile")
    ap.add_argument("--target", default="null,file")
    ap.add_argument("--connections", type=int, default=4, help="nbdcopy -C (multi-conn)")
    ap.add_argument("--python-path", action="store_true",
                    help="a third contender: our export with BLKJOBS_NBD_C=0")
    ap.add_argument("--baseline", default=None, metavar="BLKJOBS",
                    help="a third contender: another build's blkjobs executable")
    ap.add_argument("--sessions", type=int, default=0, metavar="N",
                    help="short sessions instead of copies: per round N nbdinfo and N "
                         "nbdcopy -> null: of the image (use --size 1M)")
    ap.add_argument("--qemu-nbd-shared", type=int, default=0, metavar="N",
                    help="qemu-nbd -e N: with N > 1 it advertises multi-conn as our export "
                         "does, and nbdcopy -C opens as many connections to both (without "
                         "it, one to qemu-nbd)")
    ap.add_argument("--proc-cpu", action="store_true",
                    help="--sessions: the server's CPU from /proc (10 ms ticks: use 200 "
                         "sessions or more), not perf stat -p, whose count taxes every "
                         "thread the server starts")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    fresh_bytecode()
    if a.rounds < 5:
        ap.error("--rounds: at least 5 (the method needs a median)")
    for t in ("qemu-nbd", "nbdcopy"):
        if not shutil.which(t):
            raise SystemExit(f"nbd_export.py: {t} is not installed")
    size = parse_size(a.size)
    if a.dir is not None and not os.path.isdir(a.dir):
        raise SystemExit(f"nbd_export.py: --dir {a.dir}: no such directory")
    d = tempfile.mkdtemp(prefix="nbd-export-bench.", dir=a.dir)
    report: list[dict] = []
    hogs = None
    if a.busy:
        sys.path.insert(0, HERE)
        from convert_raw import Hogs
        hogs = Hogs(2)
    try:
        for kind in a.image.split(","):
            raw = os.path.join(d, f"{kind}.raw")
            if kind == "dense":
                make_dense(raw, size)
            elif kind == "sparse":
                make_sparse(raw, size)
            else:
                make_vm_image(raw, size)
            for fmt in a.format.split(","):
                image = raw
                if fmt == "qcow2":
                    image = os.path.join(d, f"{kind}.qcow2")
                    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw,
                                    image], check=True)
                report += run_image(a, d, image, f"{kind} {fmt}", fmt, size)
                if image != raw:
                    os.unlink(image)
            os.unlink(raw)
    finally:
        if hogs:
            hogs.close()
        shutil.rmtree(d, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
