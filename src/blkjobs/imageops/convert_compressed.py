"""``convert -c``: a new qcow2 target's clusters compressed and stored in
guest order (:func:`compress`, called by
:class:`.convert_chain.ChainConvert` for each range of target clusters it
planned, ``cv``). Imported only when ``-c`` is given."""
from __future__ import annotations

import errno
import os

from ..errors import CopyError
from .convert_faults import overwrites

TYPE_CHECKING = False     # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from typing import Any

BUF = 4 << 20                  # compressed in chunks of this many bytes (convert_chain's BUF)


def compress(cv: Any, a: int, b: int) -> None:
    """Compress [a, b) on ``-m`` threads, storing the clusters in order.
    zlib (QEMU's default): the C core compresses a chunk of clusters at a
    time, no Python (nor GIL) per cluster, called from a thread of its
    own so that chunk k+1 is read and compressed while chunk k is stored;
    zstd: the codec's Python binding on a thread pool (it releases the
    GIL)."""
    t = cv.tg.t
    cs = t.cluster_size
    must_zero = t.backing_filename is not None or not cv.target_zero
    chunk = max(cs, BUF // cs * cs)
    if t.ctype != 0:
        _compress_pool_path(cv, a, b, must_zero, chunk)
        return
    from ..native.compress import Deflater
    if cv._deflater is None:
        # a stream of cs bytes or more is stored plain (write_compressed's
        # rule); two of each: chunk k+1 compresses while chunk k is stored
        cv._deflater = [Deflater(cs, chunk // cs, cv.o.threads, cs - 1)
                        for _ in range(2)]
        cv._cbuf = memoryview(bytearray(2 * chunk))
    if cv._pool is None:
        from concurrent.futures import ThreadPoolExecutor
        cv._pool = ThreadPoolExecutor(1, thread_name_prefix="compress")
    assert cv._cbuf is not None
    pending = None
    pos, j = a, 0
    while pos < b or pending is not None:
        nxt = None
        if pos < b:
            k = min(chunk, b - pos)
            buf = cv._cbuf[j * chunk:j * chunk + k]
            cv._read_src(pos, buf)
            nxt = (pos, buf, cv._deflater[j], cv._pool.submit(cv._deflater[j].run, buf))
            pos += k
            j ^= 1
        if pending is not None:
            _store_deflated(cv, *pending, must_zero)
        pending = nxt


def _store_deflated(cv: Any, pos: int, buf: memoryview, d: Any, fut: Any,
                    must_zero: bool) -> None:
    """Store the chunk at ``pos`` once its Deflater ``d`` is done."""
    from ..native.compress import ZERO
    cs = cv.tg.t.cluster_size
    k = len(buf)
    work: list[tuple[int, memoryview, bytes | None]] = []
    for i, n in enumerate(fut.result()):
        c = buf[i * cs:min(k, i * cs + cs)]
        if n == ZERO and not cv.o.sparse_size:   # -S 0: zeroes stored too
            work.append((pos + i * cs, c, _zero_compressed(cv, len(c))))
        elif n == ZERO:
            work.append((pos + i * cs, c, None))
        else:
            # a stream as long as the cluster: write_compressed stores it plain
            z = bytes(d.out[i * cs:i * cs + n]) if n else bytes(cs)
            work.append((pos + i * cs, c, z))
    _store_compressed(cv, work, must_zero)


def _zero_compressed(cv: Any, n: int) -> bytes:
    """A cluster of ``n`` zero bytes, compressed (``-c -S 0`` stores them
    as qemu-img does)."""
    z = cv._zeros_z.get(n)
    if z is None:
        z = cv._zeros_z[n] = cv.tg.t.compress_cluster(bytes(n))
    return z


def _compress_pool_path(cv: Any, a: int, b: int, must_zero: bool, chunk: int) -> None:
    """zstd: chunk k+1 is read and compressing on the pool while chunk k
    is stored."""
    from collections import deque

    from ..native.extents import is_zero
    t = cv.tg.t
    cs = t.cluster_size
    if cv._pool is None:
        from concurrent.futures import ThreadPoolExecutor
        cv._pool = ThreadPoolExecutor(cv.o.threads, thread_name_prefix="compress")
    pending: deque = deque()
    pos = a
    while pos < b or pending:
        if pos < b:
            k = min(chunk, b - pos)
            buf = memoryview(bytearray(k))
            cv._read_src(pos, buf)
            work = []
            for x in range(0, k, cs):
                c = buf[x:min(k, x + cs)]
                fut = None if is_zero(c) and cv.o.sparse_size else \
                    cv._pool.submit(t.compress_cluster, c)
                work.append((pos + x, c, fut))
            pending.append(work)
            pos += k
        if len(pending) > 1 or pos >= b:
            _store_compressed(cv, [(o, c, f if f is None else f.result())
                                   for o, c, f in pending.popleft()], must_zero)


def _store_compressed(cv: Any, work: list, must_zero: bool) -> None:
    t: Any = cv.tg.t
    for off, c, z in work:
        try:
            if z is None:
                if must_zero:
                    t.write_zeroes(off, len(c))
            else:
                if cv.o.no_create and overwrites(t, off, len(c)):
                    # QEMU's compressed write never goes over a cluster
                    # that has host space: EIO (qemu-img convert -n -c)
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
                t.write_compressed(off, c, z)
        except OSError as e:
            if cv.o.keep_failed_target:       # qemu-img's words: the request (cluster)
                err = CopyError(e.errno or errno.EIO, f"error while writing at byte {off}")
                err.path, err.side, err.offset = cv.dst, "target", off
                raise err from None
            raise CopyError(e.errno or errno.EIO, "error writing", path=cv.dst,
                            side="target", offset=off) from None
