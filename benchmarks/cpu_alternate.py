#!/usr/bin/env python3
"""Alternate a few copy commands, and report CPU seconds as well as wall time.

On a loaded machine the wall clock of a copy is mostly its share of the
CPU; the command's own CPU seconds (user + system, from wait4) move much
less between rounds. One warm-up round, then ROUNDS rounds; in each every
contender runs once, in an order rotated per round; the target is deleted
and the system synced before every run (not timed). Reports per contender
the median and min of wall and CPU seconds, voluntary and involuntary
context switches, and the median of the per-round ratios of wall time to
the first contender's.

    benchmarks/cpu_alternate.py ROUNDS SRC DST '{"name": ["cmd", "SRC", "DST"], ...}'

SRC and DST in the commands are replaced by the paths. Example (the dense
raw -> raw figures of benchmarks/README.md, issue 15 part 5):

    benchmarks/cpu_alternate.py 5 dense.raw o.raw \\
      '{"cp": ["cp", "--sparse=always", "SRC", "DST"],
        "main": ["/work/main/.venv/bin/blkjobs", "convert", "SRC", "DST"],
        "new": [".venv/bin/blkjobs", "convert", "SRC", "DST"]}'
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time


def main() -> None:
    if len(sys.argv) != 5:
        raise SystemExit(__doc__)
    rounds, src, dst = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    cons = json.loads(sys.argv[4])
    names = list(cons)
    res: dict[str, list[tuple[float, float, int, int]]] = {n: [] for n in names}
    la0 = os.getloadavg()[0]
    for r in range(rounds + 1):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            if os.path.exists(dst):
                os.unlink(dst)
            os.sync()
            argv = [a.replace("SRC", src).replace("DST", dst) for a in cons[n]]
            t0 = time.perf_counter()
            pid = os.fork()
            if pid == 0:
                fd = os.open(os.devnull, os.O_WRONLY)
                os.dup2(fd, 1)
                os.execvp(argv[0], argv)
            _, st, ru = os.wait4(pid, 0)
            dt = time.perf_counter() - t0
            if st != 0:
                raise SystemExit(f"{n} failed: status {st}")
            if r:
                res[n].append((dt, ru.ru_utime + ru.ru_stime, ru.ru_nvcsw, ru.ru_nivcsw))
    base = names[0]
    for n in names:
        v = res[n]
        ratios = [v[i][0] / res[base][i][0] for i in range(len(v))]
        print(f"{n:28s} wall med {statistics.median(x[0] for x in v):.3f} "
              f"min {min(x[0] for x in v):.3f}  cpu med {statistics.median(x[1] for x in v):.3f} "
              f"min {min(x[1] for x in v):.3f}  vcsw {statistics.median(x[2] for x in v):.0f} "
              f"ivcsw {statistics.median(x[3] for x in v):.0f}  "
              f"wall/{base} {statistics.median(ratios):.2f}")
    print(f"load average {la0:.1f} before, {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    main()
