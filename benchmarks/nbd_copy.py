"""NBD copies: blkjobs convert against nbdcopy and qemu-img convert on the
same servers, in one run.

Cases: an ``nbdkit sparse-random`` export to a local file, a ``qemu-nbd``
export (read-only, of a raw file with data) to a local file, and a local file
to a writable ``qemu-nbd`` export. Per case: one warm-up round, then ROUNDS
rounds in which the contenders run one after another in an order that
rotates each round; the figure is the median over rounds of each round's
ratio (ours / theirs: below 1 is faster). Each target file is removed before
a run (a fresh file for everyone).

    .venv/bin/python benchmarks/nbd_copy.py [--size 512M] [--rounds 5] [--busy] [--cases sr,qn,wq]
        [--baseline PYTHON]

``--baseline PYTHON``: one more contender, ``PYTHON -m blkjobs`` (another
build, e.g. main's ``.venv/bin/python``) with our arguments: a before/after
in the same rounds.

Besides the wall times, each line gives the median CPU seconds (user +
system) of the client (from ``wait4``) and of the server during that
client's runs (from ``/proc/PID/stat``): on the loaded 2-core machine they
move far less than the wall times, and a client's requests cost the server
CPU too. ``[min-max]`` is the range of the per-round ratios.

``--busy``: two CPU hogs (busy loops, one per core of the 2-core test
machine) run during the whole measurement, so that the figures show how
the contenders fare when the CPU is contended (as on the shared machine,
where start-up CPU time costs several times its length in wall time). The
load average is printed before and after.
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
import time

HERE = os.path.dirname(os.path.abspath(__file__))

from nbd_export import fresh_bytecode  # noqa: E402  (the same fresh .pyc files)

BLKJOBS = [sys.executable, "-m", "blkjobs"]


def _size(s: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1].upper()] if s[-1].upper() in units else int(s)


class Server:
    def __init__(self, argv: list[str], sock: str):
        self.sock = sock
        self.uri = f"nbd+unix:///?socket={sock}"
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{argv[0]} did not start")
            time.sleep(0.01)

    def cpu(self) -> float:
        """The server's CPU seconds so far (user + system, all threads)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(15)


def timed(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds user + system) of one run of ``argv``."""
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert p.stderr is not None
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.monotonic() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    p.stderr.close()
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {err.decode(errors='replace').strip()}")
    return dt, ru.ru_utime + ru.ru_stime


def run_case(name: str, contenders: dict[str, list[str]], before, rounds: int,
             server: Server) -> dict:
    names = list(contenders)
    for n in names:                    # warm-up
        before()
        timed(contenders[n])
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    scpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            before()
            s0 = server.cpu()
            wall, c = timed(contenders[n])
            scpu[n].append(server.cpu() - s0)
            times[n].append(wall)
            cpu[n].append(c)
    out = {"case": name, "median_s": {n: statistics.median(v) for n, v in times.items()},
           "cpu_s": {n: statistics.median(v) for n, v in cpu.items()},
           "server_cpu_s": {n: statistics.median(v) for n, v in scpu.items()},
           "ratios": {n: [a / b for a, b in zip(times["blkjobs"], times[n], strict=True)]
                      for n in names if n != "blkjobs"}}
    out["ratio"] = {n: statistics.median(a / b for a, b in zip(times["blkjobs"], times[n], strict=True))
                    for n in names if n != "blkjobs"}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="512M")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--busy", action="store_true", help="two CPU hogs during the run")
    ap.add_argument("--baseline", default=None, metavar="PYTHON",
                    help="one more contender: blkjobs run by another build's python "
                         "(e.g. main's .venv/bin/python), a before/after in one run")
    ap.add_argument("--cases", default="sr,qn,wq",
                    help="comma-separated: sr (sparse-random -> file), qn (qemu-nbd -> file), "
                         "wq (file -> qemu-nbd)")
    a = ap.parse_args()
    fresh_bytecode()
    size = _size(a.size)
    base = [a.baseline, "-m", "blkjobs"] if a.baseline else None

    def with_base(c: dict[str, list[str]]) -> dict[str, list[str]]:
        if base is not None:    # the same arguments as ours
            c["baseline"] = base + c["blkjobs"][len(BLKJOBS):]
        return c

    for tool in ("nbdkit", "qemu-nbd", "nbdcopy", "qemu-img"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed (make deps)")
    d = tempfile.mkdtemp(prefix="nbd-bench-")
    servers: list[Server] = []
    results = []
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(2 if a.busy else 0)]
    load0 = os.getloadavg()
    try:
        out = os.path.join(d, "out.raw")

        def fresh() -> None:
            if os.path.exists(out):
                os.unlink(out)

        cases = set(a.cases.split(","))
        # 1. nbdkit sparse-random -> file
        s = Server(["nbdkit", "-f", "-U", f"{d}/sr.sock", "sparse-random", str(size),
                    "seed=1", "percent=50"], f"{d}/sr.sock")
        servers.append(s)
        if "sr" in cases:
            results.append(run_case("sparse-random -> file", with_base({
                "blkjobs": BLKJOBS + ["convert", s.uri, out],
                "nbdcopy": ["nbdcopy", s.uri, out],
                "qemu-img": ["qemu-img", "convert", "-O", "raw", s.uri, out]}), fresh, a.rounds, s))
        # 2. qemu-nbd (read-only, raw file of data) -> file
        img = os.path.join(d, "src.raw")
        subprocess.run(["nbdkit", "-U", "-", "sparse-random", str(size), "seed=2",
                        "percent=100", "--run", f"nbdcopy \"$uri\" {img}"], check=True)
        q = Server(["qemu-nbd", "-r", "-t", "-e", "8", "-f", "raw", "-k", f"{d}/q.sock", img],
                   f"{d}/q.sock")
        servers.append(q)
        if "qn" in cases:
            results.append(run_case("qemu-nbd -> file", with_base({
                "blkjobs": BLKJOBS + ["convert", q.uri, out],
                "nbdcopy": ["nbdcopy", q.uri, out],
                "qemu-img": ["qemu-img", "convert", "-O", "raw", q.uri, out]}), fresh, a.rounds, q))
        # 3. file -> qemu-nbd (writable)
        tgt = os.path.join(d, "tgt.raw")
        with open(tgt, "wb") as f:
            f.truncate(size)
        w = Server(["qemu-nbd", "-t", "-e", "8", "-f", "raw", "-k", f"{d}/w.sock", tgt],
                   f"{d}/w.sock")
        servers.append(w)
        if "wq" in cases:
            results.append(run_case("file -> qemu-nbd", with_base({
                "blkjobs": BLKJOBS + ["convert", "-n", img, w.uri],
                "nbdcopy": ["nbdcopy", img, w.uri],
                "qemu-img": ["qemu-img", "convert", "-n", "-O", "raw", img, w.uri]}),
                lambda: None, a.rounds, w))
    finally:
        load1 = os.getloadavg()
        for h in hogs:
            h.kill()
            h.wait()
        for s in servers:
            s.stop()
        shutil.rmtree(d, ignore_errors=True)
    print(f"size {a.size}, {a.rounds} rounds{', 2 CPU hogs' if a.busy else ''}; load average "
          f"{load0[0]:.1f} before, {load1[0]:.1f} after. Per contender: median wall time (median "
          f"CPU seconds of the client + the server); median of per-round ratios ours/theirs "
          f"[min-max], < 1: blkjobs faster")
    for r in results:
        med = "  ".join(f"{n} {t:.3f}s (cpu {r['cpu_s'][n]:.3f}+{r['server_cpu_s'][n]:.2f}s)"
                        for n, t in r["median_s"].items())
        rat = "  ".join(f"vs {n} {x:.2f} [{min(r['ratios'][n]):.2f}-{max(r['ratios'][n]):.2f}]"
                        for n, x in r["ratio"].items())
        print(f"{r['case']:<24} {med}   {rat}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
