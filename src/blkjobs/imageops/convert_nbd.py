"""``convert`` where the source or the target is an NBD export.

An export has no host file for the C copy engine's ``pread``/``pwrite``, so
the bytes move through buffers: ``2 * threads`` workers each take a piece of
the source's data runs (``CHUNK`` bytes), read it into their own buffer
(from NBD: pipelined requests on the worker's own connection, GIL
released; see :mod:`blkjobs.native.nbd`) and write it to the target (an
export: the same; a local raw file: ``pwrite``; qcow2: its driver, one
writer at a time). Runs the source's block status calls zero are written as
zeroes (NBD ``WRITE_ZEROES``) or, in a fresh local file, skipped; data
pieces that read as zeroes (``-S``, as qemu-img detects them) likewise.

Targets: an existing export (with or without ``-n``: it is never created
or grown, qemu-img's texts when it is smaller), or a local raw/qcow2 file
(created unless ``-n``; removed again when the copy fails, unless invoked
as qemu-img). qcow2 is not layered over NBD (raw only), nor are ``-B``/``-c``
supported here, except from a source under fault injection (convert_faults).
"""
from __future__ import annotations

import errno
import os
import time

from ..errors import BlkjobsError, CopyError, UsageError
from ..formats import is_nbd_uri
from ..graph.lock import ImageLock
from ..native.extents import zero_blocks
from ..native.ratelimit import TokenBucket
from ..units import sector_size
from .convert_base import ConvertOptions, ConvertResult, encrypted as _encrypted, injects_faults
from .convert_target import identity, lock_target, say_what_happened_to_target

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from collections.abc import Callable
    import queue
    import threading
    from typing import Any

WORK = 256 << 20            # block status asked per work range
CHUNK = 4 << 20             # bytes per worker piece
FAST_PIECE = 64 << 20       # bytes per piece of the C path (Nbd.copy_fd)
SPARSE_BLOCK = 1 << 20      # zero detection granularity of data pieces


def convert_nbd(src: str, dst: str, o: ConvertOptions,
                progress: Callable[[int, int], None] | None = None,
                check: Callable[[], None] | None = None) -> ConvertResult:
    """Convert where ``src`` or ``dst`` is an NBD URI (see the module)."""
    in_order = injects_faults(src) and not is_nbd_uri(dst) and not o.salvage \
        and not _encrypted(src, dst, o)
    if (o.backing or o.compress) and in_order:
        if o.dst_fmt != "qcow2":
            raise UsageError("Backing file not supported for file format 'raw'" if o.backing
                             else f"Compression not supported for this file format ({o.dst_fmt})")
    elif o.backing or o.compress:
        with_what = "NBD" if is_nbd_uri(src) or is_nbd_uri(dst) else \
            "--salvage" if o.salvage else "encrypted images"
        raise UsageError(f"convert: {'-B' if o.backing else '-c'} is not supported with "
                         f"{with_what}")
    if is_nbd_uri(dst) and o.dst_fmt != "raw":
        raise UsageError(f"'{dst}': only the raw format is written over NBD (qcow2 is "
                         "read-only there)")
    return _NbdConvert(src, dst, o, progress, check).run()


class _NbdConvert:
    def __init__(self, src, dst, o: ConvertOptions, progress, check):
        # here, not at the top: a local convert needs no threads of ours (start-up)
        import threading
        self.src, self.dst, self.o = src, dst, o
        self.progress, self.check = progress, check
        self.top: Any = None         # the source's top node
        self.t: Any = None           # the target's driver
        self.fast: Any = None        # see _choose_path
        self.tlock: ImageLock | None = None
        self.ours: tuple[int, int] | None = None
        self.written = False
        self.done = 0
        self.data_bytes = self.zero_bytes = 0
        self.err: BaseException | None = None
        self.stop = threading.Event()
        self.src_lock: threading.Lock | None = None
        self.dst_lock: threading.Lock | None = None
        self.bucket = TokenBucket(o.rate) if o.rate else None
        #: qemu-img's own loop, one request after the other (convert_faults)
        self.in_order = injects_faults(src) and not is_nbd_uri(dst)
        self.backing_size: int | None = None     # -B: the backing file's size
        self.cluster = 0                         # the target's cluster size

    # -- setup ---------------------------------------------------------------
    def _open(self) -> None:
        import threading
        from .images import open_ro
        self.top = open_ro(self.src, self.o.src_fmt, force_share=self.o.force_share,
                           stable=True)
        self.size = self.top.size
        # drivers that keep caches (qcow2) are read by one worker at a time
        if any(n.driver.cluster_size and not n.driver.parallel_reads for n in self.top.chain()):
            self.src_lock = threading.Lock()

    def _open_target(self) -> None:
        import threading
        from ..formats import create_image, open_image
        o, dst = self.o, self.dst
        if is_nbd_uri(dst):
            self.t = open_image(dst, "raw", read_only=False)
            self.t.set_unsafe(not o.flush)
            if self.t.size < self.size:
                raise UsageError("output file is smaller than input file" if o.no_create
                                 else f"{dst}: error while converting raw: Cannot grow NBD nodes")
            self.target_zero = o.target_is_zero
            return
        self.tlock = lock_target(dst, o.dst_fmt, o.no_create)
        if not o.no_create:
            if os.path.isdir(dst):
                raise CopyError(errno.EISDIR, "Could not create target", path=dst)
            copts = dict(o.create_opts)
            copts.pop("size", None)
            if o.backing:
                copts["backing_file"], copts["backing_format"] = o.backing, o.backing_fmt
            size = self.size if o.dst_fmt == "raw" else sector_size(self.size)
            try:
                create_image(dst, o.dst_fmt, size, **copts)
            except OSError as e:
                raise CopyError(e.errno or errno.EIO, "Could not create target", path=dst) from None
            st = os.lstat(dst)
            self.ours = (st.st_dev, st.st_ino)
            if self.tlock is None:
                self.tlock = ImageLock(dst, write=True)
        try:
            self.t = open_image(dst, o.dst_fmt, read_only=False)
        except OSError as e:
            raise CopyError(e.errno or errno.EIO, "Could not open target", path=dst) from None
        if self.ours is not None:
            self.ours = identity(self.t.fd)
        if self.t.size < self.size:
            raise UsageError(f"target '{dst}' is smaller than the source "
                             f"({self.t.size} < {self.size} bytes)")
        if o.dst_fmt == "qcow2":
            self.t.unsafe = not o.flush
            self.t.unmap_freed = bool(o.sparse_size)     # qemu-img: discard=unmap
            self.dst_lock = threading.Lock()
        # a fresh luks payload reads as noise, not zeroes, and so do the
        # clusters an encrypted qcow2 preallocates: holes are written
        prealloc = o.create_opts.get("preallocation", "off") not in ("off", None)
        self.target_zero = o.target_is_zero or (
            self.ours is not None and self.t.format_name != "luks"
            and not (prealloc and self.t.encrypted))
        if o.backing:       # (qemu-img: no zero init with a backing file)
            self.target_zero = o.target_is_zero
            self.backing_size = self._backing_size()
        self.cluster = self.t.cluster_size or 0

    def _backing_size(self) -> int:
        """-B: the size of the target's backing file (qemu-img leaves the
        target unallocated past it where the source reads zeroes)."""
        from ..graph import resolve_backing
        from .images import open_ro
        assert self.o.backing is not None
        b = open_ro(resolve_backing(self.dst, self.o.backing), self.o.backing_fmt,
                    force_share=True)
        try:
            return b.size
        finally:
            b.close_chain()

    # -- the work ----------------------------------------------------------------
    def _plan(self, q: queue.Queue) -> None:
        """Queue (offset, length, is_data) pieces of the whole source."""
        pos = 0
        while pos < self.size and not self.stop.is_set():
            n = min(WORK, self.size - pos)
            try:
                runs = self.top.block_status(pos, n)
            except OSError as e:
                raise CopyError(e.errno or errno.EIO, "error reading", path=self.src,
                                side="source", offset=pos) from None
            for r in runs:
                s, ln = r["start"], r["length"]
                if not r["data"]:
                    self._put(q, (s, ln, False))
                    continue
                piece = FAST_PIECE if self.fast is not None else CHUNK
                for c in range(s, s + ln, piece):
                    self._put(q, (c, min(piece, s + ln - c), True))
            pos += n

    def _put(self, q: queue.Queue, item) -> None:
        """Queue ``item``; give up (quietly) once the copy stops: the
        workers that would take it are gone."""
        import queue
        while not self.stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return
            except queue.Full:
                pass

    def _read(self, off: int, mv) -> None:
        try:
            self._read_once(off, mv)
        except OSError as e:
            if self.o.salvage:
                return self._salvage(off, mv)
            raise CopyError(e.errno or errno.EIO, "error reading", path=self.src,
                            side="source", offset=off) from None

    def _read_once(self, off: int, mv) -> None:
        if self.src_lock is None:
            self.top.readinto(off, mv)
        else:
            with self.src_lock:
                self.top.readinto(off, mv)

    def _salvage(self, off: int, mv) -> None:
        """--salvage: read sector by sector; one that fails reads as zeroes
        (and is told to ``on_salvage``)."""
        for pos in range(0, len(mv), 512):
            sector = mv[pos:pos + 512]
            try:
                self._read_once(off + pos, sector)
            except OSError as e:
                sector[:] = bytes(len(sector))
                if self.o.on_salvage is not None:
                    self.o.on_salvage(off + pos, e.errno or errno.EIO)

    def _write(self, fn, off: int, *args) -> None:
        try:
            if self.dst_lock is None:
                fn(off, *args)
            else:
                with self.dst_lock:
                    fn(off, *args)
        except OSError as e:
            raise CopyError(e.errno or errno.EIO, "error writing", path=self.dst,
                            side="target", offset=off) from None

    def _zero(self, off: int, n: int) -> None:
        if not self.o.sparse_size:      # -S 0: qemu-img writes the zeroes as data
            self._data(memoryview(bytes(min(n, SPARSE_BLOCK))), off, 0, n, repeat=True)
            return
        if not self.target_zero:
            self._write(self.t.write_zeroes, off, n, True)
        with self.lock:
            self.zero_bytes += n
            self.done += n

    def _piece(self, buf: memoryview, off: int, n: int) -> None:
        if self.bucket is not None:
            with self.lock:
                wait_ns = self.bucket.take(n)
            if wait_ns > 0:
                self.stop.wait(wait_ns / 1e9)
        mv = buf[:n]
        self._read(off, mv)
        self._store(mv, off, n)

    def _store(self, mv: memoryview, off: int, n: int) -> None:
        """Write the ``n`` bytes read at ``off``; runs of zeroes as zeroes
        (skipped where the target reads as zeroes), as qemu-img finds them
        (is_allocated_sectors_min): at least ``-S`` bytes of whole zero
        blocks of its alignment (``-S`` rounded down to a power of two),
        aligned in the image."""
        pos = 0
        for z0, zn in self._zero_runs(mv, off, n):
            if z0 > pos:
                self._data(mv, off, pos, z0)
            self._zero(off + z0, zn)
            pos = z0 + zn
        if pos < n:
            self._data(mv, off, pos, n)

    def _data(self, mv: memoryview, off: int, a: int, b: int, repeat: bool = False) -> None:
        """Write mv[a:b] at off+a (``repeat``: mv is one block of zeroes,
        written over and over)."""
        for pos in range(a, b, SPARSE_BLOCK):
            k = min(SPARSE_BLOCK, b - pos)
            self._write(self.t.write, off + pos, mv[:k] if repeat else mv[pos:pos + k])
            with self.lock:
                self.data_bytes += k
                self.done += k

    def _zero_runs(self, mv: memoryview, off: int, n: int) -> list[tuple[int, int]]:
        """(start, length) in ``mv`` of the zero runs qemu-img would not
        write as data (see _store); none with -S 0."""
        min_sparse = self.o.sparse_size
        if not min_sparse:
            return []
        align = 1 << (min_sparse.bit_length() - 1)
        head = min(n, -off % align)         # up to the first aligned block
        # (a short last block counts: qemu-img's request ends there)
        runs = [(head + s, k) for s, k in zero_blocks(mv[head:n], align)]
        return [(s, k) for s, k in runs if k >= min(min_sparse, n)]

    def _choose_path(self) -> None:
        """``self.fast``: (export, local fd, to_nbd) when one side is an
        export and the other a plain local raw file (no backing file, no
        rate limit): then :meth:`Nbd.copy_fd` moves whole pieces in C.
        Otherwise None: the buffer path."""
        self.fast = None
        if self.bucket is not None or self.top.backing is not None:
            return
        src, dst = self.top.driver, self.t

        def plain(d: Any) -> bool:
            return bool(d.host_file and d.format_name == "raw" and not d.cluster_size
                        and not d.injects_faults)

        def export(d: Any) -> bool:       # the export itself (not qcow2 over it)
            return d.protocol == "nbd" and not d.has_metadata

        if export(src) and plain(dst):
            self.fast = (src, dst.fd, False)
        elif export(dst) and plain(src):
            self.fast = (dst, src.fd, True)

    def _fast_piece(self, off: int, n: int) -> None:
        from ..native.nbd import NbdCopyError
        nbd, fd, to_nbd = self.fast
        skip = self.o.sparse_size != 0 and self.target_zero
        try:
            data, zero = nbd.copy_fd(fd, to_nbd, off, n, skip, self.o.sparse_size != 0)
        except NbdCopyError as e:
            what = "error reading" if e.side == "source" else "error writing"
            path = self.src if e.side == "source" else self.dst
            raise CopyError(e.errno or errno.EIO, what, path=path, side=e.side,
                            offset=e.offset) from None
        except OSError as e:        # the export broke before (another worker)
            side = "source" if not to_nbd else "target"
            raise CopyError(e.errno or errno.EIO, "error reading" if not to_nbd else
                            "error writing", path=self.src if not to_nbd else self.dst,
                            side=side, offset=off) from None
        with self.lock:
            self.data_bytes += data
            self.zero_bytes += zero
            self.done += n

    def _worker(self, q: queue.Queue) -> None:
        import queue
        buf = memoryview(bytearray(CHUNK))
        try:
            while not self.stop.is_set():
                try:
                    item = q.get(timeout=0.05)
                except queue.Empty:
                    continue
                if item is None:
                    return
                off, n, data = item
                if data and self.fast is not None:
                    self._fast_piece(off, n)
                elif data:
                    self._piece(buf, off, n)
                else:
                    self._zero(off, n)
        except BaseException as e:
            with self.lock:
                if self.err is None:
                    self.err = e
            self.stop.set()

    def _copy(self) -> None:
        import queue
        import threading
        self.lock = threading.Lock()
        if self.in_order:
            from .convert_faults import copy_in_order   # here: an NBD copy does not need it
            return copy_in_order(self)
        q: queue.Queue = queue.Queue(maxsize=64)
        # two workers per -m slot: one reads while the other writes (each
        # NBD connection stays busy; measured: 8 workers ~2x faster than 4)
        # (the C path: one worker per NBD connection, each copies both sides)
        n = 2 * self.o.threads if self.fast is None else self.fast[0].connections
        workers = [threading.Thread(target=self._worker, args=(q,), daemon=True,
                                    name=f"nbd-convert-{i}") for i in range(n)]
        for w in workers:
            w.start()
        planner_err: list[BaseException] = []

        def plan() -> None:
            try:
                self._plan(q)
            except BaseException as e:
                planner_err.append(e)
                self.stop.set()
            finally:
                for _ in workers:
                    self._put(q, None)
        planner = threading.Thread(target=plan, daemon=True, name="nbd-convert-plan")
        planner.start()
        try:
            while any(w.is_alive() for w in workers):
                for w in workers:
                    w.join(0.1 / len(workers))
                if self.progress:
                    self.progress(min(self.done, self.size), self.size)
                if self.check:
                    self.check()
        except BaseException:
            self.stop.set()
            raise
        finally:
            self.stop.set()
            self._drain(q)
            planner.join()
            for w in workers:
                w.join()
        if self.err is not None:
            raise self.err
        if planner_err:
            raise planner_err[0]

    @staticmethod
    def _drain(q: queue.Queue) -> None:
        import queue
        try:
            while True:
                q.get_nowait()
        except queue.Empty:
            pass

    def run(self) -> ConvertResult:
        try:
            self._open()
            self._open_target()
            if self.progress:
                self.progress(0, self.size)
            self.written = True
            self._choose_path()
            t0 = time.monotonic()
            self._copy()
            self._finish()
            self.elapsed = time.monotonic() - t0
            return ConvertResult(self.size, self.data_bytes, self.zero_bytes)
        except BaseException as e:
            if self.o.keep_failed_target:       # qemu-img's: closed, kept, not said
                self._close_target(failed=False)
                raise
            self._close_target(failed=True)
            err = say_what_happened_to_target(e, self.dst, self.ours, self.written)
            if err is not e:
                raise err from None
            raise
        finally:
            self._close_target(failed=False)
            if self.top is not None:
                self.top.close_chain()

    def _finish(self) -> None:
        t = self.t
        try:
            if self.o.flush or t.has_metadata:
                t.flush()       # -t unsafe (the default): an export is not flushed either
        except OSError as e:
            raise CopyError(e.errno or errno.EIO, "error flushing", path=self.dst, side="target") from None

    def _close_target(self, failed: bool) -> None:
        if self.t is not None:
            t, self.t = self.t, None
            if t.host_file and (failed or (not self.o.flush and not t.has_metadata)):
                # failed: do not flush half-made metadata; -t unsafe into a
                # raw file: no fsync (the raw driver's close would do one)
                t.read_only = True
            try:
                t.close()
            except (OSError, BlkjobsError):
                pass
        if self.tlock is not None and not failed:
            self.tlock.release()
            self.tlock = None
