"""Any format and backing chain into a raw or qcow2 target
(:class:`ChainConvert`): per work range, the source's block status through
its chain becomes engine items; a qcow2 target gets its clusters allocated
for them, ``-c`` compresses, ``-B`` compares with the new backing file. See
:mod:`.convert` for the whole picture."""
from __future__ import annotations

import errno
import os

from ..errors import BlkjobsError, CopyError, OSErrorWithContext, UsageError
from ..graph.lock import ImageLock, LockConflict
from ..native import dio
from ..native.copy import COPY, CopyEngine
from ..units import sector_size
from .convert_base import CHAIN_REQUEST, WB_REQUEST, ConvertOptions, ConvertResult, drive
from .convert_target import Target, check_target_size, identity, refuse_target_in_chain
from .convert_zeroes import COMP, DATA, ZERO, not_in_place, old_hosts, sparsify, zero_clusters
from .files import same_file

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from typing import Any

CHAIN_WORK = 128 << 20         # work range per block-status query (multiple of 2 MiB)
LOW_WATER = CHAIN_WORK         # plan more below this: planning a range can take 75 ms (q2c19)
# the first work range, smaller: the workers start on it while the next
# ones are planned (a whole first feed took 20-25 ms of a 1 GiB VM-shaped
# raw -> qcow2 convert, every worker idle)
FIRST_WORK = 16 << 20
BUF = 4 << 20                  # buffer for data read through a driver
_FALLOC_PUNCH = 0x02 | 0x01    # PUNCH_HOLE | KEEP_SIZE


def _punch(fd: int, offset: int, length: int) -> None:
    """Make a host range of our qcow2 file read as zeroes (punch, else write)."""
    from ..formats.raw import _fallocate
    if _fallocate(fd, _FALLOC_PUNCH, offset, length) == 0:
        return
    z = bytes(min(length, 1 << 20))
    pos = offset
    while pos < offset + length:
        pos += dio.pwrite(fd, z[:min(len(z), offset + length - pos)], pos)


def _merge(ranges):
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


class ChainConvert:
    """One convert of any format or chain into a raw or qcow2 target (see
    :mod:`.convert`): :meth:`run`."""

    def __init__(self, src, fmt, dst, o: ConvertOptions, progress, check):
        self.src, self.fmt, self.dst, self.o = src, fmt, dst, o
        self.progress, self.check = progress, check
        self.tg = Target(dst, keep=o.keep_failed_target)
        #: the source chain's top and base nodes once open (graph Nodes)
        self.top: Any = None
        self.base: Any = None
        self.next_pos = 0              # the next guest offset to plan
        self.started = False           # the engine's workers were started
        #: -o preallocation=metadata|falloc|full of a created qcow2 target:
        #: its clusters are allocated (and read zero) before the copy
        self.prealloc = False
        self.target_zero = False       # the target reads as zeroes where not written
        self.py_done = 0           # bytes handled without the engine
        self.zfd = -1              # /dev/zero for -S 0
        self.allocated: list = []  # host runs handed out by Qcow2.allocate
        #: guest clusters reused in place and left unpunched (-n --target-is-zero)
        self.in_place: set[int] = set()
        self.old_zero: set[int] = set()    # and those that were zero clusters
        #: a data piece zero_clusters could not read (its clusters may read
        #: as zeroes: sparsify looks for them after the copy)
        self.unscanned = False
        self._pool: Any = None     # -c: the compressing threads (zlib: one, calling C)
        self._deflater: Any = None  # -c, zlib: the C compressors (_compress)
        self._cbuf: memoryview | None = None   # -c: their input buffers
        self._zeros_z: dict[int, bytes] = {}     # -c -S 0: zero clusters, compressed
        self.eng_prealloc = False  # the engine allocates its copy items ahead
        self.file_end = 0          # with it: the qcow2 target's length so far

    # -- setup -----------------------------------------------------------
    def _open(self):
        from .images import open_ro
        o = self.o
        self.top = open_ro(self.src, self.fmt, force_share=o.force_share, stable=True)
        if o.snapshot is not None:
            from .snapshot import load_tmp
            load_tmp(self.top, o.snapshot)
        self.size = self.top.size
        self.chain = self.top.chain()
        self.fds = [n.driver.data_fd for n in self.chain]
        self.fast_base = False
        if o.backing:
            from ..graph import resolve_backing
            path = resolve_backing(self.dst, o.backing)
            try:
                self.base = open_ro(path, o.backing_fmt, stable=True)
            except LockConflict as e:     # qemu-img opens it as the new target's backing
                raise LockConflict(f"Could not open '{self.dst}': Could not open backing "
                                   f"file: {e.bare}", e.path) from None
            except BlkjobsError as e:     # qemu-img's words: it opens the new target's
                raise UsageError(f"Could not open '{self.dst}': Could not open backing "
                                 f"file: {_open_failure(path, e)}") from None
            if o.backing_fmt is None:
                o.backing_fmt = self.base.format
            below = self.top.backing
            self.fast_base = below is not None and same_file(below.filename, self.base.filename)

    def _create_target(self):
        o, dst = self.o, self.dst
        if o.dst_fmt == "qcow2":
            self.tsize = sector_size(self.size)
        else:
            self.tsize = self.size
        refuse_target_in_chain(dst, self.src, self.chain)
        self.tg.lock(o.dst_fmt, o.no_create)
        if o.no_create and o.dst_fmt == "raw":
            self.tsize = self.tg.open_existing_raw(self.size)
        elif o.no_create:
            from ..formats import open_image
            try:
                self.tg.t = open_image(dst, "qcow2", read_only=False)
            except OSError as e:
                raise CopyError(e.errno or errno.EIO, "Could not open target", path=dst) from None
            self.tg.t.unsafe = not o.flush
            self.tg.t.unmap_freed = bool(o.sparse_size)     # qemu-img: discard=unmap
            self.tg.dfd = self.tg.t.data_fd
            check_target_size(dst, self.tg.t.size, self.size)
            self.tsize = self.tg.t.size
        elif o.dst_fmt == "raw":
            self.tg.create_raw(self.size, o.create_opts.get("preallocation") == "falloc")
        else:
            self._create_qcow2()

    def _create_qcow2(self):
        o, dst = self.o, self.dst
        if os.path.isdir(dst):
            raise CopyError(errno.EISDIR, "Could not create target", path=dst)
        from ..formats import create_image, open_image
        copts = dict(o.create_opts)
        copts.pop("size", None)
        if o.backing:
            copts["backing_file"], copts["backing_format"] = o.backing, o.backing_fmt
        # preallocated as create does it; the copy then writes the data into
        # those clusters and leaves the rest as it is (qemu-img: the image
        # reads zeroes, so only data is written)
        self.prealloc = copts.get("preallocation", "off") != "off"
        if not o.flush:
            copts["sync"] = False       # -t unsafe: no fsync of the new file either
        try:
            create_image(dst, "qcow2", self.tsize, **copts)
        except OSError as e:
            raise CopyError(e.errno or errno.EIO, "Could not create target", path=dst) from None
        st = os.lstat(dst)
        self.tg.ours = (st.st_dev, st.st_ino)
        if self.tg.tlock is None:
            self.tg.tlock = ImageLock(dst, write=True)
        self.tg.t = open_image(dst, "qcow2", read_only=False)
        self.tg.ours = identity(self.tg.t.fd)
        self.tg.t.unsafe = not o.flush      # -t unsafe: no fsync of metadata either
        self.tg.dfd = self.tg.t.data_fd

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
        cs = self.tg.t.cluster_size
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
                if not self.o.sparse_size:      # -S 0: zeroes written as data
                    items.append((0, s, n, COPY, self._zero_fd()))
                elif not tz:
                    items.append((0, s, n, 1))
            else:
                self._through(s, n, s)

    def _zero_fd(self) -> int:
        """/dev/zero, the source of the zeroes -S 0 writes as data (qemu-img
        writes them: a fully allocated target, which FALLOC_FL_ZERO_RANGE's
        unwritten extents are not to SEEK_DATA)."""
        if self.zfd < 0:
            self.zfd = os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC)
        return self.zfd

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
                    w += dio.pwrite(self.tg.dfd, buf[w:k], host + done + w)
            except OSError as e:      # at the host offset, as the engine's errors
                raise CopyError(e.errno or errno.EIO, "error writing", path=self.dst,
                                side="target", offset=host + done + w) from None
            done += k

    def _plan_qcow2(self, pieces, pos, n):
        """(alloc ranges, zero ranges) of target clusters for the pieces."""
        cs, end = self.tg.t.cluster_size, self.tsize
        must_zero = self.tg.t.backing_filename is not None or not self.target_zero

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
            if kind != ZERO or not self.o.sparse_size:    # -S 0: every cluster allocated
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
        t = self.tg.t
        pieces = zero_clusters(self, pieces)
        need, zeros = self._plan_qcow2(pieces, pos, n)
        for a, b in zeros:
            t.write_zeroes(a, b - a)
        if self.o.compress:
            from .convert_compressed import compress
            for a, b in need:
                compress(self, a, b)
            return
        i = 0
        for a, b in need:
            fresh_from = t.alloc_end
            # -n --target-is-zero: qemu-img writes no zeroes, so a cluster
            # reused in place keeps its old bytes where the source is zero
            old = old_hosts(self, a, b) if self.o.no_create and self.o.target_is_zero \
                else {}
            maps = t.allocate(a, b - a)
            self.allocated.extend(maps)
            for m in maps:
                if m.host_offset < fresh_from and not self.prealloc:   # -n: old data
                    for h, ln in not_in_place(self, m, old):
                        _punch(self.tg.dfd, h, sector_size(ln))
            while i < len(pieces) and pieces[i][0] + pieces[i][1] <= a:
                i += 1
            j = i
            while j < len(pieces) and pieces[j][0] < b:
                s, ln, kind, fd, host, _ = pieces[j]
                if kind != ZERO or not self.o.sparse_size:
                    ps, pe = max(s, a), min(s + ln, b)
                    for m in maps:
                        ms, me = max(ps, m.start), min(pe, m.start + m.length)
                        if ms >= me:
                            continue
                        h = m.host_offset + (ms - m.start)
                        if kind == DATA:
                            items.append((host + (ms - s), h, me - ms, self.copy_kind, fd))
                        elif kind == ZERO:       # -S 0: zeroes written as data
                            items.append((0, h, me - ms, COPY, self._zero_fd()))
                        else:
                            self._through(ms, me - ms, h)
                j += 1
        if self.eng_prealloc and t.data_end > self.file_end:
            # the engine allocates these clusters ahead of its writes and
            # punches the zero runs it finds in them out again: a punch
            # past the end of the file does nothing (ext4), so the file
            # covers them first (the length the flush gives it anyway)
            os.ftruncate(self.tg.dfd, t.data_end)
            self.file_end = t.data_end

    def _feed(self, eng) -> None:
        """Plan work ranges until about a work range of items is queued."""
        queued = 0
        while self.next_pos < self.size and queued < CHAIN_WORK:
            pos = self.next_pos
            n = min(CHAIN_WORK if self.started else FIRST_WORK, self.size - pos)
            pieces = self._pieces(pos, n)
            items: list = []
            if self.tg.t is None:
                self._items_raw(pieces, items)
            else:
                self._items_qcow2(pieces, pos, n, items)
            nbytes = sum(it[2] for it in items)
            eng.add(items)
            if not self.started:
                eng.run(0)      # the workers start now, not after the whole feed
                self.started = True
            queued += nbytes
            self.py_done += max(0, n - nbytes)
            self.next_pos = pos + n

    # -- run -----------------------------------------------------------------
    def run(self) -> ConvertResult:
        o = self.o
        try:
            self._open()
            self._create_target()
            if self.tg.t is not None:
                self.target_zero = True      # fresh or punched host clusters only
                if o.no_create and not o.target_is_zero:
                    self.target_zero = False     # decides zero clusters (see _plan_qcow2)
                eng_zero = True
            else:
                self.target_zero = eng_zero = self.tg.ours is not None or o.target_is_zero
            # Block status already split holes off (raw layers by SEEK_DATA, qcow2
            # by its tables): plain COPY spares the engine a SEEK_DATA walk per
            # item under its queue lock; zero detection still runs on the data.
            self.copy_kind = COPY
            self.next_pos = 0
            bucket = None
            if o.rate:
                from ..native.ratelimit import TokenBucket     # -r only (start-up)
                bucket = TokenBucket(o.rate)
            # an O_DIRECT target: each write waits for the disk, larger ones pay
            req = o.request_size or (WB_REQUEST if dio.is_direct(self.tg.dfd) else CHAIN_REQUEST)
            self.eng_prealloc = self._engine_prealloc()
            if self.eng_prealloc and self.tg.t is not None:
                self.file_end = os.fstat(self.tg.dfd).st_size
            with CopyEngine(self.fds[0], self.tg.dfd, threads=o.threads,
                            request_size=req, zero_block=o.sparse_size,
                            target_is_zero=eng_zero, may_unmap=o.sparse_size != 0,
                            write_behind=o.flush,     # the final fsync finds little left
                            prealloc=self.eng_prealloc,
                            bucket=bucket, src_path=self.src, dst_path=self.dst) as eng:
                self.tg.written = True
                drive(eng, lambda: self._feed(eng), lambda: self.next_pos < self.size,
                      lambda: min(self.size, self.py_done + eng.status().done), self.size,
                      LOW_WATER, self.progress, self.check)
                st = eng.status()
            self._finish()
            return ConvertResult(self.size, st.data_bytes, st.zero_bytes)
        except BaseException as e:
            err = self.tg.failed(self._at_guest(e), self._status_run)
            if err is not e:
                raise err from None
            raise
        finally:
            if self._pool is not None:
                self._pool.shutdown(cancel_futures=True)
                self._pool = None
            self.tg.close(failed=False)
            if self.zfd >= 0:
                os.close(self.zfd)
                self.zfd = -1
            for n in (self.top, self.base):
                if n is not None:
                    n.close_chain()

    def _engine_prealloc(self) -> bool:
        """Whether the engine allocates the target ranges of its copy items
        ahead of the writes (``CopyEngine(prealloc=)``): a raw file we
        created, or the fresh data clusters of a qcow2 target we created
        (no ``-n``, no ``-o preallocation``, no external data file, whose
        clusters are not known fresh; ``-c`` does not use the engine's
        writes). Those read as zeroes until written, so the zero
        runs the engine finds in the data are punched out again and the
        file holds the blocks it held without."""
        if self.tg.t is None:
            return self.tg.sparse_new
        return self.tg.ours is not None and not self.o.no_create and not self.prealloc \
            and not self.o.compress and not self.tg.t.external \
            and not dio.is_direct(self.tg.dfd)

    def _at_guest(self, e: BaseException) -> BaseException:
        """A failed write into a qcow2 target names the host offset the
        engine wrote at: the same error at the guest offset instead (what
        qemu-img names, and what the user can look up in the source)."""
        if self.tg.t is None or not isinstance(e, CopyError) or e.side != "target" \
                or e.offset is None:
            return e
        for m in self.allocated:
            if m.host_offset <= e.offset < m.host_offset + m.length:
                return CopyError(e.errno, e.what, path=e.path, side=e.side,
                                 offset=m.start + e.offset - m.host_offset)
        return e

    def _status_run(self, guest: int) -> tuple[int, int]:
        """(start, length) of the source's block status run that holds
        ``guest`` (runs as qemu-img map merges them: one kind, one layer,
        contiguous host offsets), where qemu-img convert's requests start."""
        last = self.top.block_status(0, min(self.size, guest + 1))[-1]
        return last["start"], last["length"]

    def _finish(self) -> None:
        """Once the data is written: a qcow2 target's zero clusters made
        holes again and its metadata flushed (refcounts, L2, L1, header); a
        raw one's data flushed (-t writeback)."""
        try:
            if self.tg.t is not None:
                sparsify(self)
                self.tg.t.flush()
            elif self.o.flush:
                os.fsync(self.tg.dfd)
        except OSError as e:
            raise CopyError(e.errno or errno.EIO, "error flushing", path=self.dst, side="target") from None


def _open_failure(path: str, e: BlkjobsError) -> str:
    """Why ``path`` did not open, as QEMU's block layer says it (the file
    layer's ``Could not open 'PATH': REASON``, a format's reason alone)."""
    if isinstance(e, OSErrorWithContext):
        return f"Could not open '{path}': {os.strerror(e.errno)}"
    text = str(e)
    if text.startswith(f"'{path}': "):
        text = text[len(path) + 4:]
    return "Image is not in qcow2 format" if text == "not a qcow2 image (bad magic)" else text
