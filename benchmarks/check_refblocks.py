"""check's refcount-block walk (formats/qcow2/check_walk.py walk_refblocks)
on a 1 MiB qcow2 made by qemu-img: this tree's against the one at a git
revision (default main), alternated per round; prints CPU time (process
time, which the machine's load affects less) and the median of the
per-round ratios. Both must print the same diagnostics.

    .venv/bin/python benchmarks/check_refblocks.py [--rev main] [--rounds 21]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
import types
from pathlib import Path

from blkjobs.formats import open_image
from blkjobs.formats.qcow2 import check_walk

MODULE = "src/blkjobs/formats/qcow2/check_walk.py"


def _module_at(rev: str) -> types.ModuleType:
    src = subprocess.run(["git", "show", f"{rev}:{MODULE}"], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent).stdout
    mod = types.ModuleType("blkjobs.formats.qcow2._check_walk_at_rev")
    mod.__package__ = "blkjobs.formats.qcow2"
    exec(compile(src, f"{rev}:{MODULE}", "exec"), mod.__dict__)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rev", default="main")
    ap.add_argument("--rounds", type=int, default=21)
    a = ap.parse_args()
    old = _module_at(a.rev)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        path = f"{d}/a.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "1M"], check=True)
        img = open_image(path, "qcow2", read_only=True)
        try:
            def one(mod: types.ModuleType) -> tuple[float, list[str]]:
                w = mod.Walker(img, None)
                w.walk_all()                # the refs as check has them, refblocks last
                w.refs.clear()
                w.ref_range(0, 3 * 65536)   # header, reftable, refblock
                t0 = time.process_time()
                w.walk_refblocks()
                return time.process_time() - t0, w.msgs
            ratios, t_old, t_new = [], [], []
            for _ in range(a.rounds):
                (to, mo), (tn, mn) = one(old), one(check_walk)
                assert mo == mn, (mo, mn)
                t_old.append(to)
                t_new.append(tn)
                ratios.append(to / max(tn, 1e-9))
        finally:
            img.close()
    print(f"walk_refblocks CPU, {a.rounds} rounds: {a.rev} median {statistics.median(t_old) * 1e3:.2f} ms,"
          f" this tree median {statistics.median(t_new) * 1e3:.3f} ms,"
          f" median per-round ratio {statistics.median(ratios):.0f}x")


if __name__ == "__main__":
    main()
