"""The contenders of ``blkjobs bench``: blkjobs itself (its C loops and copy
engine) and the external tools of ``--compare`` (fio, dd, qemu-img, cp,
nbdcopy), each a :class:`Contender` that runs one case and returns a
:class:`~.stats.Sample`."""
from __future__ import annotations

import abc
import os
import shutil
from dataclasses import replace
from collections.abc import Callable

from ..errors import UsageError
from ..native.copy import CopyEngine
from ..native.ioloop import IOLoop
from .matrix import Case
from .fiojson import parse_fio
from .measure import ExtResult, ToolError, measure_inproc, run_external
from .stats import Sample
from .workspace import Env

# -- contenders ----------------------------------------------------------------
class Contender(abc.ABC):
    """One way of doing a case's work.

    ``name``: the label in the table. ``available()``: None, or why the tool
    cannot run on this machine (the note says so, no row). ``skip(case)``:
    None, or why it cannot do this case (e.g. dd has one stream only).
    ``io(case)``: 'direct' or 'buffered', what it really does. ``run()``:
    one measured run; raises ToolError when the tool fails."""

    name = "?"

    def available(self) -> str | None:
        return None

    def skip(self, case: Case) -> str | None:
        return None

    def io(self, case: Case) -> str:
        return "direct" if case.direct else "buffered"

    def files(self, case: Case, env: Env) -> list[str]:
        return [env.src_image, env.dst_image(self.name)] if case.workload == "copy" \
            else [env.data_file]

    @abc.abstractmethod
    def run(self, case: Case, env: Env, progress: Callable[[int, int], None]) -> Sample:
        """One measured run of ``case``."""


def run_seed(seed: int, run: int) -> int:
    """The C loop's seed for the ``run``-th run (0, 1, ...) of a bench with
    ``--seed`` ``seed``: splitmix64 of both, so every run draws its own
    offsets, and runs of benches with nearby seeds do not line up."""
    def mix(z: int) -> int:
        z = (z + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return z ^ (z >> 31)
    return mix(mix(seed & 0xFFFFFFFFFFFFFFFF) ^ run)


class Blkjobs(Contender):
    """blkjobs itself: the C loops of csrc/ioloop.c, and for copy the copy
    engine of `blkjobs convert` (sparse source, zero detection at 4 KiB,
    fresh target known to read as zeroes).

    Every run of the loops has its own seed (:func:`run_seed`: the bench's
    seed and the run's number), so a random run reads or writes offsets of
    its own, as fio's runs do (``--randrepeat=0``), not the ones the warm-up
    run has just brought into the caches below the file (the host's, the
    device's): with one seed for all, every measured run repeated its
    warm-up's requests, in order."""

    name = "blkjobs"

    def __init__(self) -> None:
        self.runs = 0       # loop runs so far: the next run's number

    def run(self, case, env, progress):
        flags = os.O_DIRECT if case.direct else 0
        if case.workload == "copy":
            return self._copy(case, env, flags, progress)
        fd = os.open(env.data_file, (os.O_RDWR if case.writes else os.O_RDONLY) | flags)
        seed = run_seed(env.seed, self.runs)
        self.runs += 1
        try:
            with IOLoop(fd, write=case.writes, random=case.random, bs=case.bs,
                        size=env.size, threads=case.threads, runtime_s=env.runtime,
                        fsync=True, seed=seed, path=env.data_file) as loop:
                def go():
                    r = loop.run(progress=progress)
                    return r.bytes, r.ops, r.elapsed_ns / 1e9
                return replace(measure_inproc(go), latency=loop.latency())
        finally:
            os.close(fd)

    def _copy(self, case, env, flags, progress):
        dst = env.dst_image(self.name)
        src_fd = os.open(env.src_image, os.O_RDONLY | flags)
        try:
            def go():
                t0 = env.clock()
                dst_fd = os.open(dst, os.O_CREAT | os.O_TRUNC | os.O_WRONLY | flags, 0o600)
                try:
                    os.ftruncate(dst_fd, env.size)
                    with CopyEngine(src_fd, dst_fd, threads=case.threads, request_size=case.bs,
                                    max_in_flight=max(64 << 20, case.threads * case.bs),
                                    zero_block=4096, target_is_zero=True,
                                    src_path=env.src_image, dst_path=dst) as eng:
                        eng.add_copy(0, 0, env.size, sparse=True)
                        eng.run_to_end(progress=lambda done, total: progress(done, 0))
                    os.fsync(dst_fd)
                finally:
                    os.close(dst_fd)
                return env.size, 0, env.clock() - t0
            return measure_inproc(go)
        finally:
            os.close(src_fd)


class External(Contender):
    """A tool run as a process; timed around the process (exec and exit
    included, a millisecond or two) unless it reports its own time."""

    binary = ""

    def available(self):
        return None if shutil.which(self.binary) else f"{self.binary} is not installed"

    @abc.abstractmethod
    def argv(self, case: Case, env: Env) -> list[list[str]]:
        """The command lines of one run of ``case``."""

    def before(self, case: Case, env: Env) -> None:
        if case.workload == "copy":
            try:
                os.unlink(env.dst_image(self.name))
            except FileNotFoundError:
                pass

    def parse(self, res: ExtResult, case: Case, env: Env) -> tuple[int, int, float]:
        """(bytes, requests, seconds) of a successful run; requests 0 = unknown."""
        return env.size, 0, res.elapsed_s

    def run(self, case, env, progress):
        self.before(case, env)
        total = None
        for argv in self.argv(case, env):
            r = run_external(argv, env.clock)
            if r.rc != 0:
                msg = (r.err.strip() or r.out.strip()).splitlines()
                raise ToolError(f"{os.path.basename(argv[0])} failed (exit {r.rc}): "
                                f"{msg[-1] if msg else ''}")
            if total is None:
                total = r
            else:  # e.g. cp then sync: add the second command's time
                total = ExtResult(0, total.elapsed_s + r.elapsed_s, total.cpu_s + r.cpu_s,
                                  max(total.rss_bytes, r.rss_bytes), total.out, total.err,
                                  (total.block_io[0] + r.block_io[0],
                                   total.block_io[1] + r.block_io[1]))
        assert total is not None, "a contender runs at least one command"
        return self.sample(total, case, env)

    def sample(self, res: ExtResult, case: Case, env: Env) -> Sample:
        nbytes, ops, elapsed = self.parse(res, case, env)
        return Sample(nbytes, ops, elapsed, res.cpu_s, res.rss_bytes, block_io=res.block_io)


class Fio(External):
    """fio with the psync engine, one job per thread (``--thread``): the same
    mechanism as blkjobs' loops. Sequential jobs each take 1/N of the file
    (offset_increment); random jobs each do 1/N of the requests over the
    whole file, offsets drawn with repeats (norandommap). Writes keep one
    buffer (scramble_buffers=0), as the C loops do, and fsync at the end
    (end_fsync). Figures are fio's own (io_bytes / runtime, end_fsync
    included), so its start-up and layout are not counted; fio's runtime has
    1 ms resolution. ``--output-format=json+`` gives its completion latency
    histogram (clat_ns bins), summarised as the C loops' is, and its own
    disk_util."""

    name = binary = "fio"

    def skip(self, case):
        return "no copy workload" if case.workload == "copy" else None

    def argv(self, case, env):
        rw = {"seqread": "read", "seqwrite": "write", "randread": "randread",
              "randwrite": "randwrite"}[case.workload]
        n = case.threads
        a = ["fio", "--name=blkjobs-bench", f"--filename={env.data_file}", f"--rw={rw}",
             f"--bs={case.bs}", f"--direct={int(case.direct)}", "--ioengine=psync",
             "--thread", f"--numjobs={n}", "--group_reporting", "--output-format=json+",
             f"--invalidate={int(env.cache.cold and not case.direct)}", "--randrepeat=0",
             "--norandommap", "--allow_file_create=0"]
        per_job = env.size // n // case.bs * case.bs
        if case.random:
            a += [f"--size={env.size // case.bs * case.bs}", f"--io_size={per_job}"]
        else:
            a += [f"--size={per_job}", f"--offset_increment={per_job}"]
        if case.writes:
            a += ["--end_fsync=1", "--scramble_buffers=0"]
        if env.runtime:
            a += ["--time_based", f"--runtime={env.runtime}s"]
        return [a]

    def sample(self, res, case, env):
        f = parse_fio(res.out, case.writes)
        # fio counts runtime in whole ms: a run under 1 ms says 0, then
        # only the time around the process is left.
        elapsed = f.runtime_ms / 1000.0 or res.elapsed_s
        return Sample(f.io_bytes, f.total_ios, elapsed, res.cpu_s, res.rss_bytes,
                      latency=f.latency, tool_disk=f.disk_util[0] if f.disk_util else None,
                      block_io=res.block_io)


class Dd(External):
    """GNU dd: one stream, so only at one thread; sequential only. Writes
    zeroes from /dev/zero (no file system here compresses them) with
    conv=fsync; copy uses conv=sparse."""

    name = binary = "dd"

    def skip(self, case):
        if case.threads != 1:
            return "one stream only: runs at --threads 1"
        if case.random:
            return "no random workloads"
        return None

    def argv(self, case, env):
        count = env.size // case.bs
        base = ["dd", f"bs={case.bs}", "status=none"]
        if case.workload == "seqread":
            return [base + [f"if={env.data_file}", "of=/dev/null", f"count={count}"]
                    + (["iflag=direct"] if case.direct else [])]
        if case.workload == "seqwrite":
            return [base + ["if=/dev/zero", f"of={env.data_file}", f"count={count}",
                            "conv=notrunc,fsync"] + (["oflag=direct"] if case.direct else [])]
        return [base + [f"if={env.src_image}", f"of={env.dst_image(self.name)}",
                        "conv=sparse,fsync"]
                + (["iflag=direct", "oflag=direct"] if case.direct else [])]

    def parse(self, res, case, env):
        if case.workload == "copy":
            return env.size, 0, res.elapsed_s
        count = env.size // case.bs
        return count * case.bs, count, res.elapsed_s


class QemuImg(External):
    """qemu-img: ``bench`` for sequential read/write (depth = threads, Linux
    AIO with O_DIRECT, a thread pool otherwise; one flush at the end of a
    write run; its own 'Run completed in' time), ``convert`` for copy
    (-m threads coroutines, -W out-of-order writes, then `sync FILE`)."""

    name = binary = "qemu-img"

    def skip(self, case):
        return "no random workloads (qemu-img bench is sequential)" if case.random else None

    def argv(self, case, env):
        cache = "none" if case.direct else "writeback"
        if case.workload == "copy":
            return [["qemu-img", "convert", "-f", "raw", "-O", "raw", "-t", cache, "-T", cache,
                     "-m", str(min(case.threads, 16)), "-W", env.src_image,
                     env.dst_image(self.name)],
                    ["sync", env.dst_image(self.name)]]
        count = env.size // case.bs
        a = ["qemu-img", "bench", "-f", "raw", "-t", cache,
             "-i", "native" if case.direct else "threads", "-c", str(count),
             "-d", str(case.threads), "-s", str(case.bs)]
        if case.writes:
            a += ["-w", f"--flush-interval={count}"]
        return [a + [env.data_file]]

    def parse(self, res, case, env):
        if case.workload == "copy":
            return env.size, 0, res.elapsed_s
        count = env.size // case.bs
        for line in res.out.splitlines():
            if line.startswith("Run completed in"):
                # ms resolution: a sub-ms run says 0.000, then use the wall time
                return count * case.bs, count, float(line.split()[3]) or res.elapsed_s
        return count * case.bs, count, res.elapsed_s


class Cp(External):
    """cp --sparse=always, then `sync FILE` (cp itself never fsyncs). Always
    buffered: cp has no O_DIRECT."""

    name = binary = "cp"

    def skip(self, case):
        return None if case.workload == "copy" else "copy workload only"

    def io(self, case):
        return "buffered"

    def argv(self, case, env):
        dst = env.dst_image(self.name)
        return [["cp", "--sparse=always", env.src_image, dst], ["sync", dst]]


class Nbdcopy(External):
    """nbdcopy (libnbd) between local files: --threads, --request-size,
    --flush; the target is created empty first (untimed) and declared
    zero, as blkjobs and qemu-img know theirs is."""

    name = binary = "nbdcopy"

    def skip(self, case):
        return None if case.workload == "copy" else "copy workload only"

    def io(self, case):
        return "buffered"

    def before(self, case, env):
        dst = env.dst_image(self.name)
        with open(dst, "wb") as f:
            f.truncate(env.size)

    def argv(self, case, env):
        return [["nbdcopy", f"--threads={case.threads}", f"--request-size={case.bs}",
                 "--flush", "--destination-is-zero", env.src_image,
                 env.dst_image(self.name)]]


TOOLS = {c.name: c for c in (Fio, Dd, QemuImg, Cp, Nbdcopy)}


def parse_compare(text: str | None) -> list[str]:
    if not text:
        return []
    if text == "all":
        return list(TOOLS)
    out = []
    for t in text.split(","):
        t = t.strip()
        if t not in TOOLS:
            raise UsageError(f"unknown --compare tool '{t}': choose from "
                             f"{', '.join(TOOLS)} or all")
        if t not in out:
            out.append(t)
    return out

