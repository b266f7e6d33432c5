"""Measuring one run: CPU time, peak RSS and wall time of work done in this
process (:func:`measure_inproc`) or by an external tool under GNU time
(:func:`run_external`)."""
from __future__ import annotations

import os
import resource
import subprocess
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

