#!/usr/bin/env python3
"""``convert -c`` (zlib-compressed qcow2) against ``qemu-img convert -c``, on
deterministic compressible images, quiet and with every core busy.

Contenders: ``blkjobs convert -c`` (igzip where built in), the same with
``BLKJOBS_DEFLATE=zlib`` (QEMU's codec and level), ``qemu-img convert -c
-O qcow2`` and ``qemu-img convert -c -m 16 -W`` (its fastest settings).

The images (``--image``): ``mixed``, 64 KiB clusters of text-like data
(compresses ~3:1), random bytes (does not compress: stored as plain
clusters), and written zeroes, in a seeded order; ``vm``, laid out as
``make_vm_image`` lays out a guest disk (a boot area, data runs, zeroes
written as data, holes) with the data taken from this machine's shared
libraries and text files in /usr (what a guest's system disk holds; the
same files, in name order, on every machine of one Debian release).
Method as in convert_raw.py: one warm-up round, then ROUNDS rounds with
the contenders in an order rotated per round, the target deleted and the
system synced between runs (not timed), the MEDIAN OF THE PER-ROUND RATIOS
peer time / blkjobs time (> 1: blkjobs is faster). busy: one CPU hog per
core for the whole block. Each contender's last target is checked with
``qemu-img compare`` and ``qemu-img check``; its size (file length and
disk blocks used) is reported.

Usage: benchmarks/convert_compress.py [--size 512M] [--rounds 7]
       [--image mixed,vm] [--load quiet,busy] [--baseline PATH] [--dir DIR]
"""
from __future__ import annotations

import argparse
import glob
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from convert_raw import BLKJOBS, Hogs, report, run_once  # noqa: E402
from blkjobs.units import parse_size  # noqa: E402

WORDS = ("block job mirror backup stream commit cluster image qcow2 raw guest host "
         "the of and to in is was for on that with as by at from this be are").split()


def make_compressible(path: str, size: int, seed: int = 3) -> None:
    rnd = random.Random(seed)
    text = " ".join(rnd.choice(WORDS) + str(rnd.randrange(100)) for _ in range(400000))
    pool_t = text.encode()
    pool_r = rnd.randbytes(4 << 20)
    cl = 65536
    with open(path, "wb") as f:
        for _ in range(0, size, cl):
            k = rnd.random()
            if k < 0.6:
                s = rnd.randrange(0, len(pool_t) - cl)
                f.write(pool_t[s:s + cl])
            elif k < 0.8:
                s = rnd.randrange(0, len(pool_r) - cl)
                f.write(pool_r[s:s + cl])
            else:
                f.write(bytes(cl))


def _system_pool(limit: int = 64 << 20) -> bytes:
    """Up to ``limit`` bytes of shared libraries (two thirds) and text files
    (a third) from /usr, in name order."""
    def take(paths, n):
        out = bytearray()
        for f in sorted(paths):
            if len(out) >= n:
                break
            if os.path.isfile(f) and not os.path.islink(f):
                try:
                    with open(f, "rb") as fh:
                        out += fh.read(n - len(out))
                except OSError:
                    pass
        return bytes(out)
    libs = take(glob.glob("/usr/lib/x86_64-linux-gnu/**/*.so*", recursive=True), limit * 2 // 3)
    text = take([f for f in glob.glob("/usr/share/**/*", recursive=True)
                 if f.endswith((".py", ".pm", ".txt", ".html", ".xml", ".h", ".json", ".conf"))],
                limit - len(libs))
    return libs + text


def make_vm_like(path: str, size: int, seed: int = 42) -> None:
    """make_vm_image's layout (35 % data, 15 % zeroes written, the rest
    holes), the data runs read in turn from :func:`_system_pool`."""
    from blkjobs.imageops.vmimage import make_vm_image
    make_vm_image(path, size, seed=seed)
    pool = _system_pool()
    pos = 0
    from blkjobs.native.extents import extents
    fd = os.open(path, os.O_RDWR)
    try:
        for e in extents(fd, 0, size):
            if not e.data:
                continue
            off = e.offset
            while off < e.offset + e.length:
                n = min(1 << 20, e.offset + e.length - off)
                if not any(os.pread(fd, min(n, 4096), off)):
                    off += n                # zeroes written as data stay zeroes
                    continue
                if pos + n > len(pool):
                    pos = 0
                os.pwrite(fd, pool[pos:pos + n], off)
                pos += n
                off += n
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="512M")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--load", default="quiet,busy")
    ap.add_argument("--image", default="mixed,vm")
    ap.add_argument("--baseline", default=None, metavar="BLKJOBS")
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    size = parse_size(a.size)
    d = a.dir or tempfile.mkdtemp(prefix="blkjobs-bench-c-", dir="/var/tmp")
    os.makedirs(d, exist_ok=True)
    src = os.path.join(d, "src.raw")
    dsts = {}

    def dst(name):
        return dsts.setdefault(name, os.path.join(d, f"dst{len(dsts)}.qcow2"))
    cs = {"blkjobs convert": [BLKJOBS, "convert", "-c", "-O", "qcow2", src,
                              dst("blkjobs convert")],
          "blkjobs zlib": ["env", "BLKJOBS_DEFLATE=zlib", BLKJOBS, "convert", "-c", "-O",
                           "qcow2", src, dst("blkjobs zlib")],
          "qemu-img convert": ["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", src,
                               dst("qemu-img convert")],
          "qemu-img -m 16 -W": ["qemu-img", "convert", "-c", "-m", "16", "-W", "-f", "raw",
                                "-O", "qcow2", src, dst("qemu-img -m 16 -W")]}
    if a.baseline:
        cs["blkjobs before"] = [a.baseline, "convert", "-c", "-O", "qcow2", src,
                                dst("blkjobs before")]
    names = list(cs)
    try:
        for image in a.image.split(","):
            if image == "vm":
                make_vm_like(src, size)
            else:
                make_compressible(src, size)
            subprocess.run(["cat", src], stdout=subprocess.DEVNULL)
            print(f"image {image}: load average before: {os.getloadavg()[0]:.1f}",
                  file=sys.stderr)
            for load in a.load.split(","):
                bench(a, image, load, size, names, cs, src, dsts, d)
    finally:
        if not a.dir:
            shutil.rmtree(d)


def bench(a, image, load, size, names, cs, src, dsts, d) -> None:
    res: dict = {(n, "cache"): [] for n in names}
    rss = {n: 0 for n in names}
    hogs = Hogs.for_load(load)
    try:
        for rnd in range(a.rounds + 1):
            for n in names[rnd % len(names):] + names[:rnd % len(names)]:
                if os.path.exists(dsts[n]):
                    os.unlink(dsts[n])
                os.sync()
                dt, r, us, sy = run_once(cs[n], False, os.path.join(d, "rss"))
                if rnd > 0:
                    res[(n, "cache")].append((dt, us, sy))
                    rss[n] = max(rss[n], r)
                print(f"  {image} {load} round {rnd} {n:18s} {dt:7.3f} s user {us:5.2f} "
                      f"sys {sy:5.2f}", file=sys.stderr)
    finally:
        if hogs:
            hogs.close()
    report(f"convert -c {a.size} raw->qcow2, image {image}, {load} (load average "
           f"{os.getloadavg()[0]:.1f})", size, names, res, rss, ["cache"])
    print(f"  {'contender':22s} {'CPU s (user+sys)':>16s} {'file MB':>9s} {'disk MB':>9s}")
    for n in names:
        subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", src, dsts[n]],
                       check=True)
        subprocess.run(["qemu-img", "check", "-q", dsts[n]], check=True)
        st = os.stat(dsts[n])
        cpu = statistics.median(u + s for _, u, s in res[(n, "cache")])
        print(f"  {n:22s} {cpu:16.2f} {st.st_size / 1e6:9.2f} {st.st_blocks * 512 / 1e6:9.2f}")


if __name__ == "__main__":
    main()
