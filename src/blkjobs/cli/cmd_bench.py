"""blkjobs bench [DIR]: throughput of the disk under DIR, and of copy paths.

    blkjobs bench /var/tmp -w seqread,seqwrite -b 4k,1M -j 1,4 --direct=0,1
    blkjobs bench /var/tmp -w copy --density data=30,zero=20,hole=50 --compare
"""
from __future__ import annotations

import argparse
import sys

from ..errors import UsageError

HELP_EPILOG = """\
workloads: seqread, seqwrite, randread, randwrite (at --rand-bs), copy (the
engine of 'blkjobs convert', on a VM-shaped raw image of --density).
Sizes take k, M, G suffixes (binary). Lists are comma-separated: -b 4k,1M -j 1,2,4.
Throughput: MB/s = 10^6 bytes/s, MiB/s = 2^20 bytes/s. See benchmarks/README.md.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmark disk throughput and copy paths",
        description="Run a matrix of I/O workloads in DIR and print a table.",
        epilog=HELP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", nargs="?", default=".", metavar="DIR",
                   help="directory on the file system to test (default: .)")
    p.add_argument("-w", "--workload", default="seqread,seqwrite,randread,randwrite,copy",
                   help="workloads (default: all)")
    p.add_argument("-b", "--bs", default="1M",
                   help="request sizes of the sequential and copy workloads (default: 1M)")
    p.add_argument("--rand-bs", default="4k", metavar="BS",
                   help="request size of the random workloads (default: 4k)")
    p.add_argument("-j", "--threads", default="1", help="worker threads (default: 1)")
    p.add_argument("--direct", nargs="?", const="1", default="auto", metavar="0|1|0,1",
                   help="O_DIRECT with aligned buffers (1), buffered (0) or both (0,1); "
                        "default: O_DIRECT where the file system takes it, else buffered "
                        "with a cold cache")
    p.add_argument("--size", default="256M", help="file size per workload (default: 256M)")
    p.add_argument("--runtime", default=None, metavar="SECONDS",
                   help="time budget per run (default: one pass over --size)")
    p.add_argument("--repeat", type=int, default=5, help="measured runs (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="discarded runs first (default: 1)")
    p.add_argument("--cold", action="store_true",
                   help="drop caches before every run (as root; else evict the files' pages)")
    p.add_argument("--compare", nargs="?", const="all", default=None, metavar="TOOLS",
                   help="also run fio, dd, qemu-img, cp, nbdcopy (all, or a list)")
    p.add_argument("--density", default="data=50,zero=10,hole=40",
                   help="copy source shares in percent (default: data=50,zero=10,hole=40)")
    p.add_argument("--output", choices=("human", "json"), default="human",
                   help="table (human) or JSON on stdout")
    p.add_argument("--plot", metavar="FILE.png", help="also draw throughput by request size and threads and a latency CDF (needs matplotlib)")
    p.add_argument("--keep", action="store_true", help="keep the files it made")
    p.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line on stderr")
    p.set_defaults(func=run)


def _untangle(args) -> None:
    """`--direct` and `--compare` take an optional value, so argparse gives
    them the DIR of `bench --direct /var/tmp`: hand it back when the value is
    not one of theirs and DIR was not given."""
    from ..diskbench.matrix import parse_direct
    from ..diskbench.contenders import TOOLS
    if args.dir == "." and args.compare not in (None, "all") and \
            not set(args.compare.split(",")) <= set(TOOLS):
        args.dir, args.compare = args.compare, "all"
    if args.dir == "." and args.direct not in ("0", "1", "auto"):
        try:
            [parse_direct(x) for x in args.direct.split(",")]
        except UsageError:
            args.dir, args.direct = args.direct, "1"


def settings_from_args(args):
    from ..diskbench.matrix import parse_density, parse_matrix
    from ..diskbench.contenders import parse_compare
    from ..diskbench.runner import Settings
    from ..units import parse_size

    _untangle(args)
    auto = args.direct == "auto"
    cases = parse_matrix(args.workload, args.bs, args.threads, "1" if auto else args.direct,
                         args.rand_bs)
    size = parse_size(args.size, "--size")
    biggest = max(c.bs for c in cases)
    if size < biggest:
        raise UsageError(f"--size {args.size} is smaller than the largest request size")
    if any(c.workload == "copy" for c in cases) and size % 4096:
        raise UsageError("--size must be a multiple of 4k for the copy workload")
    runtime = 0.0
    if args.runtime is not None:
        try:
            runtime = float(args.runtime.rstrip("s"))
        except ValueError:
            raise UsageError(f"invalid --runtime '{args.runtime}': seconds expected") from None
        if not runtime > 0:
            raise UsageError(f"invalid --runtime '{args.runtime}': must be > 0")
    if args.repeat < 1:
        raise UsageError(f"invalid --repeat {args.repeat}: must be >= 1")
    if args.warmup < 0:
        raise UsageError(f"invalid --warmup {args.warmup}: must be >= 0")
    return Settings(dir=args.dir, cases=cases, size=size, runtime=runtime,
                    repeat=args.repeat, warmup=args.warmup, cold=args.cold,
                    density=parse_density(args.density), compare=parse_compare(args.compare),
                    keep=args.keep, seed=args.seed, direct_auto=auto)


def _need_bench_extra() -> None:
    """numpy and psutil come with the package's `bench` extra."""
    import importlib.util
    missing = [m for m in ("numpy", "psutil") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"bench needs {' and '.join(missing)}: pip install 'blkjobs[bench]'")


def run(args) -> int:
    _need_bench_extra()
    from ..diskbench import report
    from ..diskbench.runner import Runner

    settings = settings_from_args(args)
    plt = None
    if args.plot:
        from ..diskbench.plot import load_pyplot
        plt = load_pyplot()  # fail before doing any I/O
    # Ctrl-C and SIGTERM (cli.main turns it into errors.Terminated) unwind
    # through the runner, which removes the files it made.
    runner = Runner(settings, progress=_signalled_status(enabled=not args.quiet))
    rows, notes = runner.run()
    if args.plot:
        from ..diskbench.plot import plot
        plot(rows, args.plot, plt)
        notes.append(f"plot written to {args.plot}")
    if args.output == "json":
        sys.stdout.write(report.dumps(report.to_json(settings, rows, notes)))
    else:
        sys.stdout.write(report.table(settings, rows, notes))
    return 1 if any(r.error for r in rows) else 0


def _signalled_status(enabled: bool):
    """diskbench's StatusLine on stderr that answers a SIGUSR1, as the
    copy commands do: one plain line on stderr, -q too, at the next stage,
    run or byte count (at the end at the latest), ``now: `` and the current
    run (and its bytes done when known); the bench carries on."""
    from ..diskbench.status_line import StatusLine
    from .copy_progress import take_sigusr1

    class Signalled(StatusLine):
        def _usr1(self, detail: str = "") -> None:
            if not take_sigusr1():
                return
            if self.tty and self._shown:        # the live line gives way
                self.stream.write("\r\x1b[K")
                self._shown = False
            self.stream.write(f"now: {self._step or 'starting'}{'  ' + detail if detail else ''}\n")
            self.stream.flush()

        def phase(self, text: str) -> None:
            super().phase(text)
            self._usr1()

        def step(self, text: str) -> None:
            super().step(text)
            self._usr1()

        def update(self, text: str) -> None:
            super().update(text)
            self._usr1(text)

        def done(self) -> None:
            super().done()
            self._usr1()

    return Signalled(sys.stderr, enabled=enabled)
