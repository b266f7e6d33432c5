"""Progress reporting for humans (``-p``: on stdout as qemu-img's; one live
line on a terminal, plain lines otherwise; invoked as ``qemu-img``: exactly
qemu-img's lines, :class:`QemuLines`) and programs (``--progress-json``:
JSON lines on stderr; ``--progress-fd N``: nbdcopy's ``N/100`` lines on fd
N). SIGUSR1 prints one progress line on stderr (without -p) and the command
carries on, as qemu-img does. Progress counts completed bytes; the total may grow. The
clock is injectable so rate and ETA can be tested exactly.

(``blkjobs bench`` shows its stages with another kind of line:
:mod:`blkjobs.diskbench.status_line`.)"""
from __future__ import annotations

import os
import sys
import time

from ..units import human

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    import signal as _signal
    from collections.abc import Callable
    from typing import Any, TextIO
else:
    import _signal      # signal's calls without its enums (start-up)


class CopyProgress:
    """Call ``update(done, total)`` as often as you like; output is throttled
    to ``interval`` seconds. ``finish()`` prints the final line."""

    def __init__(self, stream: TextIO | None = None, interval: float = 0.2,
                 now: Callable[[], float] = time.monotonic, json_lines: bool = False,
                 label: str = "", tty: bool | None = None, fd_lines: bool = False):
        self.stream = stream if stream is not None else sys.stdout
        # a live line (\r, ESC[K) only on a terminal; plain lines elsewhere
        self.tty = _isatty(self.stream) if tty is None else tty
        self.fd_lines = fd_lines       # nbdcopy's --progress=FD: "N/100" lines
        self._last_pct = -1
        self.interval = interval
        self.now = now
        self.json_lines = json_lines
        self.label = label
        self.start = now()
        self._last = -1e9
        self._samples: list[tuple[float, int]] = []
        self.done = 0
        self.total = 0

    def rate(self) -> float:
        """Bytes/s over the last ~2 s of samples (whole run if shorter)."""
        if len(self._samples) < 2:
            t = self.now() - self.start
            return self.done / t if t > 0 else 0.0
        t0, d0 = self._samples[0]
        t1, d1 = self._samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0

    def eta(self) -> float | None:
        r = self.rate()
        if r <= 0 or self.total <= self.done:
            return None
        return (self.total - self.done) / r

    def update(self, done: int, total: int, force: bool = False) -> None:
        self.done, self.total = done, max(total, done)
        t = self.now()
        self._samples.append((t, done))
        while len(self._samples) > 2 and t - self._samples[0][0] > 2.0:
            self._samples.pop(0)
        if not force and t - self._last < self.interval:
            return
        self._last = t
        self._emit(final=False)

    def line(self) -> str:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = self.eta()
        eta_s = "--:--" if eta is None else f"{int(eta) // 60:02d}:{int(eta) % 60:02d}"
        label = f"{self.label} " if self.label else ""
        return (f"{label}({pct:.2f}/100%) {human(self.done)} of {human(self.total)}, "
                f"{human(self.rate())}/s, ETA {eta_s}")

    def record(self, final: bool = False) -> dict[str, Any]:
        return {"done": self.done, "total": self.total, "rate": round(self.rate()),
                "elapsed": round(self.now() - self.start, 3), "final": final}

    def _emit(self, final: bool) -> None:
        if self.json_lines:
            import json         # here: --progress-json only (start-up time)
            self.stream.write(json.dumps(self.record(final)) + "\n")
        elif self.fd_lines:
            pct = 100 * self.done // self.total if self.total else 100
            if pct == self._last_pct:
                return
            self._last_pct = pct
            self.stream.write(f"{pct}/100\n")
        elif self.tty:
            self.stream.write("\r" + self.line() + ("\n" if final else "\x1b[K"))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def finish(self) -> None:
        self._emit(final=True)


def _as_qemu_img() -> bool:
    from . import progname
    return progname() == "qemu-img"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def add_progress_options(p, what: str = "the copy") -> None:
    """-p, --progress-json, --progress-fd N (the options of every long command)."""
    p.add_argument("-p", dest="progress", action="store_true",
                   help=f"show the progress of {what} on stdout (a live line on a terminal, "
                   "plain lines otherwise); SIGUSR1 prints one line without -p too")
    p.add_argument("--progress-json", action="store_true",
                   help="progress as JSON lines on stderr (for programs): done, total, "
                   "rate, elapsed, final")
    p.add_argument("--progress-fd", type=int, metavar="N",
                   help="write progress as 'N/100' lines to file descriptor N (as nbdcopy's "
                   "--progress=FD)")


class QemuLines:
    """``-p`` when invoked as ``qemu-img``: qemu-img's own lines, exactly
    (``    (25.00/100%)`` ended by ``\\r``, a newline at the end, on a terminal
    or not), so that whatever parses qemu-img's output parses ours.

    Like qemu-img, a line is printed when the percentage moved by more than
    1 point, and at 0 and 100 (100 twice: the last chunk, then the end).
    ``plan``: the cumulative ends of qemu-img's copy chunks (convert counts
    only allocated data, in chunks of at most 2 MiB; see
    :func:`qemu_convert_plan`); the percentage then steps at those chunks,
    each printed once the copy has certainly passed it (the bytes done
    less every byte that is not data). Without a plan: bytes done of the
    total."""

    def __init__(self, stream: TextIO | None = None, plan: list[int] | None = None):
        self.stream = stream if stream is not None else sys.stdout
        self.plan = plan
        self.data = plan[-1] if plan else 0
        self._next = 0
        self._last = 0.0
        self._print(0.0)

    def _print(self, cur: float) -> None:
        if cur > self._last + 1.0 or cur < self._last - 1.0 or cur in (0.0, 100.0):
            self._last = cur
            self.stream.write(f"    ({cur:.2f}/100%)\r")
            self.stream.flush()

    def update(self, done: int, total: int) -> None:
        if self.plan is None:
            if total:
                self._print(min(100.0, 100.0 * done / total))
            return
        passed = done - (max(total, done) - self.data)
        while self._next < len(self.plan) and self.plan[self._next] <= passed:
            self._print(100.0 * self.plan[self._next] / self.data)
            self._next += 1

    def finish(self) -> None:
        if self.plan is not None:
            self.update(1, 1)
        self._print(100.0)
        self.stream.write("\n")
        self.stream.flush()


def qemu_convert_plan(runs, zeros_too: bool) -> list[int]:
    """qemu-img convert's progress chunks: ``runs`` are block status runs
    (``length``, ``data``, ``zero``) of the sources in order; data runs (zero
    ones too with ``-S 0``) count, split into chunks of at most 2 MiB.
    Returns the cumulative ends."""
    out, pos = [], 0
    for r in runs:
        if not (r["data"] or (zeros_too and r["zero"])):
            continue
        n = r["length"]
        while n > 0:
            k = min(n, 2 << 20)
            pos += k
            out.append(pos)
            n -= k
    return out


def take_sigusr1() -> bool:
    """Whether a SIGUSR1 is pending (``main`` holds it blocked); takes it."""
    try:
        if _signal.SIGUSR1 not in _signal.sigpending():
            return False
        _signal.sigtimedwait([_signal.SIGUSR1], 0)
    except (AttributeError, OSError):
        return False
    return True


def signal_line(pct: float) -> None:
    """qemu-img's line for a SIGUSR1 (its progress meter without -p): on
    stderr, ``    (12.50/100%)``."""
    sys.stderr.write(f"    ({pct:3.2f}/100%)\n")
    sys.stderr.flush()


class Reporter:
    """The progress outputs a command's options ask for, fed together; and
    as qemu-img without -p (-q too), a SIGUSR1 prints one line on stderr
    (``    (12.50/100%)``) at the next update or at the end, and the command
    carries on (with -p the signal is left alone, as qemu-img's)."""

    def __init__(self, args=None, label: str = "", quiet: bool = False,
                 plan: Callable[[], list[int] | None] | None = None):
        """``plan`` (convert): invoked as ``qemu-img``, ``-p`` prints
        :class:`QemuLines` at the chunks it returns. The other commands keep
        the richer line under either name: it holds qemu-img's
        ``(P/100%)`` too, so the same pattern finds the percentage."""
        self.outs: list[Any] = []
        self.done = self.total = 0
        self._usr1 = not (args is not None and not quiet and getattr(args, "progress", False))
        if args is not None and not quiet:
            if getattr(args, "progress", False) and plan is not None and _as_qemu_img():
                self.outs.append(QemuLines(plan=plan()))
            elif getattr(args, "progress", False):
                self.outs.append(CopyProgress(label=label))
            if getattr(args, "progress_json", False):
                self.outs.append(CopyProgress(sys.stderr, json_lines=True))
        fd = getattr(args, "progress_fd", None) if args is not None else None
        if fd is not None:
            try:
                stream = os.fdopen(fd, "w", closefd=False)
                os.fstat(fd)
            except (OSError, ValueError):
                from ..errors import UsageError
                raise UsageError(f"--progress-fd {fd}: not an open file descriptor") from None
            self.outs.append(CopyProgress(stream, fd_lines=True))

    def update(self, done: int, total: int) -> None:
        self.done, self.total = done, max(total, done)
        for o in self.outs:
            o.update(done, total)
        if self._usr1 and take_sigusr1():
            self.signal_line()

    def signal_line(self) -> None:
        signal_line(min(100.0, 100.0 * self.done / self.total) if self.total else 0.0)

    def finish(self) -> None:
        for o in self.outs:
            o.finish()
        if self._usr1 and take_sigusr1():      # qemu-img's last print: at 100%
            signal_line(100.0)
        self.close()

    def close(self) -> None:
        """Nothing to undo (kept for the callers' try/finally)."""
