"""The NBD client binding: libnbd through the optional extension
``blkjobs._nbd`` (csrc/nbd/nbdio.c). The one importer of that extension.

:class:`Connection` is one NBD connection. Every request is issued through
libnbd's asynchronous API and driven by our own poll loop, so a server that
stops answering costs at most ``timeout`` seconds of silence (then
``ETIMEDOUT``). Large reads and writes are split into ``chunk``-sized
requests with up to ``depth`` of them in flight at once (pipelining), with the
GIL released for the whole call.

After any failure the connection is closed at once: a request still in flight
could otherwise fill a buffer the caller has reused. Later calls raise the
same error.
"""
from __future__ import annotations

import errno
import os
import sys

from ..errors import BlkjobsError, ImageError

# Loaded with lazy binding (Python dlopens extensions RTLD_NOW): libnbd and
# libstdc++ under it bind their functions when first called instead of all
# at once -- 2.7 M instructions less of the ~14 M the load costs
# (callgrind; the rest is relocating gnutls, libxml2 and ICU, built
# BIND_NOW). The extension is built against the libnbd installed (make
# venv), which has every function it calls.
_flags = sys.getdlopenflags()
try:
    sys.setdlopenflags(_flags & ~os.RTLD_NOW | os.RTLD_LAZY)
    from .._nbd import ffi, lib  # type: ignore[import-not-found]  # built by setup.py
    AVAILABLE = True
    WHY_NOT = ""
except ImportError:          # built where libnbd-dev was not installed
    ffi = lib = None
    AVAILABLE = False
    WHY_NOT = ("NBD is not available: blkjobs was built without libnbd "
               "(install libnbd-dev, then rebuild: make venv)")
finally:
    sys.setdlopenflags(_flags)
    del _flags

CMD_FLAG_FUA = 0x01
CMD_FLAG_NO_HOLE = 0x02
CMD_FLAG_FAST_ZERO = 0x10
STATE_HOLE = 0x1
STATE_ZERO = 0x2
_FLUSH, _TRIM, _ZERO = 0, 1, 2
#: requests in flight per connection in copy_fd. Over a unix socket 4 (1 MiB
#: of 256 KiB requests): on the 2-core test machine faster than 16 and 64
#: (nbdcopy's), with less system time (the buffers stay in the CPU caches);
#: over TCP 16, where the round trip is longer.
COPY_DEPTH = 16
COPY_DEPTH_UNIX = 4
BASE_ALLOCATION = b"base:allocation"
#: preferred and maximum block size (nbd_get_block_size's LIBNBD_SIZE_*)
_SIZE_PREFERRED = 1
_SIZE_MAXIMUM = 2


def _libnbd_error(default: int = errno.EIO) -> tuple[int, str]:
    err = lib.nbd_get_errno() or default
    p = lib.nbd_get_error()
    if p == ffi.NULL:
        return err, os.strerror(err)
    text = ffi.string(p).decode("utf-8", "replace")
    # libnbd names its function first ("nbd_aio_connect_uri: connect: ...")
    head, sep, rest = text.partition(": ")
    return err, (rest if sep and head.startswith("nbd_") else text)


class NbdConnectError(ImageError):
    """Could not connect: ``errno``, and ``socket`` True when the socket
    itself could not be connected (libnbd's text starts with ``connect:``)
    rather than the handshake failing."""

    def __init__(self, text: str, err: int, socket: bool):
        super().__init__(text)
        self.errno, self.socket = err, socket


class NbdIOError(BlkjobsError, OSError):
    """A request failed: ``errno`` (ETIMEDOUT for a silent server) and
    libnbd's text. Also an OSError, so the copy paths report it as an
    error of their source or target side."""

    def __str__(self) -> str:
        return str(self.strerror)


class NbdCopyError(NbdIOError):
    """:meth:`Connection.copy_fd` failed on ``side`` ('source' or
    'target') at ``offset``."""

    def __init__(self, err: int, text: str, side: str, offset: int):
        super().__init__(err, text)
        self.side, self.offset = side, offset


class Connection:
    """One open NBD connection to ``uri`` (see libnbd's nbd_connect_uri for
    the forms). ``tls_certificates``: the directory of x509 certificates for
    ``nbds://`` (libnbd's default otherwise). Raises ImageError when it cannot
    connect. ``meta_context``: the block status context to ask for (QEMU's
    x-dirty-bitmap: ``qemu:allocation-depth``, ``qemu:dirty-bitmap:NAME``);
    ``has_allocation`` says whether the server offers it."""

    def __init__(self, uri: str, timeout: float, tls_certificates: str | None = None,
                 chunk: int = 256 << 10, depth: int = 16,
                 meta_context: bytes = BASE_ALLOCATION):
        if not AVAILABLE:
            raise ImageError(WHY_NOT)
        self.uri = uri
        self.timeout_ms = max(1, int(timeout * 1000))
        self.chunk, self.depth = chunk, depth
        self._broken: NbdIOError | None = None
        h = lib.nbd_create()
        if h == ffi.NULL:
            raise ImageError(f"Could not open '{uri}': {_libnbd_error()[1]}")
        self._h = h
        try:
            if tls_certificates:
                self._ok(lib.nbd_set_tls_certificates(h, tls_certificates.encode()))
            self._ok(lib.nbd_add_meta_context(h, meta_context))
            # the URI is the user's own (a command line argument): its
            # tls-psk-file= / tls-certificates= may name local files
            self._ok(lib.nbd_set_uri_allow_local_file(h, True))
            rc = lib.bj_nbd_connect(h, uri.encode(), self.timeout_ms)
            if rc < 0:
                text = self._connect_text(rc)
                raise NbdConnectError(f"Could not open '{uri}': {text}", -rc,
                                      text.startswith("connect: "))
            self.size = int(lib.nbd_get_size(h))
            if self.size < 0:
                raise ImageError(f"Could not open '{uri}': {_libnbd_error()[1]}")
            self.read_only = lib.nbd_is_read_only(h) == 1
            self.can_flush = lib.nbd_can_flush(h) == 1
            self.can_trim = lib.nbd_can_trim(h) == 1
            self.can_zero = lib.nbd_can_zero(h) == 1
            self.can_fast_zero = lib.nbd_can_fast_zero(h) == 1
            self.can_multi_conn = lib.nbd_can_multi_conn(h) == 1
            self.has_allocation = lib.nbd_can_meta_context(h, meta_context) == 1
            pref = int(lib.nbd_get_block_size(h, _SIZE_PREFERRED))
            if pref > 0:
                self.chunk = max(self.chunk, min(pref, 32 << 20))
            #: the largest request the server takes (32 MiB, NBD's safe
            #: limit, when it does not say)
            self.max_request = int(lib.nbd_get_block_size(h, _SIZE_MAXIMUM))
            if self.max_request <= 0:
                self.max_request = 32 << 20
            self.chunk = min(self.chunk, self.max_request)
        except BaseException:
            lib.nbd_close(h)
            self._h = None
            raise

    def _ok(self, rc: int) -> None:
        if rc == -1:
            raise ImageError(f"Could not open '{self.uri}': {_libnbd_error()[1]}")

    @staticmethod
    def _text(rc: int) -> str:
        if -rc == errno.ETIMEDOUT:
            return "the server did not answer in time (timed out)"
        err, text = _libnbd_error(-rc)
        return text if lib.nbd_get_errno() else os.strerror(-rc)

    @staticmethod
    def _connect_text(rc: int) -> str:
        """The text of a failed connection: libnbd's own whenever it has one
        (every failure of the handshake sets it, fresh, in this thread),
        even without an errno: a TLS certificate that does not verify
        leaves errno 0 and only the text says so."""
        if -rc == errno.ETIMEDOUT:
            return "the server did not answer in time (timed out)"
        p = lib.nbd_get_error()
        if p == ffi.NULL or not ffi.string(p):
            return os.strerror(-rc)
        return _libnbd_error(-rc)[1]

    def _fail(self, rc: int, what: str) -> NbdIOError:
        """Close the connection (requests in flight die with it) and keep the
        error for every later call."""
        text = self._text(rc)
        e = NbdIOError(-rc, f"{what}: {text}")
        self._broken = e
        self.close()
        return e

    def _handle(self):
        if self._broken is not None:
            raise NbdIOError(self._broken.errno, self._broken.strerror)
        if self._h is None:
            raise NbdIOError(errno.ENOTCONN, "NBD connection is closed")
        return self._h

    # -- requests ------------------------------------------------------------
    def pread(self, offset: int, buf) -> None:
        """Fill ``buf`` (a writable buffer) from [offset, offset+len(buf))."""
        h = self._handle()
        n = memoryview(buf).nbytes
        if n == 0:
            return
        cbuf = ffi.from_buffer(buf, require_writable=True)
        rc = lib.bj_nbd_rw(h, 0, cbuf, n, offset, self.chunk, self.depth, 0, self.timeout_ms)
        if rc < 0:
            raise self._fail(rc, "read")

    def pwrite(self, offset: int, data, fua: bool = False) -> None:
        h = self._handle()
        n = memoryview(data).nbytes
        if n == 0:
            return
        cbuf = ffi.from_buffer(data)
        rc = lib.bj_nbd_rw(h, 1, cbuf, n, offset, self.chunk, self.depth,
                           CMD_FLAG_FUA if fua else 0, self.timeout_ms)
        if rc < 0:
            raise self._fail(rc, "write")

    def _cmd(self, op: int, offset: int, length: int, flags: int, what: str) -> None:
        rc = lib.bj_nbd_cmd(self._handle(), op, offset, length, flags, self.timeout_ms)
        if rc < 0:
            raise self._fail(rc, what)

    def zero(self, offset: int, length: int, may_unmap: bool = True) -> None:
        # one request may not exceed 32-bit lengths
        step = 1 << 30
        for o in range(offset, offset + length, step):
            self._cmd(_ZERO, o, min(step, offset + length - o),
                      0 if may_unmap else CMD_FLAG_NO_HOLE, "write zeroes")

    def trim(self, offset: int, length: int) -> None:
        step = 1 << 30
        for o in range(offset, offset + length, step):
            self._cmd(_TRIM, o, min(step, offset + length - o), 0, "trim")

    def flush(self) -> None:
        self._cmd(_FLUSH, 0, 0, 0, "flush")

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Block status (base:allocation, or the connection's meta context)
        of [offset, offset+length): (length, flags) pairs
        from ``offset`` on; the server may describe less than asked, never
        nothing."""
        h = self._handle()
        length = min(length, (1 << 32) - (1 << 20))
        cap = 4096
        out = ffi.new("uint32_t[]", 2 * cap)
        rc = lib.bj_nbd_extents(h, offset, length, out, cap, self.timeout_ms)
        if rc < 0:
            raise self._fail(rc, "block status")
        res = [(int(out[2 * i]), int(out[2 * i + 1])) for i in range(rc)]
        if not res or any(n == 0 for n, _ in res):
            raise self._fail(-errno.EPROTO, "block status: the server described nothing")
        return res

    def copy_fd(self, fd: int, to_nbd: bool, offset: int, length: int, skip_zero: bool,
                may_unmap: bool = True) -> tuple[int, int]:
        """Copy [offset, offset+length) between the local file ``fd`` and the
        export, the same offsets on both sides (``to_nbd``: file -> export),
        entirely in C: requests pipelined, the file read or written as each
        request is issued or completes. ``skip_zero``: chunks that read as
        zero are not written (the target reads as zero already); else to an
        export as WRITE_ZEROES. Returns (data bytes, zero bytes); raises
        :class:`NbdCopyError` (the connection is closed then)."""
        h = self._handle()
        st = ffi.new("struct bj_nbd_copy_stats *")
        depth = COPY_DEPTH_UNIX if "+unix:" in self.uri.lower() else COPY_DEPTH
        # 256 KiB requests both ways: 1 MiB writes, though sent from the
        # mapped file without a buffer, cost a freshly started qemu-nbd 50 %
        # more CPU (0.59-0.68 s against 0.41-0.43 s per GiB; its buffers)
        rc = lib.bj_nbd_copy_fd(h, fd, int(to_nbd), offset, length, self.chunk, depth,
                                int(skip_zero), 0 if may_unmap else CMD_FLAG_NO_HOLE,
                                self.timeout_ms, st)
        if rc < 0:
            side = "source" if st.error_side == 1 else "target"
            local = (side == "source") == to_nbd
            text = os.strerror(-rc) if local else self._text(rc)
            e = NbdCopyError(-rc, text, side, int(st.error_offset))
            self._broken = e
            self.close()
            raise e
        return int(st.data_bytes), int(st.zero_bytes)

    def close(self) -> None:
        h, self._h = self._h, None
        if h is not None:
            lib.nbd_close(h)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
