#!/usr/bin/env python3
"""The CPU a blkjobs command spends, in all and in a job's planning: runs
``blkjobs ARGS...`` in this process and prints its CPU time
(``time.process_time``, every thread), its wall time, and the CPU time of
the job thread in ``Mover.start_areas`` (planning batches: block status,
allocation, engine items) and ``BackupJob._claim`` (taking dirty areas),
each measured with ``time.thread_time`` around the call.

    python benchmarks/plan_cpu.py backup -t unsafe --sync bitmap --bitmap b0 \\
        --bitmap-mode never -B base.qcow2 disk.qcow2 inc.qcow2

Run it with another checkout's interpreter (e.g. /work/main/.venv/bin/python)
to compare two versions on the same image, alternating.
"""
from __future__ import annotations

import sys
import time
from typing import Any


def main() -> None:
    from blkjobs.jobs import backup, blockcopy
    acc: dict[str, float] = {}

    def timed(cls: Any, name: str) -> None:
        orig = getattr(cls, name)

        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.thread_time()
            try:
                return orig(*a, **k)
            finally:
                acc[name] = acc.get(name, 0.0) + time.thread_time() - t
        setattr(cls, name, wrapper)

    timed(blockcopy.Mover, "start_areas")
    timed(backup.BackupJob, "_claim")
    from blkjobs.cli.main import main as blkjobs_main
    cpu, wall = time.process_time(), time.perf_counter()
    rc = 0
    try:
        blkjobs_main(sys.argv[1:])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    print(f"cpu {time.process_time() - cpu:.3f} s, wall {time.perf_counter() - wall:.3f} s, "
          + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in acc.items()), file=sys.stderr)
    sys.exit(rc)


if __name__ == "__main__":
    main()
