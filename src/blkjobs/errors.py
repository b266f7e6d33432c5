"""The exception tree of blkjobs. Every error we raise on purpose derives from
:class:`BlkjobsError`, so callers (and the CLI's one choke point) can catch it
and print one line. ``exit_code`` is a class attribute of the tree: the exit
status of the ``blkjobs`` command when the error ends it (1 unless said)::

    BlkjobsError                              exit 1
     ├── OSErrorWithContext                   an errno from the C core or a syscall
     │    └── CopyError                       a copy request failed (side = source | target)
     ├── Cancelled                            the operation was cancelled (ECANCELED)
     ├── ImageError                           malformed, corrupt or unsupported image
     │    ├── CheckNotSupported               exit 63: the format has no checks (qemu-img's 63)
     │    ├── NotSupported                    formats.base: a driver lacks the capability asked for
     │    ├── NotAnImageFile                  (raised by formats.cache.open_file) not a file or device an image can be
     │    ├── FormatOpenError                 formats.base: a format driver refuses to open (QEMU's reason)
     │    ├── CryptoOpenError                 formats.base (raised by formats.luks): an encrypted image without its key (QEMU's text)
     │    ├── NbdConnectError                 native.nbd: could not connect to an NBD server
     │    ├── SnapshotError                   formats.qcow2.snapshot_ops: errno as QEMU's (EINVAL...)
     │    ├── SnapshotTableError              formats.qcow2.snapshots: a snapshot table refused at open
     │    └── AmendError                      formats.qcow2.amend: an option that cannot be amended
     ├── NbdIOError (also OSError)            native.nbd: an NBD request failed (errno, libnbd's text)
     │    └── NbdCopyError                    native.nbd: a file <-> export copy failed (side, offset)
     ├── UsageError (also ValueError)         bad argument values (sizes, rates, options)
     ├── PermissionConflict                   graph.perm: a permission or lock is held elsewhere
     │    └── LockConflict                    graph.lock: another process holds QEMU's lock bytes
     ├── JobError                             job/verb refusals; str(e) is QMP's text, qmp_class its class
     │    ├── DeviceNotActive                 job.manager: no such block job
     │    └── DeviceNotFound                  jobs.commit: no such device
     ├── QMPError                             daemon.protocol: a QMP command's error (desc, cls)
     ├── JobFailed                            cli.cmd_backup: a job command's job did not complete;
     │                                        exit 1 failed, 2 cancelled, 130/143 interrupted
     ├── ToolError                            diskbench.measure: an external tool failed
     ├── ReadFailed                           imageops.compare: exit 4, a read failed (qemu-img's)
     ├── NBDRequestError                      nbd.proto: an NBD request failed (errno: the reply's)
     └── InternalError                        exit 70: a bug in blkjobs (printed as "internal error")
          └── IllegalTransition (also RuntimeError)   job.status: an edge outside the job matrix

and, outside the tree on purpose, :class:`Terminated` (a ``KeyboardInterrupt``):
SIGTERM in the command line, which must unwind like Ctrl-C and not be caught
by ``except BlkjobsError`` or ``except Exception``; and
``cli.opts_help.OptionsHelp``, not an error: ``-o help`` with the operands
left out ends the parsing early to print the option list.
"""
from __future__ import annotations

import errno as _errno
import os


class BlkjobsError(Exception):
    """Root of every error blkjobs raises on purpose."""

    #: The ``blkjobs`` command's exit status when this error ends it.
    exit_code: int = 1


class InternalError(BlkjobsError):
    """A bug in blkjobs: an invariant did not hold. The command line prints
    it as an internal error and exits 70 (``EX_SOFTWARE``)."""

    exit_code = 70


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread by the command line's handler. It
    unwinds as Ctrl-C does (jobs cancelled, files made removed, one line
    saying so) and the command exits 143 (128 + SIGTERM) instead of 130."""


#: The stop signal (2: SIGINT, 15: SIGTERM) whose exception the command
#: line's handler raised and nothing has handled yet (0: none). Python drops
#: an exception raised inside a finalizer (``__del__``: "Exception ignored
#: in ...") -- a signal arriving while one runs would be lost and the
#: command run on to its end. So the handler notes it, a long loop asks
#: :func:`raise_pending_stop` on each turn, and what handles the exception
#: takes it (:func:`take_stop`).
_stop_pending = 0


def note_stop(sig: int) -> None:
    global _stop_pending
    _stop_pending = sig


def take_stop() -> int:
    """The stop signal noted and not yet handled (0: none); forgets it."""
    global _stop_pending
    sig, _stop_pending = _stop_pending, 0
    return sig


def raise_pending_stop(note: str | None = None) -> None:
    """Raise again the stop whose exception was dropped (see ``_stop_pending``)."""
    if _stop_pending:
        args = () if note is None else (note,)
        raise Terminated(*args) if _stop_pending == 15 else KeyboardInterrupt(*args)


class UsageError(BlkjobsError, ValueError):
    """An argument has an invalid value."""


class ImageError(BlkjobsError):
    """An image is malformed, corrupt, or uses an unsupported feature."""


class NotAnImageFile(ImageError):
    """The path names something other than a regular file or a block device
    (a FIFO, socket, character device, directory): never opened as an image,
    since reading a FIFO or a tty can block forever."""


class CheckNotSupported(ImageError):
    """``check`` of a format that has no consistency checks (raw): qemu-img
    exits 63 for it."""

    exit_code = 63


class JobError(BlkjobsError):
    """A job or job verb was refused; ``str(e)`` is the QMP error text."""

    qmp_class = "GenericError"


class OSErrorWithContext(BlkjobsError):
    """An errno, with what was being done when it happened."""

    def __init__(self, err: int | None, what: str = "", path: str | None = None,
                 side: str | None = None, offset: int | None = None):
        # err None: an OSError raised without an errno (OSError("text")), a
        # failed I/O all the same
        self.errno = _errno.EIO if err is None else abs(err)
        self.what = what
        self.path = path
        self.side = side
        self.offset = offset
        super().__init__(self._text())

    def _text(self) -> str:
        msg = os.strerror(self.errno)
        where = ""
        if self.side:
            where = self.side
        if self.path:
            where = f"{where} '{self.path}'" if where else f"'{self.path}'"
        if self.offset is not None:
            where += f" at offset {self.offset}"
        head = " ".join(p for p in (self.what, where.strip()) if p)
        return f"{head}: {msg}" if head else msg


class CopyError(OSErrorWithContext):
    """A copy request failed on the source (read) or the target (write)."""


class Cancelled(BlkjobsError):
    """The operation was cancelled."""

    def __init__(self, what: str = "Operation canceled"):
        super().__init__(what)


def from_errno(err: int, what: str = "", path: str | None = None, side: str | None = None,
               offset: int | None = None) -> BlkjobsError:
    """Map a negative errno from the C core to the right exception."""
    e = abs(err)
    if e == _errno.ECANCELED:
        return Cancelled()
    return OSErrorWithContext(e, what, path=path, side=side, offset=offset)


#: the name warnings start with: the command line sets it to the name it was
#: invoked as (QEMU's tools say ``qemu-img: warning: ...``)
program_name = "blkjobs"


def warn_report(text: str, more: str = "") -> None:
    """A warning on stderr as QEMU's ``warn_report`` (and ``error_printf``
    ``more`` after it). QEMU ends ``more`` without a newline; so does this
    under QEMU's name (scripts compare the bytes), else the line is ended."""
    import sys
    end = "" if program_name == "qemu-img" or not more else "\n"
    sys.stderr.write(f"{program_name}: warning: {text}\n{more}{end}")
    sys.stderr.flush()
