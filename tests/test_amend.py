"""``amend`` against qemu-img 7.2: the same command lines give the same exit
status, stdout (progress lines) and stderr, and the same image byte for byte
(then qemu-img check clean, qemu-io reads the data back)."""
from __future__ import annotations

import pytest

from qemu_oracle import check_clean, qemu_img, qemu_io, to_raw
import test_parity_invocation
from test_parity_invocation import run, same
from test_snapshot import info_no_dates, masked


@pytest.fixture
def twins(shm_path):
    """test_parity_invocation's twins on a tmpfs: qemu-img syncs each
    metadata update of an amend (most of these tests' time on a busy disk)."""
    return test_parity_invocation.twins.__wrapped__(shm_path)


def both(twins, create_opts=(), io=(), size="64M"):
    for d in twins:
        qemu_img("create", "-q", "-f", "qcow2", *create_opts, d / "t.qcow2", size)
        if io:
            qemu_io(d / "t.qcow2", *io)
    return [d / "t.qcow2" for d in twins]


CASES = [
    # (create options, qemu-io commands, amend arguments)
    ((), (), ("-o", "lazy_refcounts=on")),
    ((), (), ("-p", "-o", "lazy_refcounts=on")),
    (("-o", "lazy_refcounts=on"), ("write 0 64k",), ("-o", "lazy_refcounts=off")),
    (("-o", "compat=0.10"), ("write -P 7 0 64k",), ("-p", "-o", "compat=1.1")),
    # no feature name table with clusters of 4k and less (QEMU leaves it out)
    (("-o", "compat=0.10,cluster_size=4k"), ("write -P 7 0 64k",), ("-o", "compat=1.1")),
    (("-o", "compat=0.10,cluster_size=512"), (), ("-o", "compat=1.1")),
    (("-o", "compat=0.10"), (), ("-o", "compat=v3,lazy_refcounts=on")),
    ((), ("write -P 3 0 128k", "write -z 1M 128k"), ("-o", "compat=0.10")),
    ((), ("write -z 0 64k", "write -z 32M 128k"), ("-p", "-o", "compat=0.10")),
    ((), ("write -P 1 0 1M",), ("-o", "compat=0.10,size=128M")),
    ((), (), ("-o", "size=32M")),
    ((), (), ("-o", "compat=v2", "-o", "compat=1.1")),
    ((), (), ("-o", "help")),
    ((), (), ("-q", "-o", "compat=0.10")),
    # refused, as qemu-img refuses them
    ((), (), ("-o", "compat=0.42")),
    ((), (), ("-o", "foo=bar")),
    ((), (), ("-o", "cluster_size=1k")),
    ((), (), ("-o", "preallocation=metadata")),
    ((), (), ("-o", "backing_file=x")),
    ((), (), ("-o", "refcount_bits=3")),
    ((), (), ("-o", "refcount_bits=x")),
    ((), (), ("-o", "size=x")),
    ((), (), ("-o", "data_file=foo")),
    ((), (), ("-o", "lazy_refcounts=foo")),
    (("-o", "compat=0.10"), (), ("-o", "lazy_refcounts=on")),
    (("-o", "compat=0.10"), (), ("-o", "refcount_bits=8")),
    (("-o", "refcount_bits=8"), (), ("-o", "compat=0.10")),
    (("-o", "extended_l2=on"), (), ("-o", "compat=0.10")),
    (("-o", "compression_type=zstd"), ("write -c -P 1 0 64k",), ("-o", "compat=0.10")),
]


@pytest.mark.parametrize("create_opts,io,args", CASES)
def test_amend_as_qemu_img(twins, tmp_path, create_opts, io, args):
    ours, theirs = both(twins, create_opts, io)
    before = to_raw(ours, tmp_path)
    rc, _, _ = same(twins, "amend", *args, "t.qcow2")
    if "size=32M" in args:      # the shrink itself is resize's (tests/test_resize*)
        assert qemu_img("compare", ours, theirs).returncode == 0
    else:
        assert masked(ours) == masked(theirs)
    check_clean(ours)
    if rc == 0 and "size=" not in " ".join(args):
        assert to_raw(ours, tmp_path) == before


def test_amend_usage_as_qemu_img(twins):
    both(twins)
    for d in twins:
        qemu_img("create", "-q", "-f", "raw", d / "r.raw", "1M")
    for args in (("t.qcow2",), ("-o", "compat=1.1"), ("-o", "compat=1.1", "a", "b"),
                 ("-o", "compat=1.1", "r.raw"), ("-f", "raw", "-o", "compat=1.1", "r.raw"),
                 ("-f", "qcow2", "-o", "help"), ("-o", "compat=1.1", "none.qcow2")):
        rc, _, err = same(twins, "amend", *args)
        assert rc == (0 if "help" in args else 1)


def test_downgrade_with_snapshot_keeps_the_snapshot_data(twins, tmp_path):
    """compat=0.10 with an internal snapshot sharing clusters with zero
    clusters of the active table (and zero clusters of its own): the active
    image reads as qemu-img's result, the snapshot keeps its data, check is
    clean. (qemu-img 7.2 zeroes the shared cluster in place: its snapshot
    then reads zeroes at 128k and its check reports OFLAG_COPIED errors.)"""
    ours, theirs = both(twins, io=("write -P 5 0 256k", "write -z 64k 64k"))
    for p in (ours, theirs):
        qemu_img("snapshot", "-c", "s", p)
        qemu_io(p, "write -z 128k 64k", "write -P 6 192k 64k")
    before = to_raw(ours, tmp_path)
    qemu_img("convert", "-l", "s", "-O", "raw", ours, tmp_path / "s0.raw")
    snap_before = (tmp_path / "s0.raw").read_bytes()
    assert snap_before[128 << 10:192 << 10] == b"\x05" * (64 << 10)
    same(twins, "amend", "-p", "-o", "compat=0.10", "t.qcow2")
    check_clean(ours)
    assert qemu_img("compare", ours, theirs).returncode == 0
    assert to_raw(ours, tmp_path) == before
    assert qemu_img("info", "--output", "json", ours).stdout.count('"compat": "0.10"') == 1
    qemu_img("convert", "-l", "s", "-O", "raw", ours, tmp_path / "s.raw")
    assert (tmp_path / "s.raw").read_bytes() == snap_before
    qemu_io(ours, "write -P 9 64k 4k")            # in the active image only
    qemu_img("convert", "-l", "s", "-O", "raw", ours, tmp_path / "s.raw")
    assert (tmp_path / "s.raw").read_bytes() == snap_before
    check_clean(ours)


def test_upgrade_rewrites_a_v2_snapshot_table(twins, tmp_path):
    """A compat=0.10 image whose snapshot entries have no extra data (old
    QEMU wrote them so) gets the 1.1 form (24 bytes of extra data: VM state
    size, disk size, icount -1) before the header says version 3."""
    import struct
    ours, theirs = both(twins, ("-o", "compat=0.10"), ("write -P 1 0 64k",))
    for p in (ours, theirs):
        qemu_img("snapshot", "-c", "old", p)
        # shorten the entry's extra data to 0 bytes (as an old writer would)
        data = bytearray(p.read_bytes())
        off = struct.unpack_from(">Q", data, 64)[0]
        id_len, name_len = struct.unpack_from(">HH", data, off + 12)
        extra = struct.unpack_from(">I", data, off + 36)[0]
        names = data[off + 40 + extra:off + 40 + extra + id_len + name_len]
        struct.pack_into(">I", data, off + 36, 0)
        data[off + 40:off + 40 + extra + id_len + name_len] = names + bytes(extra)
        p.write_bytes(bytes(data))
    same(twins, "amend", "-o", "compat=1.1", "t.qcow2")
    assert masked(ours) == masked(theirs)
    check_clean(ours)
    assert info_no_dates(ours) == info_no_dates(theirs)
    assert info_no_dates(ours)[0].get("icount") is None      # -1: not recorded
    run(twins[0], "snapshot", "-a", "old", "t.qcow2")
    check_clean(ours)


@pytest.mark.parametrize("create_opts,io,bits,size", [
    ("refcount_bits=16", ("write -P 1 16M 32M",), "1", "64M"),
    # (4k clusters: qemu-img's walk over a 1-bit block of 64k clusters costs it
    # ~15 s of CPU; the chain of iotest 112 below widens 1 -> 64 at 64k)
    ("refcount_bits=1,cluster_size=4k", ("write -P 2 0 1M",), "64", "64M"),
    ("refcount_bits=16", ("write -P 3 0 64k",), "8", "64M"),
    ("refcount_bits=64", (), "2", "64M"),
    # iotest 112: the first new block has one free entry, which it takes for
    # itself; the table then needs a second block: a fourth walk
    ("refcount_bits=1,cluster_size=512", (f"write 0 {58 * 512}",), "64", "64k"),
    ("refcount_bits=16,cluster_size=4k", ("write -P 5 0 40M",), "1", "64M"),
])
def test_refcount_width_change(twins, tmp_path, create_opts, io, bits, size):
    """refcount_bits=N: the same progress lines as qemu-img (one per walk
    step; a walk more shows as progress going back) and the same file byte
    for byte; it reads the same, has the new width, checks clean and is
    written through the new structures."""
    ours, theirs = both(twins, ("-o", create_opts), io, size)
    before = to_raw(ours, tmp_path)
    rc, out, err = same(twins, "amend", "-p", "-o", f"refcount_bits={bits}", "t.qcow2")
    assert (rc, err) == (0, "") and out.count("/100%)") > 50
    assert ours.read_bytes() == theirs.read_bytes()
    check_clean(ours)
    assert to_raw(ours, tmp_path) == before
    assert f"refcount bits: {bits}" in qemu_img("info", ours).stdout
    for p in (ours, theirs):                 # written through the new ones alike
        qemu_io(p, "write -P 4 0 64k")
    assert ours.read_bytes() == theirs.read_bytes()
    check_clean(ours)


def test_refcount_width_chain_of_iotest_112(twins):
    """iotest 112's amends one after another (widths, compat, a snapshot,
    a refused width): the same output and the same file after each. With
    4k clusters (the iotest has 64k): the same walks and steps, on several
    refcount blocks at 16 and 64 bits where 64k has one; qemu-img's
    widening 1 -> 64 of a 64k-cluster image costs it ~16 s of CPU (it
    walks the 1-bit block's 512 Ki entries), 0.1 s at 4k."""
    ours, theirs = both(twins, ("-o", "cluster_size=4k"), ("write 16M 32M",))
    for args in (("-o", "refcount_bits=1"), ("-o", "refcount_bits=64"),
                 ("-o", "compat=0.10"), ("-o", "compat=0.10,refcount_bits=16"),
                 ("-o", "compat=1.1"), ("-o", "refcount_bits=32,compat=0.10"),
                 ("snapshot", "-c", "foo"), ("write 0 16M",), ("-o", "refcount_bits=1"),
                 ("-p", "-o", "refcount_bits=2")):
        if args[0] == "snapshot":
            same(twins, *args, "t.qcow2")
        elif args[0].startswith("write"):
            for p in (ours, theirs):
                qemu_io(p, *args)
        else:
            same(twins, "amend", *args, "t.qcow2")
        assert masked(ours) == masked(theirs), args
    check_clean(ours)
    assert "refcount bits: 2" in qemu_img("info", ours).stdout


def test_refcount_width_too_small_for_a_snapshot(twins):
    # 4k clusters: the same layout as at 64k, each offset 16 times smaller
    # (qemu-img's amend to 2 bits walks 16 times fewer entries per block)
    ours, theirs = both(twins, ("-o", "cluster_size=4k"), ("write 0 4k",))
    for p in (ours, theirs):
        qemu_img("snapshot", "-c", "foo", p)
        qemu_io(p, "write 64k 64k")        # the L2 table copied, cluster 0 still shared
    rc, _, err = same(twins, "amend", "-o", "refcount_bits=1", "t.qcow2")
    assert (rc, err) == (1, "qemu-img: Cannot decrease refcount entry width to 1 bits: Cluster "
                            "at offset 0x5000 has a refcount of 2\n")
    assert ours.read_bytes() == theirs.read_bytes() or masked(ours) == masked(theirs)
    same(twins, "amend", "-o", "refcount_bits=2", "t.qcow2")
    check_clean(ours)
    assert "refcount bits: 2" in qemu_img("info", ours).stdout
    same(twins, "snapshot", "-a", "foo", "t.qcow2")
    check_clean(ours)
    assert qemu_img("compare", ours, theirs).returncode == 0
