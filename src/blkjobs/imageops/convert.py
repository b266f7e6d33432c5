"""``convert``: copy an image (raw, qcow2, a backing chain) into a new (or
existing, ``-n``) raw or qcow2 image.

Python decides what to copy; the C engine moves the bytes. Per work range
(128 MiB, fed one range ahead so the workers never wait for Python):

* the source's block status through its chain says, per run, which layer
  holds it: DATA runs become engine COPY items reading that layer's file at
  its host offset (``src_fd`` per item), ZERO / unallocated-to-the-bottom runs
  become zero items (or nothing when the target already reads as zeroes),
  COMPRESSED runs are read through the driver into a buffer (chunked);
* a qcow2 target gets its host clusters from ``Qcow2.allocate`` for the
  cluster-aligned runs that hold data (rounded outwards to target clusters),
  and the engine ``pwrite``s at those host offsets. Fresh clusters (past the
  file's old end) read as zeroes; reused ones (``-n``) are punched first, so
  the engine may always skip zeroes inside them (``target_is_zero``): zero
  blocks found inside DATA runs stay holes in the qcow2 file. At the end,
  clusters whose whole host range stayed a hole are discarded again (one
  SEEK_DATA walk over the runs we allocated), so zeroes written as data end
  up unallocated as with qemu-img. Known flaw: their host clusters become
  free holes inside the file (refcount 0, no disk space) instead of not
  existing, so the file's apparent size is larger than qemu-img's;
* ``-c``: clusters holding data are read through the chain (chunked) and
  stored with ``Qcow2.write_compressed`` (zlib, per cluster, in Python);
* ``-B``: the target records a backing file; when it is the source's own
  backing file only the source's top layer is copied (qemu-img's rule),
  otherwise source and backing are compared chunk by chunk and only target
  clusters that differ are written.

Metadata is flushed once at the end, after every data write completed
(refcounts, L2, L1, header, each fsync'd: ``Qcow2.flush``).

Locks (QEMU's lock bytes, as qemu-img convert takes them): the source and its
backing chain are read with nobody else allowed to write them (``-U``:
shared); the target is written exclusively, locked before anything in it is
touched (an existing file is locked before it is truncated or re-created);
a ``-B`` backing file is read like the source. A target that is in the
source's own backing chain is refused: writing it would change the source.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import Callable

from ..errors import BlkjobsError, CopyError, OSErrorWithContext, UsageError
from ..graph.lock import ImageLock, LockConflict, lock_fd, opening
from ..native.copy import COPY, COPY_SPARSE, CopyEngine, RunResult
from ..native.ratelimit import TokenBucket
from .files import fd_size, open_source, same_file

WORK_RANGE = 1 << 30           # bytes queued per feed of the engine
RAW_REQUEST = 2 << 20          # engine request size, raw -> raw
# durable raw -> raw copies (write-behind): smaller requests keep the disk busier
WB_REQUEST = 1 << 20
# raw|qcow2|chain -> raw|qcow2: smaller requests measured 5-10% faster on the
# 4 GiB benchmark (page cache, 2 cores): the workers' buffers stay in CPU cache
CHAIN_REQUEST = 512 << 10
MAX_SPARSE_SIZE = 16 << 20


@dataclass
class ConvertOptions:
    sparse_size: int = 4096        # -S: zero detection granularity, 0 = fully allocate
    no_create: bool = False        # -n: the target exists, do not create it
    target_is_zero: bool = False   # --target-is-zero (with -n)
    rate: int = 0                  # -r: bytes/s, 0 = unlimited
    threads: int = 4               # -m: worker threads
    request_size: int | None = None   # bytes per engine request; None = per path default
    flush: bool = True             # fsync the target at the end (-t writeback)
    src_fmt: str | None = None     # -f: probed when None
    dst_fmt: str = "raw"           # -O: raw | qcow2
    compress: bool = False         # -c: compressed qcow2 clusters
    backing: str | None = None     # -B: backing file recorded in the target
    backing_fmt: str | None = None  # -F: its format (probed when None)
    create_opts: dict = field(default_factory=dict)   # -o (qcow2/raw creation options)
    force_share: bool = False      # -U: read a source another process is writing


@dataclass
class ConvertResult:
    size: int
    data_bytes: int
    zero_bytes: int


def _check_options(o: ConvertOptions) -> None:
    if o.sparse_size < 0 or o.sparse_size > MAX_SPARSE_SIZE or o.sparse_size % 512:
        raise UsageError(f"invalid sparse size {o.sparse_size}: must be a multiple of 512 "
                         "up to 16 MiB (0 disables sparse output)")
    if o.target_is_zero and not o.no_create:
        raise UsageError("--target-is-zero requires -n (use an existing target)")
    if o.rate < 0:
        raise UsageError(f"invalid rate limit {o.rate}")
    if not 1 <= o.threads <= 16:
        raise UsageError(f"invalid number of coroutines/threads {o.threads}: must be 1..16")



def _lock_target(dst: str, fmt: str, no_create: bool) -> ImageLock | None:
    """Take the writer's locks on an existing target before it is touched,
    with qemu-img's error texts (``-n``: ``Could not open 'DST': Failed to get
    "write" lock``; a file convert would overwrite: ``DST: error while
    converting FMT: ...``). None when there is no file yet."""
    if not no_create and not os.path.exists(dst):
        return None
    try:
        return ImageLock(dst, write=True)
    except LockConflict as e:
        if no_create:
            raise e.opening(dst) from None
        raise LockConflict(f"{dst}: error while converting {fmt}: {e}", e.path) from None
    except OSError as e:
        if no_create:
            raise CopyError(e.errno, "Could not open target", path=dst) from None
        return None         # not a readable file: creating it says what is wrong


def _refuse_target_in_chain(dst: str, src: str, chain) -> None:
    """A target in the source's own backing chain: qemu-img's lock error,
    with the reason in place of 'Is another process using the image'."""
    for n in chain[1:]:
        if same_file(n.filename, dst):
            raise LockConflict(f"Could not open '{dst}': Failed to get \"write\" lock\n"
                               f"'{dst}' is in the backing chain of the source '{src}' "
                               "(writing it would change what the source reads)", n.filename)


def _identity(fd: int) -> tuple[int, int]:
    """(st_dev, st_ino) of an open file: which file our target is."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _remove_ours(dst: str, ours: tuple[int, int]) -> str:
    """Remove the target file we created -- only if ``dst`` still names it
    (``ours``: its identity from our fd): a path replaced meanwhile names
    someone else's file. Returns what happened, for the error message."""
    try:
        st = os.lstat(dst)
    except FileNotFoundError:
        return f"the incomplete target was not removed: '{dst}' was removed or renamed meanwhile"
    except OSError as e:
        return f"the incomplete target could not be removed: {e.strerror}"
    if (st.st_dev, st.st_ino) != ours:
        return (f"the incomplete target was not removed: '{dst}' was replaced by another "
                "file meanwhile")
    try:
        os.unlink(dst)
    except OSError as e:
        return f"the incomplete target could not be removed: {e.strerror}"
    return "the incomplete target was removed"


def _say_what_happened_to_target(e: BaseException, dst: str, ours: tuple[int, int] | None,
                                 written: bool) -> BaseException:
    """After a failed convert: remove the target file we created (``ours``:
    its identity, None when we created none), and append to the error what
    became of the target (the user must never have to guess). ``written``:
    an existing (-n) target was opened and the copy into it had begun.
    Returns the exception to raise (a bare OSError gets the note too)."""
    if ours is not None:
        note = _remove_ours(dst, ours)
    else:
        note = "the target was left partially written" if written else ""
    if isinstance(e, OSError) and not isinstance(e, BlkjobsError):
        e = OSErrorWithContext(e.errno or errno.EIO, path=e.filename)
    if isinstance(e, BlkjobsError) and note and not isinstance(e, UsageError):
        e.args = (f"{e} ({note})",)
    elif isinstance(e, KeyboardInterrupt) and note:     # Ctrl-C, SIGTERM
        e.args = (note,)
    return e


def convert_raw(src: str, dst: str, opts: ConvertOptions | None = None,
                progress: Callable[[int, int], None] | None = None,
                check: Callable[[], None] | None = None) -> ConvertResult:
    """raw -> raw. Raises BlkjobsError subclasses; the source is only read.

    On failure a target created here is removed (and the error says so); an
    existing target (``-n``) is left partially written, and the error says so.
    """
    o = opts or ConvertOptions()
    _check_options(o)
    if same_file(src, dst):
        raise UsageError(f"source and target are the same file: '{src}'")
    sfd = open_source(src)
    dfd = -1
    ours: tuple[int, int] | None = None     # the target file we created
    written = False
    tlock = None
    try:
        with opening(src):      # the source: nobody else writes it meanwhile
            lock_fd(sfd, src, force_share=o.force_share)
        size = fd_size(sfd)
        tlock = _lock_target(dst, "raw", o.no_create)
        if o.no_create:
            try:
                dfd = os.open(dst, os.O_WRONLY | os.O_CLOEXEC)
            except OSError as e:
                raise CopyError(e.errno, "Could not open target", path=dst) from None
            tsize = fd_size(dfd)
            if tsize < size:
                raise UsageError(f"target '{dst}' is smaller than the source "
                                 f"({tsize} < {size} bytes)")
        else:
            if os.path.isdir(dst):
                raise CopyError(errno.EISDIR, "Could not create target", path=dst)
            try:
                dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise CopyError(e.errno, "Could not create target", path=dst) from None
            ours = _identity(dfd)
            if tlock is None:
                tlock = ImageLock(dst, write=True)
            try:
                os.ftruncate(dfd, size)
            except OSError as e:
                raise CopyError(e.errno, "Could not resize target", path=dst) from None
        target_zero = ours is not None or o.target_is_zero
        bucket = TokenBucket(o.rate) if o.rate else None
        with CopyEngine(sfd, dfd, threads=o.threads,
                        request_size=o.request_size or (WB_REQUEST if o.flush else RAW_REQUEST),
                        zero_block=o.sparse_size, target_is_zero=target_zero,
                        may_unmap=o.sparse_size != 0, bucket=bucket, write_behind=o.flush,
                        src_path=src, dst_path=dst) as eng:
            kind = COPY_SPARSE if o.sparse_size else COPY
            fed = 0

            def feed():
                nonlocal fed
                n = min(WORK_RANGE, size - fed)
                if n > 0:
                    eng.add([(fed, fed, n, kind)])
                    fed += n

            written = True
            feed()
            if progress:
                progress(0, size)
            try:
                while True:
                    res = eng.run(0.1, low_water=WORK_RANGE // 2 if fed < size else 0)
                    if progress:
                        progress(eng.status().done, size)
                    if res == RunResult.DONE and fed >= size:
                        break
                    if res != RunResult.TIMEOUT:
                        feed()
                    if check:
                        check()
            except BaseException:
                eng.cancel()
                eng.drain()
                raise
            st = eng.status()
        if o.flush:
            try:
                os.fsync(dfd)
            except OSError as e:
                raise CopyError(e.errno, "error flushing", path=dst, side="target") from None
        return ConvertResult(size, st.data_bytes, st.zero_bytes)
    except BaseException as e:
        if dfd >= 0:
            os.close(dfd)
            dfd = -1
        err = _say_what_happened_to_target(e, dst, ours, written)
        if err is not e:
            raise err from None
        raise
    finally:
        os.close(sfd)
        if dfd >= 0:
            os.close(dfd)
        if tlock is not None:
            tlock.release()


# ---------------------------------------------------------------------------
# Any format, backing chains: raw | qcow2 | chain -> raw | qcow2
CHAIN_WORK = 128 << 20         # work range per block-status query (multiple of 2 MiB)
BUF = 4 << 20                  # buffer for data read through a driver
DATA, ZERO, COMP = 0, 1, 2     # piece kinds
_FALLOC_PUNCH = 0x02 | 0x01    # PUNCH_HOLE | KEEP_SIZE


def convert(src: str, dst: str, opts: ConvertOptions | None = None,
            progress: Callable[[int, int], None] | None = None,
            check: Callable[[], None] | None = None) -> ConvertResult:
    """Convert ``src`` (any supported format, with its backing chain) into
    ``dst``. raw -> raw without -B/-c takes :func:`convert_raw`."""
    from .images import check_format, probe
    o = opts or ConvertOptions()
    check_format(o.dst_fmt, "target")
    check_format(o.src_fmt, "source")
    _check_options(o)
    if o.dst_fmt == "raw":
        if o.backing:
            raise UsageError("Backing file not supported for file format 'raw'")
        if o.compress:
            raise UsageError("Compression not supported for this file format (raw)")
        if o.create_opts and set(o.create_opts) - {"preallocation"}:
            raise UsageError(f"Invalid parameter '{sorted(set(o.create_opts) - {'preallocation'})[0]}'"
                             " for format raw")
    if same_file(src, dst):
        raise UsageError(f"source and target are the same file: '{src}'")
    fmt = probe(src, o.src_fmt)
    if fmt == "raw" and o.dst_fmt == "raw" and not o.create_opts:
        return convert_raw(src, dst, o, progress, check)
    return _Convert(src, fmt, dst, o, progress, check).run()


def _punch(fd: int, offset: int, length: int) -> None:
    """Make a host range of our qcow2 file read as zeroes (punch, else write)."""
    from ..formats.raw import _fallocate
    if _fallocate(fd, _FALLOC_PUNCH, offset, length) == 0:
        return
    z = bytes(min(length, 1 << 20))
    pos = offset
    while pos < offset + length:
        pos += os.pwrite(fd, z[:min(len(z), offset + length - pos)], pos)


def _merge(ranges):
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


class _Convert:
    def __init__(self, src, fmt, dst, o: ConvertOptions, progress, check):
        self.src, self.fmt, self.dst, self.o = src, fmt, dst, o
        self.progress, self.check = progress, check
        self.ours: tuple[int, int] | None = None   # the target file we created
        self.written = False       # the copy into the target began
        self.top = self.base = self.t = None
        self.tlock: ImageLock | None = None
        self.dfd = -1
        self.py_done = 0           # bytes handled without the engine
        self.allocated: list = []  # host runs handed out by Qcow2.allocate

    # -- setup -----------------------------------------------------------
    def _open(self):
        from .images import open_ro
        o = self.o
        self.top = open_ro(self.src, self.fmt, force_share=o.force_share, stable=True)
        self.size = self.top.size
        self.chain = self.top.chain()
        self.fds = [n.driver.fd for n in self.chain]
        self.fast_base = False
        if o.backing:
            from ..graph import resolve_backing
            path = resolve_backing(self.dst, o.backing)
            try:
                self.base = open_ro(path, o.backing_fmt, stable=True)
            except LockConflict as e:     # qemu-img opens it as the new target's backing
                raise LockConflict(f"Could not open '{self.dst}': Could not open backing "
                                   f"file: {e.bare}", e.path) from None
            except BlkjobsError as e:
                raise UsageError(f"Could not open backing file '{o.backing}': {e}") from None
            if o.backing_fmt is None:
                o.backing_fmt = self.base.format
            below = self.top.backing
            self.fast_base = below is not None and same_file(below.filename, self.base.filename)

    def _create_target(self):
        o, dst = self.o, self.dst
        if o.dst_fmt == "qcow2":
            self.tsize = -(-self.size // 512) * 512
        else:
            self.tsize = self.size
        _refuse_target_in_chain(dst, self.src, self.chain)
        self.tlock = _lock_target(dst, o.dst_fmt, o.no_create)
        if o.no_create:
            try:
                if o.dst_fmt == "qcow2":
                    from ..formats import open_image
                    self.t = open_image(dst, "qcow2", read_only=False)
                    self.t.unsafe = not o.flush
                    self.dfd = self.t.fd
                    tsize = self.t.size
                else:
                    self.dfd = os.open(dst, os.O_WRONLY | os.O_CLOEXEC)
                    tsize = fd_size(self.dfd)
            except OSError as e:
                raise CopyError(e.errno, "Could not open target", path=dst) from None
            if tsize < self.size:
                raise UsageError(f"target '{dst}' is smaller than the source "
                                 f"({tsize} < {self.size} bytes)")
            self.tsize = tsize
            return
        if os.path.isdir(dst):
            raise CopyError(errno.EISDIR, "Could not create target", path=dst)
        if o.dst_fmt == "raw":
            try:
                self.dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                                   0o644)
            except OSError as e:
                raise CopyError(e.errno, "Could not create target", path=dst) from None
            self.ours = _identity(self.dfd)
            if self.tlock is None:
                self.tlock = ImageLock(dst, write=True)
            try:
                os.ftruncate(self.dfd, self.size)
                if o.create_opts.get("preallocation") == "falloc" and self.size:
                    os.posix_fallocate(self.dfd, 0, self.size)
            except OSError as e:
                raise CopyError(e.errno, "Could not resize target", path=dst) from None
            return
        from ..formats import create_image, open_image
        copts = dict(o.create_opts)
        copts.pop("size", None)
        if o.backing:
            copts["backing_file"], copts["backing_format"] = o.backing, o.backing_fmt
        if copts.get("preallocation", "off") != "off":
            raise UsageError("convert: preallocation of a qcow2 target is not supported")
        try:
            create_image(dst, "qcow2", self.tsize, **copts)
        except OSError as e:
            raise CopyError(e.errno, "Could not create target", path=dst) from None
        st = os.lstat(dst)
        self.ours = (st.st_dev, st.st_ino)
        if self.tlock is None:
            self.tlock = ImageLock(dst, write=True)
        self.t = open_image(dst, "qcow2", read_only=False)
        self.ours = _identity(self.t.fd)
        self.t.unsafe = not o.flush      # -t unsafe: no fsync of metadata either
        self.dfd = self.t.fd

    # -- planning ----------------------------------------------------------
    def _pieces(self, pos, n):
        """[start, length, kind, fd, host, backing] for [pos, pos+n) of the source."""
        out = []
        for r in self.top.block_status(pos, n):
            if r["compressed"]:
                kind = COMP
            elif r["data"]:
                kind = DATA
            else:
                kind = ZERO
            d = r["depth"]
            out.append([r["start"], r["length"], kind, self.fds[d] if kind == DATA else -1,
                        r.get("offset") if kind == DATA else None,
                        self.fast_base and d > 0])
        if self.base is not None and not self.fast_base:
            out = self._mark_same_as_base(out, pos, n)
        return out

    def _read_src(self, off, mv):
        """Guest view of the source (zeroes past its end: qcow2 targets are
        rounded up to 512 bytes)."""
        try:
            self.top._read_below(off, mv)
        except OSError as e:
            raise CopyError(e.errno or errno.EIO, "error reading", path=self.src,
                            side="source", offset=off) from None

    def _mark_same_as_base(self, pieces, pos, n):
        """Compare mode of -B: target clusters equal to the backing file's
        are marked ``backing`` (left unallocated). Chunks that are zero on both
        sides are decided from block status alone; others are read."""
        cs = self.t.cluster_size
        base_zero = [(r["start"], r["start"] + r["length"])
                     for r in self.base.block_status(pos, min(n, max(0, self.base.size - pos)))
                     if r["zero"]] if pos < self.base.size else []
        if pos + n > self.base.size:
            base_zero.append((max(pos, self.base.size), pos + n))
        src_zero = [(p[0], p[0] + p[1]) for p in pieces if p[2] == ZERO]

        def covered(zs, a, b):
            for s, e in zs:
                if s <= a and e >= b:
                    return True
            return False

        same = []
        ba, bb = bytearray(BUF), bytearray(BUF)
        va, vb = memoryview(ba), memoryview(bb)
        c = pos
        while c < pos + n:
            k = min(BUF, pos + n - c)
            if covered(src_zero, c, c + k) and covered(base_zero, c, c + k):
                same.append((c, c + k))
            else:
                self._read_src(c, va[:k])
                self.base._read_below(c, vb[:k])
                if va[:k] == vb[:k]:
                    same.append((c, c + k))
                else:
                    for x in range(0, k, cs):
                        y = min(k, x + cs)
                        if va[x:y] == vb[x:y]:
                            same.append((c + x, c + y))
            c += k
        same = _merge(same)
        out = []
        for p in pieces:
            s, e = p[0], p[0] + p[1]
            for a, b in same:
                if b <= s or a >= e:
                    continue
                if a > s:
                    out.append([s, a - s] + p[2:5] + [False])
                    s = a
                m = min(b, e)
                out.append([s, m - s] + p[2:5] + [True])
                s = m
            if s < e:
                out.append([s, e - s] + p[2:5] + [False])
        return self._fix_hosts(pieces, out)

    @staticmethod
    def _fix_hosts(orig, parts):
        """Split pieces keep the host offset of their original piece: shift it."""
        res, i = [], 0
        for q in parts:
            while orig[i][0] + orig[i][1] <= q[0]:
                i += 1
            p = orig[i]
            if q[2] == DATA:
                q[4] = p[4] + (q[0] - p[0])
            res.append(q)
        return res

    # -- queueing ------------------------------------------------------------
    def _items_raw(self, pieces, items):
        tz = self.target_zero
        for s, n, kind, fd, host, _ in pieces:
            if kind == DATA:
                items.append((host, s, n, self.copy_kind, fd))
            elif kind == ZERO:
                if not tz:
                    items.append((0, s, n, 1))
            else:
                self._through(s, n, s)

    def _through(self, guest, n, host):
        """Read [guest, guest+n) through the source chain (compressed data)
        and pwrite it at ``host`` of the target file, in BUF chunks."""
        buf = memoryview(bytearray(min(n, BUF)))
        done = 0
        while done < n:
            k = min(len(buf), n - done)
            self._read_src(guest + done, buf[:k])
            w = 0
            try:
                while w < k:
                    w += os.pwrite(self.dfd, buf[w:k], host + done + w)
            except OSError as e:
                raise CopyError(e.errno or errno.EIO, "error writing", path=self.dst,
                                side="target", offset=guest + done + w) from None
            done += k

    def _plan_qcow2(self, pieces, pos, n):
        """(alloc ranges, zero ranges) of target clusters for the pieces."""
        cs, end = self.t.cluster_size, self.tsize
        must_zero = self.t.backing_filename is not None or not self.target_zero

        def down(x):
            return x // cs * cs

        def up(x):
            return min(end, -(-x // cs) * cs)
        need, zeros = [], []
        for s, ln, kind, _, _, back in pieces:
            if back:
                continue
            e = s + ln
            if e >= self.size:
                e = end          # the target may be rounded up (qcow2: 512 bytes)
            if kind != ZERO:
                need.append((down(s), up(e)))
            elif must_zero:
                ia, ib = up(s), (e if e == end else down(e))
                if ia >= ib:
                    need.append((down(s), up(e)))
                    continue
                zeros.append((ia, ib))
                if ia > s:
                    need.append((down(s), ia))
                if ib < e:
                    need.append((ib, up(e)))
        return _merge(need), zeros

    def _items_qcow2(self, pieces, pos, n, items):
        t = self.t
        need, zeros = self._plan_qcow2(pieces, pos, n)
        for a, b in zeros:
            t.write_zeroes(a, b - a)
        if self.o.compress:
            for a, b in need:
                self._compress(a, b)
            return
        i = 0
        for a, b in need:
            fresh_from = t.alloc_end
            maps = t.allocate(a, b - a)
            self.allocated.extend(maps)
            for m in maps:
                if m.host_offset < fresh_from:
                    _punch(self.dfd, m.host_offset, -(-m.length // 512) * 512)
            while i < len(pieces) and pieces[i][0] + pieces[i][1] <= a:
                i += 1
            j = i
            while j < len(pieces) and pieces[j][0] < b:
                s, ln, kind, fd, host, _ = pieces[j]
                if kind != ZERO:
                    ps, pe = max(s, a), min(s + ln, b)
                    for m in maps:
                        ms, me = max(ps, m.start), min(pe, m.start + m.length)
                        if ms >= me:
                            continue
                        h = m.host_offset + (ms - m.start)
                        if kind == DATA:
                            items.append((host + (ms - s), h, me - ms, self.copy_kind, fd))
                        else:
                            self._through(ms, me - ms, h)
                j += 1

    def _sparsify(self):
        """Clusters we allocated whose host range stayed a hole (the engine
        found zeroes in data the source stores, e.g. zeroes written as data)
        are dropped again (``discard``: unallocated, or a zero cluster over a
        backing file), so the target maps like qemu-img's. Skipped for -S 0
        (fully allocate) and for v2 images with a backing file (no zero flag)."""
        from ..native.extents import extents
        t, cs = self.t, self.t.cluster_size
        if not self.o.sparse_size or (t.backing_filename and t.header.version < 3):
            return
        for m in self.allocated:
            for e in extents(t.fd, m.host_offset, m.length):
                if e.data:
                    continue
                # whole clusters only (host runs are cluster-aligned at their start)
                a = m.start + (-(-(e.offset - m.host_offset) // cs) * cs)
                end = m.start + (e.offset + e.length - m.host_offset)
                b = end if end >= t.size else m.start + (end - m.start) // cs * cs
                if b > a:
                    t.discard(a, b - a)
        self.allocated = []

    def _compress(self, a, b):
        from ..native.extents import is_zero
        t, cs = self.t, self.t.cluster_size
        must_zero = t.backing_filename is not None or not self.target_zero
        chunk = max(cs, BUF // cs * cs)
        buf = memoryview(bytearray(chunk))
        pos = a
        while pos < b:
            k = min(chunk, b - pos)
            self._read_src(pos, buf[:k])
            for x in range(0, k, cs):
                c = buf[x:min(k, x + cs)]
                try:
                    if is_zero(c):
                        if must_zero:
                            t.write_zeroes(pos + x, len(c))
                    else:
                        t.write_compressed(pos + x, c)
                except OSError as e:
                    raise CopyError(e.errno or errno.EIO, "error writing", path=self.dst,
                                    side="target", offset=pos + x) from None
            pos += k

    def _feed(self, eng) -> None:
        """Plan work ranges until about half a work range of items is queued."""
        queued = 0
        while self.next_pos < self.size and queued < CHAIN_WORK // 2:
            pos = self.next_pos
            n = min(CHAIN_WORK, self.size - pos)
            pieces = self._pieces(pos, n)
            items: list = []
            if self.t is None:
                self._items_raw(pieces, items)
            else:
                self._items_qcow2(pieces, pos, n, items)
            nbytes = sum(it[2] for it in items)
            eng.add(items)
            queued += nbytes
            self.py_done += max(0, n - nbytes)
            self.next_pos = pos + n

    # -- run -----------------------------------------------------------------
    def run(self) -> ConvertResult:
        o = self.o
        try:
            self._open()
            self._create_target()
            if self.t is not None:
                self.target_zero = True      # fresh or punched host clusters only
                if o.no_create and not o.target_is_zero:
                    self.target_zero = False     # decides zero clusters (see _plan_qcow2)
                eng_zero = True
            else:
                self.target_zero = eng_zero = self.ours is not None or o.target_is_zero
            # Block status already split holes off (raw layers by SEEK_DATA, qcow2
            # by its tables): plain COPY spares the engine a SEEK_DATA walk per
            # item under its queue lock; zero detection still runs on the data.
            self.copy_kind = COPY
            self.next_pos = 0
            bucket = TokenBucket(o.rate) if o.rate else None
            with CopyEngine(self.fds[0], self.dfd, threads=o.threads,
                            request_size=o.request_size or CHAIN_REQUEST, zero_block=o.sparse_size,
                            target_is_zero=eng_zero, may_unmap=o.sparse_size != 0,
                            write_behind=o.flush,     # the final fsync finds little left
                            bucket=bucket, src_path=self.src, dst_path=self.dst) as eng:
                if self.progress:
                    self.progress(0, self.size)
                try:
                    self.written = True
                    self._feed(eng)
                    while True:
                        res = eng.run(0.1, low_water=CHAIN_WORK // 4
                                      if self.next_pos < self.size else 0)
                        if self.progress:
                            self.progress(min(self.size, self.py_done + eng.status().done),
                                          self.size)
                        if res == RunResult.DONE and self.next_pos >= self.size:
                            break
                        if res != RunResult.TIMEOUT:
                            self._feed(eng)
                        if self.check:
                            self.check()
                except BaseException:
                    eng.cancel()
                    eng.drain()
                    raise
                st = eng.status()
            try:
                if self.t is not None:
                    self._sparsify()
                    self.t.flush()       # data is written: refcounts, L2, L1, header
                elif o.flush:
                    os.fsync(self.dfd)
            except OSError as e:
                raise CopyError(e.errno, "error flushing", path=self.dst, side="target") from None
            return ConvertResult(self.size, st.data_bytes, st.zero_bytes)
        except BaseException as e:
            self._close_target(failed=True)
            err = _say_what_happened_to_target(e, self.dst, self.ours, self.written)
            if err is not e:
                raise err from None
            raise
        finally:
            self._close_target(failed=False)
            for n in (self.top, self.base):
                if n is not None:
                    n.close_chain()

    def _close_target(self, failed: bool):
        if self.t is not None:
            t, self.t = self.t, None
            if failed:
                t.read_only = True       # do not flush half-made metadata
            try:
                t.close()
            except OSError:
                pass
            self.dfd = -1
        elif self.dfd >= 0:
            os.close(self.dfd)
            self.dfd = -1
        if self.tlock is not None and not failed:
            self.tlock.release()
            self.tlock = None
