"""qcow2 / chain / raw -> raw: the copy engine allocates a fresh raw target's
data ranges as they are queued (raw sources: as the mapper finds them) (``prealloc``: its serial buffered writes then skip
the file system's per-block delayed allocation) and punches the zero runs it
finds in the data out again. The bytes are the source's (``qemu-img
compare``), the target holds no more blocks than qemu-img's own copy, an
interrupted copy stops, and an O_DIRECT target is left alone."""
from __future__ import annotations

import fcntl
import os
import struct

import pytest

from blkjobs.errors import Cancelled
from blkjobs.imageops.convert import ConvertOptions, convert
from blkjobs.native.copy import COPY, COPY_SPARSE, ZERO, CopyEngine
from conftest import run_blkjobs
from qemu_oracle import qemu_img, qemu_io

KiB, MiB = 1 << 10, 1 << 20
SIZE = 8 * MiB


def _base(path):
    """Data, zeroes written as data (whole and part clusters, unaligned to
    clusters), a hole, data up to the end."""
    qemu_img("create", "-q", "-f", "qcow2", path, str(SIZE))
    qemu_io(path, "write -P 0x11 0 1M", "write -P 0 1M 64k", "write -P 0x22 1088k 960k",
            "write -P 0 2052k 8k", "write -P 0x33 3M 1M", "write -P 0x44 6M 2M")


def _source(tmp_path, kind):
    base = str(tmp_path / "base.qcow2")
    _base(base)
    if kind == "qcow2":
        return base
    if kind == "compressed":
        comp = str(tmp_path / "comp.qcow2")
        qemu_img("convert", "-c", "-f", "qcow2", "-O", "qcow2", base, comp)
        return comp
    mid, top = str(tmp_path / "mid.qcow2"), str(tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", mid)
    qemu_io(mid, "write -P 0x55 512k 64k", "write -P 0 3M 128k", "write -z 6M 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top)
    qemu_io(top, "write -P 0x66 7M 64k", "write -P 0 7232k 4k")
    return top


FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 1
FIEMAP_EXTENT_UNWRITTEN = 0x800
_HEAD, _EXT = struct.Struct("=QQIIII"), struct.Struct("=QQQQQIIII")


def _extents(path):
    """FIEMAP: the file's allocated extents as (offset, length, unwritten),
    delayed allocations flushed first. Allocated but never written blocks
    (unwritten) read as zeroes, and SEEK_DATA counts them as holes: only
    FIEMAP tells them from holes."""
    n = 512
    buf = bytearray(_HEAD.pack(0, 1 << 62, FIEMAP_FLAG_SYNC, 0, n, 0) + bytes(_EXT.size * n))
    with open(path, "rb") as f:
        fcntl.ioctl(f.fileno(), FS_IOC_FIEMAP, buf)
    mapped = _HEAD.unpack_from(buf)[3]
    assert mapped < n
    out = []
    for i in range(mapped):
        e = _EXT.unpack_from(buf, _HEAD.size + i * _EXT.size)
        out.append((e[0], e[2], bool(e[5] & FIEMAP_EXTENT_UNWRITTEN)))
    return out


def _segments(path):
    """The file's data runs (SEEK_DATA / SEEK_HOLE)."""
    out, pos, size = [], 0, os.path.getsize(path)
    with open(path, "rb") as f:
        fd = f.fileno()
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    return out


def _converts_as_qemu_img(fmt: str, src: str, ours: str, ref: str, cache: str) -> None:
    """``src`` converted to raw by us (``-t cache``) and by qemu-img: the
    same bytes, the same data segments; the zero runs found in the data
    allocated ahead were punched out again: no block allocated and left
    unwritten, as many data blocks as qemu-img's (st_blocks would count the
    extent tree's blocks too, which vary)."""
    run_blkjobs("convert", "-t", cache, "-f", fmt, "-O", "raw", src, ours, check=True)
    qemu_img("convert", "-f", fmt, "-O", "raw", src, ref)
    assert qemu_img("compare", "-f", fmt, "-F", "raw", src, ours).returncode == 0
    assert _segments(ours) == _segments(ref)
    mine, theirs = _extents(ours), _extents(ref)
    assert not [e for e in mine if e[2]]
    assert sum(e[1] for e in mine) == sum(e[1] for e in theirs)


@pytest.mark.parametrize("kind", ["qcow2", "chain", "compressed"])
@pytest.mark.parametrize("cache", ["unsafe", "writeback", "none"])
def test_data_and_blocks_as_qemu_img(tmp_path, kind, cache):
    src = _source(tmp_path, kind)
    ours, ref = str(tmp_path / "ours.raw"), str(tmp_path / "ref.raw")
    _converts_as_qemu_img("qcow2", src, ours, ref, cache)


def _raw_source(tmp_path):
    """A sparse raw file: data, zeroes written as data, holes."""
    src = str(tmp_path / "src.raw")
    with open(src, "wb") as f:
        f.truncate(SIZE)
        f.write(os.urandom(MiB) + bytes(64 * KiB) + os.urandom(960 * KiB))
        f.seek(2052 * KiB)
        f.write(bytes(8 * KiB) + os.urandom(4 * KiB))
        f.seek(3 * MiB)
        f.write(os.urandom(MiB))
        f.seek(6 * MiB)
        f.write(os.urandom(2 * MiB))
    return src


@pytest.mark.parametrize("cache", ["unsafe", "writeback", "none"])
def test_raw_to_raw_data_and_blocks_as_qemu_img(tmp_path, cache):
    """raw -> raw: the mapper allocates each batch of data extents."""
    src = _raw_source(tmp_path)
    ours, ref = str(tmp_path / "ours.raw"), str(tmp_path / "ref.raw")
    _converts_as_qemu_img("raw", src, ours, ref, cache)


def first_check(src, fmt, dst, dst_fmt, **kw):
    """A rate-limited convert into ``dst`` stopped at its first check:
    (the target's allocated bytes, bytes copied) then. (The test of
    qcow2 targets, test_convert_r2q_prealloc, uses it too.)"""
    seen: list[tuple[int, int]] = []
    done = [0]

    def progress(d, total):
        done[0] = d

    def check():
        seen.append((os.stat(dst).st_blocks * 512, done[0]))
        raise KeyboardInterrupt

    o = ConvertOptions(src_fmt=fmt, dst_fmt=dst_fmt, rate=1 * MiB, flush=False, **kw)
    with pytest.raises((Cancelled, KeyboardInterrupt)):
        convert(src, dst, o, progress, check)
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_allocated_ahead_of_the_writes_and_cancel(tmp_path, fmt):
    """A rate-limited copy: at the first check the whole target's data is
    allocated while little of it is written; raising there cancels it."""
    src = _source(tmp_path, "qcow2") if fmt == "qcow2" else _raw_source(tmp_path)
    blocks, written = first_check(src, fmt, str(tmp_path / "out.raw"), "raw")
    # the source's runs of data of 256 KiB or more (qcow2 clusters, file
    # extents), zeroes written as data included; shorter ones are left to
    # the writes
    data = 5 * MiB
    assert blocks >= data
    assert written < 4 * MiB


def _engine_blocks(tmp_path, flags, items, **kw):
    """The target's allocated bytes after ``add``, before any worker ran."""
    src = str(tmp_path / "s")
    with open(src, "wb") as f:
        f.write(os.urandom(2 * MiB))
    dst = str(tmp_path / "d")
    with open(dst, "wb") as f:
        f.truncate(2 * MiB)
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst, os.O_RDWR | flags)
    try:
        with CopyEngine(sfd, dfd, threads=2, request_size=512 * KiB, **kw) as eng:
            eng.add(items)
            blocks = os.fstat(dfd).st_blocks * 512
            eng.run_to_end()
        with open(src, "rb") as a, open(dst, "rb") as b:
            want = a.read()
            for s, d, n, k in items:
                b.seek(d)
                got = b.read(n)
                assert got == (bytes(n) if k == ZERO else want[s:s + n])
        return blocks
    finally:
        os.close(sfd)
        os.close(dfd)


def test_engine_prealloc_only_where_asked(tmp_path):
    items = [(0, 0, MiB, COPY), (MiB, MiB, 512 * KiB, ZERO), (1536 * KiB, 1536 * KiB, 512 * KiB, COPY)]
    assert _engine_blocks(tmp_path, 0, items, target_is_zero=True, prealloc=True) >= 1536 * KiB
    # without the option, on a target not known to be zero, for sparse items,
    # and on an O_DIRECT target: allocated by the writes only
    assert _engine_blocks(tmp_path, 0, items, target_is_zero=True) == 0
    assert _engine_blocks(tmp_path, 0, items, prealloc=True) == 0
    sparse = [(0, 0, 2 * MiB, COPY_SPARSE)]
    assert _engine_blocks(tmp_path, 0, sparse, target_is_zero=True, prealloc=True) == 0
    assert _engine_blocks(tmp_path, os.O_DIRECT, items, target_is_zero=True, prealloc=True) == 0


@pytest.mark.parametrize("opts", [[], ["-o", "preallocation=falloc"]])
def test_first_block_and_falloc_as_qemu_img(tmp_path, opts):
    """A source whose first cluster is zeroes written as data: the new file's
    first block (allocated by its creation, as QEMU's file driver does) stays
    allocated; a target created with preallocation=falloc keeps every block.
    Both as qemu-img's copy, extent by extent."""
    src = str(tmp_path / "src.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", src, str(SIZE))
    qemu_io(src, "write -P 0 0 64k", "write -P 0x77 64k 1M", "write -P 0 3M 64k",
            "write -P 0x78 4M 1M")
    ours, ref = str(tmp_path / "ours.raw"), str(tmp_path / "ref.raw")
    run_blkjobs("convert", "-f", "qcow2", "-O", "raw", *opts, src, ours, check=True)
    qemu_img("convert", "-f", "qcow2", "-O", "raw", *opts, src, ref)
    assert qemu_img("compare", "-f", "qcow2", "-F", "raw", src, ours).returncode == 0

    def written(path, skip):
        # the written (not unwritten) extents, the first ``skip`` bytes left out
        out = []
        for off, n, unwritten in _extents(path):
            if not unwritten and off + n > skip:
                out.append((max(off, skip), off + n - max(off, skip)))
        return out

    mine, theirs = _extents(ours), _extents(ref)
    assert sum(e[1] for e in mine) == sum(e[1] for e in theirs)
    # with falloc qemu-img writes the first block after allocating the file
    # and blkjobs does not (main did neither): compared from the second block
    assert written(ours, 4096 if opts else 0) == written(ref, 4096 if opts else 0)
