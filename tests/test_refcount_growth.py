"""QEMU's refcount-table growth (formats/qcow2/refcount.py: refcount_area):
images whose refcount table must grow, or whose L1 table lies beyond the
first refcount block, laid out as QEMU 7.2 lays them out.

512-byte clusters make the thresholds small: a one-cluster table holds 64
blocks of 256 counts, 16384 clusters (8 MiB of file). Metadata
preallocation needs a larger table from 8 224 768 bytes (7.84375 MiB) on;
falloc/full reach past the first refcount block with the L1 table from
506 MiB + 512 bytes on (a 254-cluster L1 table from cluster 3), from
about 122 MiB on with 64-bit refcounts (64 counts a block), the sizes used
here. Those tests work on a tmpfs (/dev/shm): QEMU syncs each metadata update, which
takes it tens of seconds on a loaded disk, and not on a tmpfs.
"""
from __future__ import annotations

import hashlib
import os
import random
import struct

import pytest

from conftest import blocks, qemu_compare, run_blkjobs
from daemon_util import run_daemon, side_by_side, start_blkjobs
from qemu_oracle import check_clean, qemu_img, qemu_io
from test_daemon_create import create as daemon_create
from test_parity_invocation import same, twins  # twins: the fixture tmpfs_twins calls

#: the first size whose metadata preallocation grows the table (512 B clusters)
META_THRESHOLD = 8224768
#: an L1 table of 62 clusters from cluster 3: past the first block of 64
#: counts (512 B clusters, 64-bit refcounts)
L1_PAST_BLOCK0 = 123 << 20
#: the smallest size whose falloc/full L1 table needs a larger refcount
#: table (512 B clusters, 64-bit refcounts): 4031 L1 clusters from cluster 3,
#: the refcount blocks they need after them reach block 64, one past the
#: first table's 64 entries (one L1 cluster less, 2 MiB less, still fits)
L1_GROWS_TABLE = 4030 * (2 << 20) + 512
#: qemu-img 7.2's image of that size, SHA-256 of the file outside its data
#: run (every other byte: header, L1 table, refcount blocks and tables, the
#: gaps, the L2 tables), and its size. Made by ``qemu-img create -f qcow2 -o
#: preallocation=falloc,cluster_size=512,refcount_bits=64 t.qcow2
#: 8451523072`` (about 20 minutes: too long to run in a test) and
#: :func:`_outside_data`
L1_GROWS_TABLE_QEMU = ("26706946cee7b5d9e8ff87a25fce555eb5310dd545cd65df152ede7112904a8e",
                       8724089344)


@pytest.fixture
def tmpfs(shm_path):
    """A directory on a tmpfs for the large preallocated images (conftest)."""
    return shm_path


@pytest.fixture
def tmpfs_twins(tmpfs):
    """The twins (tests/test_parity_invocation.py's fixture, called as the
    function it wraps) in a directory on a tmpfs."""
    return twins.__wrapped__(tmpfs)


def _table(path) -> tuple[int, int]:
    """(refcount_table_offset, refcount_table_clusters) from the header."""
    with open(path, "rb") as f:
        head = f.read(64)
    return struct.unpack(">QI", head[48:60])


@pytest.mark.parametrize("opts,size,table", [
    (",cluster_size=512", META_THRESHOLD - 512, (512, 1)),      # just fits the first table
    (",cluster_size=512", META_THRESHOLD, (16641 * 512, 2)),     # the first growth
    (",cluster_size=512", 17 << 20, None),                       # two growths
    (",cluster_size=512,refcount_bits=64", 3 << 20, None),       # 64 counts a block
])
def test_metadata_prealloc_growing_the_table_as_qemu_img(tmpfs_twins, opts, size, table):
    """The new block, the gap up to the next block's range, the refcount
    area there (missing blocks, a table half as large again), the old table
    freed (its bytes left), the next L2 tables and data first fit in the
    gap: the file is qemu-img's byte for byte. (On a tmpfs: qemu-img syncs
    each L2 table it writes.)"""
    twins = tmpfs_twins
    same(twins, "create", "-f", "qcow2", "-o", f"preallocation=metadata{opts}", "t.qcow2",
         str(size))
    ours, theirs = (d / "t.qcow2" for d in twins)
    assert ours.read_bytes() == theirs.read_bytes()
    check_clean(ours)
    if table:
        assert _table(ours) == table
    else:
        assert _table(ours)[1] > 1


@pytest.mark.parametrize("mode", ["falloc", "full"])
def test_falloc_full_with_the_l1_table_beyond_the_first_block(tmpfs, mode):
    """The refcount blocks the L1 table's run reaches into are hooked up
    after it (QEMU's grow_l1_table), the refcount area follows them: the
    file is qemu-img's byte for byte (once the L1 table had to lie within
    the first block), check clean, the data allocated."""
    opts = f"preallocation={mode},cluster_size=512,refcount_bits=64"
    ours, theirs = tmpfs / "ours.qcow2", tmpfs / "theirs.qcow2"
    run_blkjobs("create", "-q", "-f", "qcow2", "-o", opts, ours, L1_PAST_BLOCK0, check=True)
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, theirs, str(L1_PAST_BLOCK0))
    assert ours.read_bytes() == theirs.read_bytes()
    check_clean(ours)
    assert blocks(ours) >= L1_PAST_BLOCK0


def test_blockdev_create_growing_the_table_matches_qsd(tmpfs):
    """The daemon's blockdev-create, metadata past the first table and
    falloc with the L1 table past the first block (once refused): the
    files are qemu-storage-daemon's byte for byte (their SHA-256), check
    clean. (qemu-storage-daemon takes some 6 s for the falloc one.)"""
    cases = [("metadata", 9 << 20, 16), ("falloc", L1_PAST_BLOCK0, 64)]

    async def sc(s, d):
        out = []
        for i, (mode, size, bits) in enumerate(cases):
            path = str(d / f"g{i}.qcow2")
            await daemon_create(s, f"g{i}f", {"driver": "file", "filename": path, "size": 0})
            await s.x("blockdev-add", driver="file", filename=path, **{"node-name": f"g{i}"})
            res = await daemon_create(s, f"g{i}", {"driver": "qcow2", "file": f"g{i}",
                                                   "size": size, "preallocation": mode,
                                                   "cluster-size": 512, "refcount-bits": bits})
            await s.x("blockdev-del", **{"node-name": f"g{i}"})
            assert res["jobs"][0].get("error") is None, res
            with open(path, "rb") as f:
                out.append(hashlib.sha256(f.read()).hexdigest())
            check_clean(path)
            (d / f"g{i}.qcow2").unlink()
        return out
    ref, ours = side_by_side(tmpfs, sc)
    assert ours == ref


def test_convert_grows_the_table_twice(tmp_path):
    """convert into 512-byte clusters, 20 MiB of data: the table grows past
    its first cluster and again; the image is clean and holds the data."""
    src = tmp_path / "src.raw"
    src.write_bytes(random.Random(13).randbytes(20 << 20))
    dst = tmp_path / "dst.qcow2"
    run_blkjobs("convert", "-O", "qcow2", "-o", "cluster_size=512", src, dst, check=True)
    check_clean(dst)
    assert _table(dst)[1] > 2
    assert qemu_compare(src, dst, "raw", "qcow2") == (0, "Images are identical.\n")


def test_commit_grows_the_base_table(tmp_path):
    """A commit job writing 12 MiB into a base with 512-byte clusters: the
    base's table grows while the job writes; clean, and equal to the top."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512", base, "12M")
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    qemu_io(top, *(f"write -P {i + 1} {i}M 1M" for i in range(12)))
    assert _table(base) == (512, 1)
    run_blkjobs("commit", top, check=True)
    check_clean(base)
    assert _table(base)[1] > 1
    assert qemu_compare(top, base, "qcow2", "qcow2") == (0, "Images are identical.\n")


def _outside_data(path) -> tuple[str, int]:
    """SHA-256 of a falloc-preallocated image's bytes outside its data run
    (from the first L2 entry's cluster, one cluster per guest cluster), and
    the file's size."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(112)
        size, = struct.unpack(">Q", head[24:32])
        l1_off, = struct.unpack(">Q", head[40:48])
        f.seek(l1_off)
        f.seek(struct.unpack(">Q", f.read(8))[0] & ((1 << 56) - 512))
        start = struct.unpack(">Q", f.read(8))[0] & ((1 << 56) - 512)
        end = start + -(-size // 512) * 512
        f.seek(0)
        h.update(f.read(start))
        f.seek(end)
        while chunk := f.read(64 << 20):
            h.update(chunk)
    return h.hexdigest(), os.path.getsize(path)


def _need_disk(where) -> None:
    """These tests allocate L1_GROWS_TABLE bytes for real: say so plainly
    (a failure, not a skip) instead of an ENOSPC deep in the run."""
    free = os.statvfs(where).f_bavail * os.statvfs(where).f_frsize
    need = L1_GROWS_TABLE + (512 << 20)
    assert free >= need, (f"{where}: {free >> 20} MiB free, this test allocates "
                          f"{need >> 20} MiB")


def test_falloc_whose_l1_table_grows_the_refcount_table(tmp_path):
    """falloc where the L1 table's refcount blocks need a larger refcount
    table (once laid out otherwise): QEMU's allocator as it runs (the block
    past the table counting itself, a refcount area half as large again from
    the next block's range, the L1 run sought anew, then the exact area for
    the data, the L2 tables first fit in the freed clusters): qemu-img's
    bytes (outside the data run, which falloc leaves reading zeroes) and
    size. On the disk (fallocate there allocates nothing but extents; 8 GiB
    on a tmpfs would be memory). ``full`` lays out the same clusters but
    writes 8 GiB of zeroes: not tested."""
    _need_disk(tmp_path)
    img = tmp_path / "t.qcow2"
    try:
        run_blkjobs("create", "-q", "-f", "qcow2", "-o",
                    "preallocation=falloc,cluster_size=512,refcount_bits=64", img,
                    L1_GROWS_TABLE, check=True)
        outside, allocated = _outside_data(img), blocks(img)
    finally:
        img.unlink(missing_ok=True)     # 8 GiB: not kept even when the test fails
    assert outside == L1_GROWS_TABLE_QEMU
    assert allocated >= L1_GROWS_TABLE


def test_blockdev_create_whose_l1_table_grows_the_refcount_table(tmp_path):
    """The daemon's blockdev-create of that image (once refused): the same
    bytes as qemu-img's (qemu-storage-daemon takes as long as qemu-img)."""
    _need_disk(tmp_path)

    async def sc(s, d):
        path = str(d / "g.qcow2")
        try:
            await daemon_create(s, "gf", {"driver": "file", "filename": path, "size": 0})
            await s.x("blockdev-add", driver="file", filename=path, **{"node-name": "g"})
            res = await daemon_create(s, "g", {"driver": "qcow2", "file": "g",
                                               "size": L1_GROWS_TABLE, "preallocation": "falloc",
                                               "cluster-size": 512, "refcount-bits": 64})
            await s.x("blockdev-del", **{"node-name": "g"})
            assert res["jobs"][0].get("error") is None, res
            return _outside_data(path)
        finally:
            if os.path.exists(path):    # 8 GiB: not kept even when the test fails
                os.unlink(path)
    assert run_daemon(start_blkjobs, tmp_path, sc) == L1_GROWS_TABLE_QEMU


@pytest.mark.slow
@pytest.mark.parametrize("opts,old,new,prealloc", [
    # the new L1 table ends inside its last cluster
    ("cluster_size=512", "4M", "9M", "off"), ("cluster_size=512", "4M", "9M", "metadata"),
    # a 300-cluster L1 table past the first block
    ("cluster_size=512", "0", "600M", "off"), ("cluster_size=512", "0", "600M", "metadata"),
    ("cluster_size=65536", "1G", "100G", "off"),
])
@pytest.mark.slow
def test_resize_growing_the_l1_table_as_qemu_img(tmpfs_twins, opts, old, new, prealloc):
    """resize growing the L1 table: the run at the first free clusters, the
    refcount blocks it lacks after it, the table's bytes written (not a
    whole cluster: the file may end inside it), the old table freed and
    taken first fit (metadata: the first new L2 table there, the data run
    passing over what is left): the file is qemu-img's byte for byte, check
    clean. On a tmpfs: qemu-img syncs each of the 600M metadata resize's
    19 200 L2 table writes, 15-20 s on CI's disk (170 s on a loaded one)."""
    twins = tmpfs_twins
    same(twins, "create", "-q", "-f", "qcow2", "-o", opts, "t.qcow2", old)
    same(twins, "resize", f"--preallocation={prealloc}", "t.qcow2", new)
    ours, theirs = (d / "t.qcow2" for d in twins)
    assert ours.read_bytes() == theirs.read_bytes()
    check_clean(ours)
