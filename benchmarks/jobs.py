#!/usr/bin/env python3
"""Block jobs against their qemu-img counterparts, in one run.

    python benchmarks/jobs.py [--dir /var/tmp] [--size 4G] [--keep]

Lays out a deterministic VM-shaped qcow2 image (runs of incompressible data,
written zeroes and holes; seed fixed) and a 3-deep chain over it
(base <- mid <- top, mid ~10 % and top ~5 % of the disk rewritten), then
times, each on fresh copies of the same files:

* backup full   ``blkjobs backup -t unsafe vm.qcow2 out.qcow2``  vs ``qemu-img convert -O qcow2``
* mirror full   ``blkjobs mirror -t unsafe vm.qcow2 out.qcow2``  vs ``qemu-img convert -O qcow2``
  (qemu-img convert does not fsync its target; ``-t unsafe`` does the same)
* stream        ``blkjobs stream -b base.qcow2 top``   vs ``qemu-img rebase -b base.qcow2`` (safe)
* commit        ``blkjobs commit top``                 vs ``qemu-img commit top``

Every result is checked with ``qemu-img compare``. Then a mirror runs while a
thread writes random 4 KiB blocks through a front end at 50 MB/s (paced),
``--writer-rounds`` times on a fresh target: it must reach READY and complete;
each round prints the writer's achieved rate over the whole run and in its
phases (bulk copy, READY, completion) and its longest stall.
The page cache is warm for both sides alike (the files were just written).
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

MiB = 1 << 20
PY = [sys.executable, "-m", "blkjobs"]


ENV = dict(os.environ)


def sh(*args, cwd=None):
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd,
                       env=ENV)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, args))}: {p.stderr or p.stdout}")
    return p.stdout


def timed(*args, cwd=None) -> float:
    t = time.monotonic()
    sh(*args, cwd=cwd)
    return time.monotonic() - t


def make_vm_raw(path: str, size: int, seed: int = 42) -> None:
    """55 % data, 15 % written zeroes, 30 % holes, in 1..32 MiB extents."""
    rnd = random.Random(seed)
    pool = rnd.randbytes(64 * MiB)
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        while pos < size:
            n = min(rnd.randrange(1, 33) * MiB, size - pos)
            kind = rnd.random()
            if kind < 0.55:
                done = 0
                while done < n:
                    k = min(n - done, 4 * MiB)
                    s = rnd.randrange(0, len(pool) - k)
                    f.seek(pos + done)
                    f.write(pool[s:s + k])
                    done += k
            elif kind < 0.70:
                f.seek(pos)
                f.write(bytes(n))
            pos += n


def overlay_writes(path: str, size: int, fraction: float, seed: int) -> None:
    rnd = random.Random(seed)
    cmds = []
    total = 0
    while total < fraction * size:
        n = rnd.randrange(1, 9) * MiB // 2
        off = rnd.randrange(0, (size - n) // 65536) * 65536
        cmds += ["-c", f"write -P {rnd.randrange(1, 255)} {off} {n}"]
        total += n
    for i in range(0, len(cmds), 400):
        sh("qemu-io", "-f", "qcow2", *cmds[i:i + 400], path)


def best_of(cmds, setup, repeat, cwd=None):
    """Best time of each command over ``repeat`` rounds, in a rotated order;
    fresh files (``setup``) and ``sync`` before every run, so no run pays
    for the previous one's dirty pages."""
    best = [float("inf")] * len(cmds)
    for r in range(repeat):
        order = list(range(len(cmds)))
        order = order[r % len(order):] + order[:r % len(order)]
        for i in order:
            setup()
            os.sync()
            best[i] = min(best[i], timed(*cmds[i](), cwd=cwd))
    return best


def same(a, b, fa="qcow2", fb="qcow2"):
    sh("qemu-img", "compare", "-f", fa, "-F", fb, a, b)


def copy_chain(src_dir: str, dst_dir: str) -> None:
    os.makedirs(dst_dir, exist_ok=True)
    for f in ("base.qcow2", "mid.qcow2", "top.qcow2"):
        shutil.copy(os.path.join(src_dir, f), os.path.join(dst_dir, f))


def row(name, ours, theirs, note=""):
    ratio = theirs / ours if ours else float("inf")
    verdict = "OK" if ours <= theirs * 1.0 else "SLOWER"
    print(f"{name:<14} blkjobs {ours:7.2f} s   qemu-img {theirs:7.2f} s   "
          f"x{ratio:4.2f}  {verdict} {note}", flush=True)
    return ours <= theirs


def mirror_under_writer(d: str, size: int, rate: int, rounds: int = 3,
                        mode: str = "background") -> bool:
    ok = True
    for r in range(rounds):
        ok &= mirror_under_writer_once(d, size, rate, r + 1, mode)
    return ok


def mirror_under_writer_once(d: str, size: int, rate: int, rnd_no: int, mode: str) -> bool:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    from blkjobs.engine import Engine
    src = os.path.join(d, "vm.qcow2")
    dst = os.path.join(d, "mw.qcow2")
    sh("qemu-img", "create", "-f", "qcow2", dst, size)
    os.sync()       # no dirty pages of the layout or of earlier runs (not timed)
    eng = Engine()
    try:
        s = eng.open(src, "qcow2", node_name="src")
        eng.open(dst, "qcow2", node_name="dst")
        vm = eng.attach(s)
        stop = threading.Event()
        written = [0]
        stall = [0.0]

        def writer():
            rnd = random.Random(5)
            blk = rnd.randbytes(4096)
            t0 = time.monotonic()
            while not stop.is_set():
                off = rnd.randrange(0, size // 4096) * 4096
                w0 = time.monotonic()
                vm.write(off, blk)
                stall[0] = max(stall[0], time.monotonic() - w0)
                written[0] += 4096
                ahead = written[0] / rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)

        ev = eng.listen(["BLOCK_JOB_READY"])
        t = threading.Thread(target=writer, daemon=True)
        t0 = time.monotonic()
        t.start()
        job = eng.mirror("src", "dst", sync="full", job_id="m0", copy_mode=mode)
        ev.wait_for("BLOCK_JOB_READY", timeout=600)
        t_ready, w_ready = time.monotonic() - t0, written[0]
        time.sleep(2)                      # in sync while the writer goes on
        t_cmpl, w_cmpl = time.monotonic() - t0, written[0]
        eng.job_complete("m0")
        outcome = eng.wait_job(job, 600)
        t_done, w_done = time.monotonic() - t0, written[0]
        stop.set()
        t.join(10)

        def mbs(w, dt):
            return w / max(dt, 1e-9) / 1e6
        ok = outcome.value == "completed" and vm.node.name == "dst"
        print(f"mirror+writer ({mode}) #{rnd_no} READY after {t_ready:.2f} s, completed after "
              f"{t_done:.2f} s; writer {mbs(w_done, t_done):.1f} MB/s (target "
              f"{rate / 1e6:.0f}; bulk {mbs(w_ready, t_ready):.1f}, READY "
              f"{mbs(w_cmpl - w_ready, t_cmpl - t_ready):.1f}, completion "
              f"{t_done - t_cmpl:.2f} s), longest write {stall[0] * 1e3:.0f} ms: "
              f"{'OK' if ok else 'FAILED'}", flush=True)
        final = os.path.join(d, "final.raw")
        with open(final, "wb") as f:
            for off in range(0, size, 64 * MiB):
                f.write(vm.read(off, min(64 * MiB, size - off)))
    finally:
        eng.close()
    same(final, dst, "raw", "qcow2")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--size", default="4G")
    ap.add_argument("--rate", type=float, default=50e6, help="writer bytes/s (default 50 MB/s)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--copy-mode", default="background", choices=("background", "write-blocking"),
                    help="the mirror's copy mode under the writer")
    ap.add_argument("--writer-rounds", type=int, default=3,
                    help="mirror-under-writer runs (default 3)")
    ap.add_argument("--writer-only", action="store_true",
                    help="only the mirror under a writer (skip the timed comparisons)")
    ap.add_argument("--repeat", type=int, default=2, help="rounds per comparison (best kept)")
    a = ap.parse_args()
    units = {"M": MiB, "G": 1024 * MiB}
    size = int(a.size[:-1]) * units[a.size[-1].upper()] if a.size[-1].isalpha() else int(a.size)
    d = tempfile.mkdtemp(prefix="blkjobs-jobs-bench.", dir=a.dir)
    try:
        t = time.monotonic()
        raw = os.path.join(d, "vm.raw")
        make_vm_raw(raw, size)
        vm = os.path.join(d, "vm.qcow2")
        sh("qemu-img", "convert", "-O", "qcow2", raw, vm)
        os.unlink(raw)
        chain = os.path.join(d, "chain")
        os.makedirs(chain)
        shutil.copy(vm, os.path.join(chain, "base.qcow2"))
        sh("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
           "mid.qcow2", cwd=chain)
        overlay_writes(os.path.join(chain, "mid.qcow2"), size, 0.10, 1)
        sh("qemu-img", "create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
           "top.qcow2", cwd=chain)
        overlay_writes(os.path.join(chain, "top.qcow2"), size, 0.05, 2)
        # blkjobs as installed: bytecode compiled once (kept out of the tree)
        ENV.pop("PYTHONDONTWRITEBYTECODE", None)
        ENV["PYTHONPYCACHEPREFIX"] = os.path.join(d, "pycache")
        warm = os.path.join(d, "warm")
        os.makedirs(warm)
        sh("qemu-img", "create", "-f", "qcow2", os.path.join(warm, "a.qcow2"), "1M")
        for cmd in ("backup", "mirror"):
            sh(*PY, cmd, os.path.join(warm, "a.qcow2"), os.path.join(warm, f"{cmd}.qcow2"))
        sh("qemu-img", "create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2",
           cwd=warm)
        sh(*PY, "stream", os.path.join(warm, "b.qcow2"))
        sh("qemu-img", "create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "c.qcow2",
           cwd=warm)
        sh(*PY, "commit", os.path.join(warm, "c.qcow2"))
        print(f"layout: {size / MiB:.0f} MiB VM-shaped qcow2 + 3-deep chain in "
              f"{time.monotonic() - t:.1f} s ({d})", flush=True)
        ok = True

        if a.writer_only:
            ok = mirror_under_writer(d, size, int(a.rate), a.writer_rounds, a.copy_mode)
            return 0 if ok else 1
        view = os.path.join(d, "view.raw")
        sh("qemu-img", "convert", "-O", "raw", os.path.join(chain, "top.qcow2"), view)

        def fresh_out(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
            os.makedirs(run_dir)

        def fresh_chain(run_dir, modified):
            """top (and what the job modifies) copied, the rest linked."""
            fresh_out(run_dir)
            for f in ("base.qcow2", "mid.qcow2", "top.qcow2"):
                src = os.path.join(chain, f)
                if f in modified:
                    shutil.copy(src, os.path.join(run_dir, f))
                else:
                    os.symlink(src, os.path.join(run_dir, f))

        # backup / mirror full vs convert (qemu-img convert does not fsync its
        # target: -t unsafe makes blkjobs do the same)
        out = os.path.join(d, "out")

        def conv() -> tuple[str, ...]:
            return ("qemu-img", "convert", "-O", "qcow2", vm, os.path.join(out, "o.qcow2"))

        b, q = best_of([lambda: (*PY, "backup", "-t", "unsafe", vm, os.path.join(out, "o.qcow2")),
                        conv], lambda: fresh_out(out), a.repeat)
        ok &= row("backup full", b, q)
        m, q = best_of([lambda: (*PY, "mirror", "-t", "unsafe", vm, os.path.join(out, "o.qcow2")),
                        conv], lambda: fresh_out(out), a.repeat)
        ok &= row("mirror full", m, q)
        run = os.path.join(d, "run")
        sh(*PY, "backup", vm, os.path.join(out, "check.qcow2"))
        same(vm, os.path.join(out, "check.qcow2"))

        # stream vs safe rebase (both fsync)
        s, q = best_of([lambda: (*PY, "stream", "-b", "base.qcow2", os.path.join(run, "top.qcow2")),
                        lambda: ("qemu-img", "rebase", "-b", "base.qcow2", "-F", "qcow2",
                                 os.path.join(run, "top.qcow2"))],
                       lambda: fresh_chain(run, {"top.qcow2"}), a.repeat, cwd=run)
        ok &= row("stream", s, q)
        fresh_chain(run, {"top.qcow2"})
        sh(*PY, "stream", "-b", "base.qcow2", os.path.join(run, "top.qcow2"))
        same(view, os.path.join(run, "top.qcow2"), "raw", "qcow2")

        # commit vs qemu-img commit (both fsync)
        c, q = best_of([lambda: (*PY, "commit", os.path.join(run, "top.qcow2")),
                        lambda: ("qemu-img", "commit", os.path.join(run, "top.qcow2"))],
                       lambda: fresh_chain(run, {"top.qcow2", "mid.qcow2"}), a.repeat, cwd=run)
        ok &= row("commit", c, q)
        fresh_chain(run, {"top.qcow2", "mid.qcow2"})
        sh(*PY, "commit", os.path.join(run, "top.qcow2"))
        same(view, os.path.join(run, "top.qcow2"), "raw", "qcow2")
        shutil.rmtree(run)
        shutil.rmtree(out)
        os.unlink(view)

        ok &= mirror_under_writer(d, size, int(a.rate), a.writer_rounds, a.copy_mode)
        print("ALL OK" if ok else "SOME CHECKS FAILED")
        return 0 if ok else 1
    finally:
        if a.keep:
            print(f"kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
