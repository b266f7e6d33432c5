"""Measuring one run: CPU time, peak RSS and wall time of work done in this
process (:func:`measure_inproc`) or by an external tool under GNU time
(:func:`run_external`)."""
from __future__ import annotations

import os
import resource
import signal
import tempfile
import time
from dataclasses import dataclass
from collections.abc import Callable

from ..errors import BlkjobsError
from .stats import Sample

#: seconds, monotonic (injected so that timing is tested with a fake clock)
Clock = Callable[[], float]


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


def _block_io(r0, r1) -> tuple[int, int]:
    """Bytes read and written at the block layer between two rusages (the
    kernel counts them in 512-byte units, O_DIRECT and writeback alike)."""
    return ((r1.ru_inblock - r0.ru_inblock) * 512, (r1.ru_oublock - r0.ru_oublock) * 512)


def measure_inproc(fn: Callable[[], tuple[int, int, float]]) -> Sample:
    """Run fn() -> (bytes, ops, elapsed_s) in this process, adding the CPU
    time of all its threads and its peak RSS during the call."""
    _reset_peak_rss()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    nbytes, ops, elapsed = fn()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return Sample(nbytes, ops, elapsed, _cpu(r1) - _cpu(r0), _peak_rss(),
                  block_io=_block_io(r0, r1))


@dataclass
class ExtResult:
    rc: int
    elapsed_s: float
    cpu_s: float
    rss_bytes: int
    out: str
    err: str
    #: bytes the tool (and its children) read and wrote at the block layer
    block_io: tuple[int, int] = (0, 0)


#: GNU time reports a tool's own peak RSS. wait4() on a child we forked would
#: count the memory it inherited from this Python process before exec.
GNU_TIME = "/usr/bin/time"


#: what Python or blkjobs changed that a child must not inherit: SIGUSR1
#: (blkjobs holds it blocked to print progress lines, cli.main), SIGPIPE and
#: SIGXFSZ (Python ignores them; subprocess's restore_signals resets them)
CHILD_DEFAULT_SIGNALS = frozenset({signal.SIGUSR1, signal.SIGPIPE, signal.SIGXFSZ})


def spawn(argv: list[str], stdout: int, stderr: int) -> int:
    """Start argv (looked up in PATH) in its own process group, stdin from
    /dev/null, and return its pid. The child gets the default disposition
    of SIGUSR1, SIGPIPE and SIGXFSZ and this thread's signal mask without
    SIGUSR1: a tool blkjobs runs answers SIGUSR1 as it would run alone
    (fio, dd print their progress). posix_spawn sets both in the child
    only, so no other thread of ours is touched (a preexec_fn is not safe
    with threads; restore_signals leaves the mask alone)."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    return os.posix_spawnp(
        argv[0], argv, os.environ,
        file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                      (os.POSIX_SPAWN_DUP2, stdout, 1), (os.POSIX_SPAWN_DUP2, stderr, 2)],
        setpgroup=0, setsigmask=set(mask) - {signal.SIGUSR1},
        setsigdef=CHILD_DEFAULT_SIGNALS)


def run_external(argv: list[str], clock: Clock = time.monotonic) -> ExtResult:
    """Run a tool, timing it with ``clock``; its CPU time and peak RSS come
    from GNU time when installed (else from wait4(), whose RSS then includes
    what the child inherited from us). Killed, with its process group, if
    we are interrupted."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile("w+") as usage:
        gnu = os.access(GNU_TIME, os.X_OK)
        cmd = [GNU_TIME, "-f", "%M %U %S", "-o", usage.name] + argv if gnu else argv
        t0 = clock()
        pid = spawn(cmd, out.fileno(), err.fileno())
        try:
            _, status, ru = os.wait4(pid, 0)
        except BaseException:
            try:
                os.killpg(pid, signal.SIGKILL)  # the tool too, not only GNU time
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            raise
        elapsed = clock() - t0
        rc = os.waitstatus_to_exitcode(status)
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
        zero = resource.struct_rusage((0,) * 16)
        return ExtResult(rc, elapsed, cpu, rss, out.read(), err.read(), _block_io(zero, ru))


class ToolError(BlkjobsError):
    """An external tool failed; its row gets the message instead of figures."""

