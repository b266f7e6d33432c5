#!/usr/bin/env python3
"""Incremental backup with a persistent dirty bitmap, through the library.

    python examples/incremental_backup.py DIR

In DIR: a disk image ``disk.qcow2`` is written by ``qemu-io`` (standing in
for a VM) between backups. A full backup creates the persistent bitmap
``backup`` in the disk (in the same step as the copy, so no write between
the copy and the hand-over is lost); each incremental backup copies only
the clusters the bitmap marks into a qcow2 overlay whose backing file is
the previous backup, and hands the bitmap over. The bitmap lives in the
image, so the last incremental runs in a *new process* (this script again,
with ``--step incremental``), as a backup tool's next run would. Finally
the chain's top is converted to a raw image (the restore) and
``qemu-img compare`` checks it against the disk.

``chain.txt`` in DIR lists the backups, oldest first. See docs/bitmaps.md.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from blkjobs import Engine, JobOutcome

BITMAP = "backup"


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def chain(d: str) -> list[str]:
    path = os.path.join(d, "chain.txt")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return f.read().split()


def backup(d: str, kind: str) -> str:
    """One backup of DIR/disk.qcow2 (``kind``: full or incremental); returns
    the new backup's file name."""
    disk = os.path.join(d, "disk.qcow2")
    backups = chain(d)
    name = f"{len(backups):02d}-{kind}.qcow2"
    target = os.path.join(d, name)
    eng = Engine()
    try:
        src = eng.open(disk, "qcow2", node_name="disk")
        if kind == "full":
            if BITMAP not in [b.name for b in eng.bitmaps(src)]:
                eng.block_dirty_bitmap_add(src, BITMAP, persistent=True)
            dst = eng.create(target, "qcow2", src.size, node_name="target")
            # sync=full with the bitmap: on success the bitmap holds only
            # what was written since the copy's point in time
            job = eng.backup(src, dst, "full", bitmap=BITMAP, bitmap_mode="on-success")
        else:
            dst = eng.create(target, "qcow2", src.size, node_name="target",
                             backing_file=backups[-1], backing_format="qcow2")
            changed = sum(n for _, n in eng.bitmap(src, BITMAP).dirty_extents())
            print(f"{name}: {changed} bytes changed since {backups[-1]}")
            job = eng.backup(src, dst, "incremental", bitmap=BITMAP)
        outcome = eng.wait_job(job)
        if outcome is not JobOutcome.COMPLETED:
            raise SystemExit(f"{kind} backup {outcome.value}: {job.error}")
    finally:
        eng.close()             # stores the bitmap in disk.qcow2
    with open(os.path.join(d, "chain.txt"), "a") as f:
        f.write(name + "\n")
    return name


def demo(d: str) -> None:
    os.makedirs(d, exist_ok=True)
    disk = os.path.join(d, "disk.qcow2")
    run("qemu-img", "create", "-f", "qcow2", disk, "64M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 8M", "-c", "write -P 0x22 32M 4M", disk)
    print(backup(d, "full"))
    writes = [("write -P 0x33 1M 64k", "write -P 0x34 40M 1M"),
              ("write -z 32M 128k", "write -P 0x35 63M 4k"),
              ("write -P 0x36 0 4k", "discard 4M 1M")]
    for cmds in writes:
        run("qemu-io", "-f", "qcow2", *[a for c in cmds for a in ("-c", c)], disk)
        print(backup(d, "incremental"))
    # the next run of a backup tool: a new process finds the bitmap in the image
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x37 20M 2M", disk)
    subprocess.run([sys.executable, os.path.abspath(__file__), "--step", "incremental", d],
                   check=True)
    top = os.path.join(d, chain(d)[-1])
    restored = os.path.join(d, "restored.raw")
    run(sys.executable, "-m", "blkjobs", "convert", "-O", "raw", top, restored)
    subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", disk, restored],
                   check=True)
    print(f"restored {len(chain(d))} backups into {restored}: identical to the disk")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--step", choices=["full", "incremental"],
                   help="run one backup only (default: the whole demo)")
    p.add_argument("dir")
    args = p.parse_args()
    if args.step:
        print(backup(args.dir, args.step))
    else:
        demo(args.dir)


if __name__ == "__main__":
    main()
