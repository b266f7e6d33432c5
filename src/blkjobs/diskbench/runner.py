"""Running the matrix: the scratch directory, the files, the contenders and
the schedule.

For every case of the matrix each contender (blkjobs itself first, then the
tools of ``--compare``) runs ``warmup + repeat`` times, interleaved round by
round and in a rotated order each round (A B C, B C A, C A B, ...), so drift
over time (writeback, thermal, a neighbour's job) hits every contender alike;
warm-up rounds are discarded. Everything it creates lives in one scratch
directory under DIR, removed at the end, on error and on Ctrl-C (SIGINT and
SIGTERM) unless ``keep``.

Time enters through ``clock`` (seconds, monotonic) so the scheduling, the
timing of external tools and the progress line are tested with a fake clock;
the C loops time themselves (CLOCK_MONOTONIC, from the first request to the
last completion and fsync).
"""
from __future__ import annotations

import abc
import errno
import json
import mmap
import os
import random
import resource
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import BlkjobsError, UsageError
from ..native.ioloop import IOLoop
from ..native.copy import CopyEngine
from .matrix import Case, Density
from .status_line import NullStatusLine, StatusLine
from .sizes import format_bytes
from .stats import Sample, summarize

Clock = Callable[[], float]
HEADROOM = 16 << 20


# -- the scratch directory ---------------------------------------------------
class Workspace:
    """A private directory under ``base`` holding every file the benchmark
    makes; :meth:`cleanup` removes it (unless ``keep``)."""

    def __init__(self, base: str, keep: bool = False):
        self.base = base
        self.keep = keep
        if not os.path.exists(base):
            raise UsageError(f"bench directory '{base}' does not exist")
        if not os.path.isdir(base):
            raise UsageError(f"'{base}' is not a directory")
        try:
            self.path = tempfile.mkdtemp(prefix="blkjobs-bench.", dir=base)
        except OSError as e:
            if e.errno == errno.EROFS:
                raise UsageError(f"cannot write in '{base}': read-only file system") from None
            if e.errno in (errno.EACCES, errno.EPERM):
                raise UsageError(f"cannot write in '{base}': permission denied") from None
            raise

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def check_space(self, need: int) -> None:
        st = os.statvfs(self.path)
        have = st.f_bavail * st.f_frsize
        if have < need:
            raise UsageError(f"not enough free space in '{self.base}': the benchmark needs "
                             f"{format_bytes(need)}, {format_bytes(have)} available "
                             f"(use a smaller --size)")

    def probe_direct(self) -> None:
        """Fail with a clear message when the file system refuses O_DIRECT
        (open or an aligned write answers EINVAL)."""
        p = self.file("direct-probe")
        buf = mmap.mmap(-1, 4096)  # page aligned
        try:
            fd = os.open(p, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o600)
            try:
                os.pwrite(fd, buf, 0)
            finally:
                os.close(fd)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                raise UsageError(
                    f"the file system of '{self.base}' refuses O_DIRECT ({e.strerror}): run "
                    f"without --direct, or benchmark a directory on a local disk "
                    f"(tmpfs before Linux 6.6 and some FUSE/network file systems refuse it)"
                ) from None
            raise
        finally:
            buf.close()
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    def cleanup(self) -> None:
        if not self.keep:
            shutil.rmtree(self.path, ignore_errors=True)


# -- caches --------------------------------------------------------------------
class CacheControl:
    """Makes runs cold when asked. As root, ``sync`` then writing 3 to
    /proc/sys/vm/drop_caches empties the page cache, dentries and inodes of
    the whole machine. Otherwise (or when /proc/sys is read-only, as in many
    containers) posix_fadvise(POSIX_FADV_DONTNEED) drops the clean pages of
    the benchmark's own files, which is what a cold read needs; metadata
    stays cached. O_DIRECT runs bypass the cache either way."""

    DROP = "/proc/sys/vm/drop_caches"

    def __init__(self, cold: bool):
        self.cold = cold
        self.method = None
        if cold:
            self.method = "drop_caches" if self._try_drop() else "fadvise"

    def _try_drop(self) -> bool:
        if os.geteuid() != 0:
            return False
        try:
            os.sync()
            with open(self.DROP, "w") as f:
                f.write("3\n")
            return True
        except OSError:
            return False

    def label(self, direct: bool) -> str:
        if direct:
            return "bypassed"
        return f"cold:{self.method}" if self.cold else "warm"

    def note(self) -> str | None:
        if not self.cold:
            return None
        if self.method == "drop_caches":
            return "cold runs: page cache dropped (sync; echo 3 > /proc/sys/vm/drop_caches) " \
                   "before every run"
        return ("cold runs: cannot drop the system's caches (needs root and a writable "
                "/proc/sys); the benchmark files' pages are evicted with "
                "posix_fadvise(DONTNEED) before every run instead, metadata stays cached; "
                "O_DIRECT (--direct) bypasses the cache altogether")

    def before_run(self, paths: list[str]) -> None:
        if not self.cold:
            return
        if self.method == "drop_caches" and self._try_drop():
            return
        for p in paths:
            try:
                fd = os.open(p, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fdatasync(fd)  # dirty pages cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# -- measuring -----------------------------------------------------------------
def _reset_peak_rss() -> bool:
    # Linux >= 4.0: writing 5 resets VmHWM, the peak RSS, of this process.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu(ru) -> float:
    return ru.ru_utime + ru.ru_stime


def measure_inproc(fn: Callable[[], tuple[int, int, float]]) -> Sample:
    """Run fn() -> (bytes, ops, elapsed_s) in this process, adding the CPU
    time of all its threads and its peak RSS during the call."""
    _reset_peak_rss()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    nbytes, ops, elapsed = fn()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return Sample(nbytes, ops, elapsed, _cpu(r1) - _cpu(r0), _peak_rss())


@dataclass
class ExtResult:
    rc: int
    elapsed_s: float
    cpu_s: float
    rss_bytes: int
    out: str
    err: str


#: GNU time reports a tool's own peak RSS. wait4() on a child we forked would
#: count the memory it inherited from this Python process before exec.
GNU_TIME = "/usr/bin/time"


def run_external(argv: list[str], clock: Clock = time.monotonic) -> ExtResult:
    """Run a tool, timing it with ``clock``; its CPU time and peak RSS come
    from GNU time when installed (else from wait4(), whose RSS then includes
    what the child inherited from us). Killed if we are interrupted."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile("w+") as usage:
        gnu = os.access(GNU_TIME, os.X_OK)
        cmd = [GNU_TIME, "-f", "%M %U %S", "-o", usage.name] + argv if gnu else argv
        t0 = clock()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        try:
            _, status, ru = os.wait4(p.pid, 0)
        except BaseException:
            p.kill()
            p.wait()
            raise
        elapsed = clock() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        cpu, rss = _cpu(ru), ru.ru_maxrss * 1024
        if gnu:
            usage.seek(0)
            lines = usage.read().split("\n")
            fields = next((ln.split() for ln in reversed(lines) if ln.strip()), [])
            try:
                rss = int(fields[0]) * 1024
                cpu = float(fields[1]) + float(fields[2])
            except (IndexError, ValueError):
                pass      # time could not run the tool: keep wait4's figures
        out.seek(0)
        err.seek(0)
        return ExtResult(p.returncode, elapsed, cpu, rss, out.read(), err.read())


class ToolError(BlkjobsError):
    """An external tool failed; its row gets the message instead of figures."""


# -- the shared files ----------------------------------------------------------
@dataclass
class Env:
    """What contenders share: the workspace, the settings and the files."""
    ws: Workspace
    size: int
    runtime: float
    density: Density
    cache: CacheControl
    clock: Clock
    seed: int = 1
    progress: Callable[[str], None] = lambda text: None
    _laid_out: set = field(default_factory=set)

    @property
    def data_file(self) -> str:
        return self.ws.file("data.dat")

    @property
    def src_image(self) -> str:
        return self.ws.file("source.img")

    def dst_image(self, tool: str) -> str:
        return self.ws.file(f"target-{tool}.img")

    def layout_data(self) -> None:
        """Write the file the read/write workloads use, once, fully (like
        fio's layout): reads then hit allocated blocks, writes overwrite."""
        if "data" in self._laid_out:
            return
        self.progress(f"laying out {format_bytes(self.size)} test file")
        fd = os.open(self.data_file, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
        try:
            bs = min(self.size, 1 << 20) // 512 * 512
            with IOLoop(fd, write=True, random=False, bs=bs, size=self.size, threads=1,
                        fsync=True, seed=self.seed, path=self.data_file) as loop:
                loop.run()
            # a size that is not a multiple of bs: the tail too
            os.ftruncate(fd, self.size)
        finally:
            os.close(fd)
        self._laid_out.add("data")

    def layout_image(self) -> None:
        """A VM-shaped raw image: extents of 64 KiB .. 4 MiB, each data
        (random bytes), written zeroes or a hole, by the density shares."""
        if "image" in self._laid_out:
            return
        self.progress(f"laying out {format_bytes(self.size)} source image ({self.density})")
        rng = random.Random(self.seed)
        d = self.density
        fd = os.open(self.src_image, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, self.size)
            pos = 0
            zeros = bytes(1 << 20)
            while pos < self.size:
                n = min(rng.choice((64 << 10, 256 << 10, 1 << 20, 4 << 20)), self.size - pos)
                pick = rng.uniform(0, 100)
                kind = "data" if pick < d.data else "zero" if pick < d.data + d.zero else "hole"
                if kind == "hole" or n == 0:
                    pos += n
                    continue
                end = pos + n
                while pos < end:
                    m = min(1 << 20, end - pos)
                    os.pwrite(fd, rng.randbytes(m) if kind == "data" else zeros[:m], pos)
                    pos += m
            os.fsync(fd)
        finally:
            os.close(fd)
        self._laid_out.add("image")


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


class Blkjobs(Contender):
    """blkjobs itself: the C loops of csrc/ioloop.c, and for copy the copy
    engine of `blkjobs convert` (sparse source, zero detection at 4 KiB,
    fresh target known to read as zeroes)."""

    name = "blkjobs"

    def run(self, case, env, progress):
        flags = os.O_DIRECT if case.direct else 0
        if case.workload == "copy":
            return self._copy(case, env, flags, progress)
        fd = os.open(env.data_file, (os.O_RDWR if case.writes else os.O_RDONLY) | flags)
        try:
            with IOLoop(fd, write=case.writes, random=case.random, bs=case.bs,
                        size=env.size, threads=case.threads, runtime_s=env.runtime,
                        fsync=True, seed=env.seed, path=env.data_file) as loop:
                def go():
                    r = loop.run(progress=progress)
                    return r.bytes, r.ops, r.elapsed_ns / 1e9
                return measure_inproc(go)
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
                                  max(total.rss_bytes, r.rss_bytes), total.out, total.err)
        nbytes, ops, elapsed = self.parse(total, case, env)
        return Sample(nbytes, ops, elapsed, total.cpu_s, total.rss_bytes)


class Fio(External):
    """fio with the psync engine, one job per thread (``--thread``): the same
    mechanism as blkjobs' loops. Sequential jobs each take 1/N of the file
    (offset_increment); random jobs each do 1/N of the requests over the
    whole file. Figures are fio's own (io_bytes / runtime, end_fsync
    included), so its start-up and layout are not counted; fio's runtime has
    1 ms resolution."""

    name = binary = "fio"

    def skip(self, case):
        return "no copy workload" if case.workload == "copy" else None

    def argv(self, case, env):
        rw = {"seqread": "read", "seqwrite": "write", "randread": "randread",
              "randwrite": "randwrite"}[case.workload]
        n = case.threads
        a = ["fio", "--name=blkjobs-bench", f"--filename={env.data_file}", f"--rw={rw}",
             f"--bs={case.bs}", f"--direct={int(case.direct)}", "--ioengine=psync",
             "--thread", f"--numjobs={n}", "--group_reporting", "--output-format=json",
             f"--invalidate={int(env.cache.cold and not case.direct)}", "--randrepeat=0",
             "--norandommap", "--allow_file_create=0"]
        per_job = env.size // n // case.bs * case.bs
        if case.random:
            a += [f"--size={env.size // case.bs * case.bs}", f"--io_size={per_job}"]
        else:
            a += [f"--size={per_job}", f"--offset_increment={per_job}"]
        if case.writes:
            a.append("--end_fsync=1")
        if env.runtime:
            a += ["--time_based", f"--runtime={env.runtime}s"]
        return [a]

    def parse(self, res, case, env):
        text = res.out[res.out.find("{"):]
        try:
            job = json.loads(text)["jobs"][0]
            part = job["write" if case.writes else "read"]
            # fio counts runtime in whole ms: a run under 1 ms says 0, then
            # only the time around the process is left.
            elapsed = part["runtime"] / 1000.0 or res.elapsed_s
            return int(part["io_bytes"]), int(part["total_ios"]), elapsed
        except (ValueError, KeyError, IndexError) as e:
            raise ToolError(f"cannot read fio's JSON output: {e}") from None


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


# -- the schedule --------------------------------------------------------------
def schedule(n_contenders: int, warmup: int, repeat: int) -> list[tuple[int, int, bool]]:
    """(round, contender index, measured?) in run order: every round runs
    every contender once, starting one further each round."""
    out = []
    for r in range(warmup + repeat):
        for k in range(n_contenders):
            out.append((r, (r + k) % n_contenders, r >= warmup))
    return out


@dataclass
class Settings:
    dir: str
    cases: list[Case]
    size: int = 256 << 20
    runtime: float = 0.0
    repeat: int = 5
    warmup: int = 1
    cold: bool = False
    density: Density = field(default_factory=Density)
    compare: list[str] = field(default_factory=list)
    keep: bool = False
    seed: int = 1


@dataclass
class Row:
    case: Case
    tool: str
    io: str
    cache: str
    samples: list[Sample] = field(default_factory=list)
    error: str | None = None


class Runner:
    """Runs the matrix of ``settings``; :meth:`run` returns (rows, notes)."""

    def __init__(self, settings: Settings, *, clock: Clock = time.monotonic,
                 progress: StatusLine | None = None,
                 contenders: list[Contender] | None = None,
                 cache: CacheControl | None = None):
        self.s = settings
        self.clock = clock
        self.progress = progress or NullStatusLine()
        self.contenders = contenders
        self.cache = cache
        self.notes: list[str] = []

    def _contenders(self) -> list[Contender]:
        if self.contenders is not None:
            return self.contenders
        out: list[Contender] = [Blkjobs()]
        for name in self.s.compare:
            c = TOOLS[name]()
            why = c.available()
            if why:
                self.notes.append(f"--compare: {why}: left out")
            else:
                out.append(c)
        return out

    def need_bytes(self) -> int:
        s = self.s
        need = HEADROOM
        if any(c.workload != "copy" for c in s.cases):
            need += s.size
        if any(c.workload == "copy" for c in s.cases):
            need += s.size * (s.density.data + s.density.zero) // 100 + s.size
        return need

    def run(self) -> tuple[list[Row], list[str]]:
        s = self.s
        ws = Workspace(s.dir, keep=s.keep)
        try:
            ws.check_space(self.need_bytes())
            if any(c.direct for c in s.cases):
                ws.probe_direct()
            cache = self.cache or CacheControl(s.cold)
            note = cache.note()
            if note:
                self.notes.append(note)
            env = Env(ws, s.size, s.runtime, s.density, cache, self.clock, s.seed,
                      progress=self.progress.phase)
            contenders = self._contenders()
            rows = []
            skipped = set()
            for case in s.cases:
                rows.extend(self._run_case(case, env, contenders, skipped))
            self.notes.extend(sorted(skipped))
            if s.keep:
                self.notes.append(f"files kept in {ws.path}")
            return rows, self.notes
        finally:
            self.progress.done()
            ws.cleanup()

    def _run_case(self, case: Case, env: Env, contenders: list[Contender],
                  skipped: set) -> list[Row]:
        s = self.s
        if case.workload == "copy":
            env.layout_image()
        else:
            env.layout_data()
        active = []
        for c in contenders:
            why = c.skip(case)
            if why:
                skipped.add(f"{c.name}: {why}")
            else:
                active.append(c)
        self.progress.phase(case.label)
        rows = [Row(case, c.name, c.io(case), env.cache.label(c.io(case) == "direct"))
                for c in active]
        total_runs = (s.warmup + s.repeat)
        for rnd, k, measured in schedule(len(active), s.warmup, s.repeat):
            row, c = rows[k], active[k]
            if row.error:
                continue
            tag = f"{case.label}  round {rnd + 1}/{total_runs}" + \
                  ("" if measured else " (warm-up)") + f"  {c.name}"
            self.progress.step(tag)
            env.cache.before_run(c.files(case, env))
            try:
                sample = c.run(case, env, lambda done, _ops: self.progress.update(
                    format_bytes(done)))
            except ToolError as e:
                row.error = str(e)
                continue
            if measured:
                row.samples.append(sample)
        return rows


def result_dicts(rows: list[Row]) -> list[dict]:
    out = []
    for r in rows:
        d = {"case": r.case.as_dict(), "tool": r.tool, "io": r.io, "cache": r.cache,
             "error": r.error,
             "runs": [{"bytes": x.bytes, "ops": x.ops, "elapsed_s": x.elapsed_s,
                       "cpu_s": x.cpu_s, "peak_rss_bytes": x.rss_bytes} for x in r.samples],
             "summary": summarize(r.samples).as_dict() if r.samples else None}
        out.append(d)
    return out

