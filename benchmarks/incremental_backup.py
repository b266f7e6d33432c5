#!/usr/bin/env python3
"""Incremental backup of 1 % changed data, against a full backup and against
qemu-storage-daemon's bitmap backup of the same change, in one run.

    python benchmarks/incremental_backup.py [--dir /var/tmp] [--size 16G]
        [--data 2G] [--rounds 5] [--busy] [--baseline BLKJOBS]

Lays out a qcow2 image of ``--size`` (64 KiB clusters) holding ``--data`` of
data in 64 MiB runs spread over the disk, adds a persistent dirty bitmap with
``qemu-img bitmap --add``, then changes 1 % of the virtual size in 64 KiB
writes at random cluster offsets (seed fixed) with ``qemu-io``, so QEMU's own
block layer dirties the bitmap. Each round then runs, in rotating order:

* ``blkjobs incremental``: ``blkjobs backup -t unsafe --sync bitmap --bitmap b0
  --bitmap-mode never -B base.qcow2 IMG inc.qcow2`` (an overlay of the full
  backup taken before the change; ``never`` keeps the bitmap for the next
  round);
* ``blkjobs full``: ``blkjobs backup -t unsafe --sync full IMG full.qcow2``;
* ``qsd incremental``: ``qemu-img create -f qcow2 -b base.qcow2 T SIZE``, then
  qemu-storage-daemon with the image and T (``cache.no-flush``, as ``-t
  unsafe``) and ``blockdev-backup sync=bitmap bitmap=b0 bitmap-mode=never``
  over its QMP monitor on stdio, until ``BLOCK_JOB_COMPLETED``, then ``quit``.

Each is timed from process start to exit; "written" is what the target file
holds on disk (st_blocks) afterwards. The first round is a warm-up. The
incremental targets are checked once: both hold exactly the changed clusters
(``qemu-img map``), with the same data (``qemu-img compare`` of the two).
Ratios are medians of per-round ratios (other / blkjobs incremental; > 1 means
we are faster). ``--busy`` keeps every core busy with a spinning process.
``--baseline BLKJOBS`` adds another blkjobs' incremental backup ("blkjobs
before", checked like ours), to measure a change against main in one run.
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

MiB = 1 << 20
CLUSTER = 64 << 10
BLKJOBS = [sys.executable, "-m", "blkjobs"]


def sh(*args: str) -> str:
    p = subprocess.run(list(args), capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(args)}: {p.stderr or p.stdout}")
    return p.stdout


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": MiB, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper()
    suffix = t[-1] if t and t[-1] in units else ""
    return int(float(t[:len(t) - len(suffix)]) * units[suffix])


def qemu_io(img: str, cmds: list[str]) -> None:
    """Run qemu-io commands on IMG, a few thousand per process."""
    for i in range(0, len(cmds), 2000):
        args = ["qemu-io", "-f", "qcow2"]
        for c in cmds[i:i + 2000]:
            args += ["-c", c]
        sh(*args, img)


def make_image(d: str, size: int, data: int, seed: int) -> tuple[str, set[int]]:
    img = os.path.join(d, "disk.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, str(size))
    runs = max(1, data // (64 * MiB))
    step = size // runs
    qemu_io(img, [f"write -P {1 + i % 250} {i * step} {64 * MiB}" for i in range(runs)])
    # the previous backup, which the incremental ones are overlays of
    sh(*BLKJOBS, "backup", "-t", "unsafe", img, os.path.join(d, "base.qcow2"))
    sh("qemu-img", "bitmap", "--add", img, "b0")
    rnd = random.Random(seed)
    nclusters = size // CLUSTER
    changed = set(rnd.sample(range(nclusters), size // 100 // CLUSTER))
    qemu_io(img, [f"write -P {0x5a} {c * CLUSTER} {CLUSTER}" for c in sorted(changed)])
    return img, changed


def on_disk(path: str) -> int:
    return os.stat(path).st_blocks * 512


def run_blkjobs(args: list[str], blkjobs: list[str] = BLKJOBS) -> float:
    t = time.perf_counter()
    sh(*blkjobs, *args)
    return time.perf_counter() - t


def run_qsd(img: str, target: str, size: int) -> float:
    t = time.perf_counter()
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", target,
       str(size))
    p = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,node-name=sf,filename={img}",
         "--blockdev", "driver=qcow2,node-name=src,file=sf",
         "--blockdev", f"driver=file,node-name=tf,filename={target},cache.no-flush=on",
         "--blockdev", "driver=qcow2,node-name=tgt,file=tf,cache.no-flush=on",
         "--chardev", "stdio,id=m", "--monitor", "m"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdin is not None and p.stdout is not None

    def send(cmd: str, **args: object) -> None:
        assert p.stdin is not None
        p.stdin.write(json.dumps({"execute": cmd, "arguments": args}) + "\n")
        p.stdin.flush()

    send("qmp_capabilities")
    send("blockdev-backup", **{"job-id": "j", "device": "src", "target": "tgt",
                               "sync": "bitmap", "bitmap": "b0", "bitmap-mode": "never"})
    for line in p.stdout:
        msg = json.loads(line)
        if "error" in msg:
            p.kill()
            raise SystemExit(f"qemu-storage-daemon: {msg['error']['desc']}")
        if msg.get("event") == "BLOCK_JOB_COMPLETED":
            if msg["data"].get("error"):
                p.kill()
                raise SystemExit(f"qemu-storage-daemon: {msg['data']['error']}")
            break
    send("quit")
    p.communicate()
    return time.perf_counter() - t


def mapped_data(path: str) -> int:
    m = json.loads(sh("qemu-img", "map", "--output", "json", "-f", "qcow2", path))
    return sum(e["length"] for e in m if e["data"] and e["depth"] == 0)


class Hogs:
    def __init__(self, n: int) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                      for _ in range(n)]

    def close(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGKILL)
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=None, help="where to put the images (default: a temp dir)")
    ap.add_argument("--size", default="16G")
    ap.add_argument("--data", default="2G", help="data in the image before the change")
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds (after a warm-up)")
    ap.add_argument("--busy", action="store_true", help="keep every core busy meanwhile")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--baseline", default=None, metavar="BLKJOBS",
                    help="another blkjobs (e.g. the main branch's .venv/bin/blkjobs): "
                         "its incremental backup as 'blkjobs before'")
    a = ap.parse_args()
    size, data = parse_size(a.size), parse_size(a.data)
    d = tempfile.mkdtemp(prefix="blkjobs-incbench-", dir=a.dir)
    hogs = None
    try:
        print(f"image: {size >> 30} GiB qcow2, {data >> 20} MiB data, 1% changed "
              f"({size // 100 // CLUSTER} clusters of 64 KiB) ...", flush=True)
        img, changed = make_image(d, size, data, a.seed)
        inc, full, q = (os.path.join(d, n) for n in ("inc.qcow2", "full.qcow2", "q.qcow2"))
        contenders = {
            "blkjobs incremental": lambda: run_blkjobs(
                ["backup", "-t", "unsafe", "--sync", "bitmap", "--bitmap", "b0",
                 "--bitmap-mode", "never", "-B", os.path.join(d, "base.qcow2"), img, inc]),
            "blkjobs full": lambda: run_blkjobs(["backup", "-t", "unsafe", "--sync", "full",
                                                 img, full]),
            "qsd incremental": lambda: run_qsd(img, q, size),
        }
        targets = {"blkjobs incremental": inc, "blkjobs full": full, "qsd incremental": q}
        if a.baseline:
            contenders["blkjobs before"] = lambda: run_blkjobs(
                ["backup", "-t", "unsafe", "--sync", "bitmap", "--bitmap", "b0",
                 "--bitmap-mode", "never", "-B", os.path.join(d, "base.qcow2"), img, inc],
                [a.baseline])
            targets["blkjobs before"] = inc
        names = list(contenders)
        times: dict[str, list[float]] = {n: [] for n in names}
        written: dict[str, int] = {}
        if a.busy:
            hogs = Hogs(os.cpu_count() or 1)
        for r in range(a.rounds + 1):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                for p in targets.values():
                    if os.path.exists(p):
                        os.unlink(p)
                dt = contenders[n]()
                written[n] = on_disk(targets[n])
                if r == 0 and n != "blkjobs full":      # check once, on the warm-up
                    got = mapped_data(targets[n])
                    if got != len(changed) * CLUSTER:
                        raise SystemExit(f"{n}: {got} bytes of data, expected "
                                         f"{len(changed) * CLUSTER}")
                    shutil.copy(targets[n], targets[n] + ".check")
                if r > 0:
                    times[n].append(dt)
            print(f"round {r}{' (warm-up)' if r == 0 else ''}: " +
                  ", ".join(f"{n} {times[n][-1] if r else dt:.2f} s" for n in order
                            if r or n == order[-1]), flush=True)
        sh("qemu-img", "compare", "-q", inc + ".check", q + ".check")
        base = times["blkjobs incremental"]
        print(f"\n{'':22}{'median s':>10}{'written MiB':>13}{'ratio':>8}  (other / ours; "
              f"{a.rounds} rounds{', busy' if a.busy else ''}, load "
              f"{os.getloadavg()[0]:.1f})")
        for n in names:
            ratio = statistics.median(x / y for x, y in zip(times[n], base, strict=True))
            print(f"{n:22}{statistics.median(times[n]):>10.2f}{written[n] / MiB:>13.1f}"
                  f"{ratio:>8.2f}")
        print("\nboth incremental targets hold exactly the changed clusters and the same data")
    finally:
        if hogs is not None:
            hogs.close()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
