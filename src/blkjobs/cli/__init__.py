"""Command line (``blkjobs``), in qemu-img's conventions.

Each ``cmd_<name>.py`` module here defines one subcommand with
``register(subparsers)``; :mod:`blkjobs.cli.main` discovers them, so adding a
command touches no other file. Here too: the program's name, and the
progress outputs of the copying commands without a progress output
(:func:`progress_reporter`).
"""
from __future__ import annotations

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    import signal as _signal
    from collections.abc import Callable
    from typing import Any
else:
    import _signal      # signal's calls without its enums (the interpreter loaded it)

_progname = "blkjobs"


def progname() -> str:
    """The name messages start with: as QEMU's tools, the name the program
    was invoked as (a symlink named ``qemu-img`` says ``qemu-img:``)."""
    return _progname


def set_progname(argv0: str) -> None:
    """Take the name from ``argv[0]`` (``python -m blkjobs`` stays ``blkjobs``)."""
    global _progname
    base = argv0.rsplit("/", 1)[-1]
    _progname = base if base and not base.endswith(".py") else "blkjobs"
    from .. import errors
    errors.program_name = _progname


def progress_reporter(args, make: Callable[[], Any]) -> Any:
    """A command's progress outputs: ``make()``, the command's
    :class:`.copy_progress.Reporter` of its progress options; without a
    progress output (no -p, --progress-json, --progress-fd, or -q) a
    :class:`SignalOnly` stands for it, and :mod:`.copy_progress` is not
    imported (start-up: a convert's copy, a compare's reads start sooner).
    (``make`` imports it: every module here imports this package, which
    so imports none of them.)"""
    g = vars(args).get      # (as Reporter reads them: a namespace may lack one)
    if g("progress_fd") is None and (args.quiet or not (g("progress") or g("progress_json"))):
        return SignalOnly(make)
    return make()


class SignalOnly:
    """What a Reporter without outputs does (a line on stderr for each
    SIGUSR1, the command carrying on, as qemu-img's), without importing
    :mod:`.copy_progress` until a SIGUSR1 is pending: the Reporter is made
    then (``make()``), and takes it at once."""

    def __init__(self, make: Callable[[], Any]):
        self.make = make
        self.rep: Any = None
        self.done = self.total = 0

    def _reporter(self) -> Any:
        """The Reporter, made when a SIGUSR1 is first pending (else None)."""
        if self.rep is None and _signal.SIGUSR1 in _signal.sigpending():
            self.rep = self.make()
            self.rep.done, self.rep.total = self.done, self.total
        return self.rep

    def update(self, done: int, total: int) -> None:
        self.done, self.total = done, max(total, done)
        rep = self._reporter()
        if rep is not None:
            rep.update(done, total)

    def finish(self) -> None:
        rep = self._reporter()
        if rep is not None:
            rep.finish()

    def close(self) -> None:
        """Nothing to undo (as Reporter.close)."""
