"""qcow2 data and layout against qemu-img (what qemu-iotests 271, 292, 190,
125, 243, 031 and raw 221, 106 showed different): the same command lines run
as blkjobs (installed as ``qemu-img``) and as the real qemu-img give the same
output, the same guest data (qemu-img compare, qemu-io reads) and the same
layout (qemu-img map), and both images check clean."""
from __future__ import annotations

import struct

import pytest

from qemu_oracle import check_clean, qemu_img, qemu_info, qemu_io, qemu_map, to_raw
from test_parity_invocation import same, twins  # noqa: F401  (fixture)

KiB = 1024


def _l2_entries(path, n: int, extended: bool) -> list[tuple[int, int]]:
    """The first ``n`` (entry, bitmap) pairs of the first L2 table."""
    data = open(path, "rb").read()
    l1_off = struct.unpack_from(">Q", data, 40)[0]
    l2_off = struct.unpack_from(">Q", data, l1_off)[0] & 0x00FFFFFFFFFFFE00
    step = 16 if extended else 8
    out = []
    for i in range(n):
        e = struct.unpack_from(">Q", data, l2_off + i * step)[0]
        bm = struct.unpack_from(">Q", data, l2_off + i * step + 8)[0] if extended else 0
        out.append((e, bm))
    return out


@pytest.mark.parametrize("extended", ["off", "on"])
def test_grow_over_longer_backing_reads_zeroes(twins, tmp_path, extended):
    """Growing an image whose backing file is longer than its old size makes
    the new area read as zeroes (the backing file must not show through: that
    was data loss), with QEMU's zero (sub)clusters and explicit zeroes for
    the head; at every alignment of the old end."""
    olds = [64 * KiB, 1 * KiB, 2 * KiB, 65 * KiB, 66 * KiB + 512, 127 * KiB, 130 * KiB,
            200 * KiB + 512]
    for d in twins:
        qemu_img("create", "-f", "raw", d / "base", "1M")
        qemu_io(d / "base", "write -q -P 0xff 0 1M", fmt="raw")
    for i, old in enumerate(olds):
        name = f"t{i}.qcow2"
        for d in twins:
            qemu_img("create", "-f", "qcow2", "-o", f"extended_l2={extended}", "-F", "raw",
                     "-b", "base", d / name, old)
            qemu_io(d / name, f"write -q -P 7 0 {old}")
        same(twins, "resize", name, "1M")
        ours, theirs = (d / name for d in twins)
        assert qemu_map(ours) == qemu_map(theirs), old
        assert _l2_entries(ours, 16, extended == "on") == \
            _l2_entries(theirs, 16, extended == "on"), old
        check_clean(ours)
        data = to_raw(ours, tmp_path)
        assert data == to_raw(theirs, tmp_path)
        assert data == b"\7" * old + bytes((1 << 20) - old), old
        qemu_io(ours, f"read -q -P 0 {old} {(1 << 20) - old}")


def test_shrink_and_grow_over_backing(twins, tmp_path):
    """qemu-iotests 271's full discard by shrinking and growing: the
    re-grown cluster reads zeroes, all zero bits set, as QEMU leaves it."""
    for d in twins:
        qemu_img("create", "-f", "raw", d / "base", "1M")
        qemu_io(d / "base", "write -q -P 0xff 0 1M", fmt="raw")
        qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on", "-F", "raw", "-b", "base",
                 d / "t.qcow2", "1M")
        qemu_io(d / "t.qcow2", "write -q -P 1 0 128k")
    same(twins, "resize", "--shrink", "t.qcow2", "64k")
    same(twins, "resize", "t.qcow2", "1M")
    ours, theirs = (d / "t.qcow2" for d in twins)
    assert _l2_entries(ours, 2, True) == _l2_entries(theirs, 2, True)
    assert _l2_entries(ours, 2, True)[1] == (0, 0xFFFFFFFF00000000)
    check_clean(ours)
    assert to_raw(ours, tmp_path) == b"\1" * (64 * KiB) + bytes((1 << 20) - 64 * KiB)


def test_grow_v2_over_backing_refused(twins):
    """A v2 image has no zero clusters: QEMU refuses the grow and the image
    keeps its size."""
    for d in twins:
        qemu_img("create", "-f", "raw", d / "base", "1M")
        qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", "-F", "raw", "-b", "base",
                 d / "v2.qcow2", "512k")
    rc, _, err = same(twins, "resize", "v2.qcow2", "2M")
    assert rc == 1 and err == "qemu-img: Failed to zero out new clusters: Operation not supported\n"
    same(twins, "info", "v2.qcow2")
    # a backing file no longer than the old size: nothing to zero, v2 grows
    for d in twins:
        qemu_img("create", "-f", "raw", d / "small", "256k")
        qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", "-F", "raw", "-b", "small",
                 d / "v2b.qcow2", "512k")
    assert same(twins, "resize", "v2b.qcow2", "2M") == (0, "Image resized.\n", "")
    same(twins, "info", "v2b.qcow2")


def test_rebase_unsafe_records_any_qemu_driver(twins):
    """qemu-iotests 031: ``rebase -u -F host_device`` records the name (any
    block driver qemu-img knows); an unknown name is refused with its text.
    The headers are the same byte for byte."""
    for d in twins:
        qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", d / "h.qcow2", "64M")
    assert same(twins, "rebase", "-u", "-b", "/some/backing/file/path", "-F", "host_device",
                "h.qcow2") == (0, "", "")
    ours, theirs = (open(d / "h.qcow2", "rb").read(65536) for d in twins)
    assert ours == theirs
    assert same(twins, "rebase", "-u", "-b", "/x", "-F", "foo", "h.qcow2") == \
        (1, "", "qemu-img: Invalid format name: 'foo'\n")


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
def test_create_preallocation_file_size(twins, mode):
    """qemu-iotests 243: ``create -o preallocation=falloc|full`` as qemu-img:
    the same output, file size and layout; falloc and full allocate the
    file's blocks, metadata leaves them sparse."""
    same(twins, "create", "-f", "qcow2", "-o", f"preallocation={mode}", "p.qcow2", "64M")
    ours, theirs = (d / "p.qcow2" for d in twins)
    assert ours.stat().st_size == theirs.stat().st_size == 67436544
    assert qemu_map(ours) == qemu_map(theirs)
    check_clean(ours)
    used = ours.stat().st_blocks * 512
    assert used >= 64 << 20 if mode != "metadata" else used < 1 << 20


@pytest.mark.parametrize("old", ["31k", "33k"])
@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
def test_resize_preallocation_over_backing(twins, old, mode):
    """qemu-iotests 125: ``resize --preallocation`` of an image over a
    backing file: the old part keeps the backing data, the new part reads
    zeroes, the same layout as qemu-img's (7 clusters)."""
    for d in twins:
        qemu_img("create", "-f", "raw", d / "base", "128k")
        qemu_io(d / "base", "write -q -P 1 0 128k", fmt="raw")
        qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", "base", "-o", "cluster_size=64k",
                 d / "t.qcow2", old)
    assert same(twins, "resize", "-f", "qcow2", f"--preallocation={mode}", "t.qcow2",
                "96k") == (0, "Image resized.\n", "")
    ours, theirs = (d / "t.qcow2" for d in twins)
    assert ours.stat().st_size == theirs.stat().st_size == 7 * 65536
    assert qemu_map(ours) == qemu_map(theirs)
    check_clean(ours)
    n = int(old[:-1]) * KiB
    qemu_io(ours, f"read -q -P 1 0 {n}", f"read -q -P 0 {n} {96 * KiB - n}")


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
def test_resize_preallocation_writes_do_not_grow(twins, mode):
    """qemu-iotests 125: after a preallocated grow, writing the new area
    grows neither the file nor (falloc, full) its allocated blocks."""
    size = 2048000
    for d in twins:
        qemu_img("create", "-f", "qcow2", d / "g.qcow2", size)
    same(twins, "resize", "-f", "qcow2", f"--preallocation={mode}", "g.qcow2", "+80K")
    img = twins[0] / "g.qcow2"
    check_clean(img)
    length, used = img.stat().st_size, img.stat().st_blocks
    qemu_io(img, f"read -q -P 0 {size} 80k", f"write -q -P 3 {size} 80k")
    assert img.stat().st_size == length
    if mode != "metadata":
        assert img.stat().st_blocks <= used
    qemu_io(img, f"read -q -P 3 {size} 80k")
    check_clean(img)


def test_resize_negative_size_and_preallocation_texts(twins):
    """qemu-iotests 106: a negative size after the image needs no ``--``;
    preallocation when shrinking and metadata for raw: qemu-img's texts."""
    for d in twins:
        qemu_img("create", "-f", "raw", d / "r.raw", "1M")
        qemu_img("create", "-f", "qcow2", d / "q.qcow2", "1M")
    msg = (1, "", "qemu-img: Preallocation can only be used for growing images\n")
    for fmt, img in (("raw", "r.raw"), ("qcow2", "q.qcow2")):
        for mode in ("metadata", "falloc", "full"):
            assert same(twins, "resize", "-f", fmt, "--shrink", f"--preallocation={mode}",
                        img, "-256K") == msg
            assert same(twins, "resize", "-f", fmt, f"--preallocation={mode}", img,
                        "--", "-256K") == msg
    assert same(twins, "resize", "-f", "raw", "--preallocation=metadata", "r.raw", "2M") == \
        (1, "", "qemu-img: Unsupported preallocation mode: metadata\n")
    assert same(twins, "resize", "-f", "raw", "--shrink", "r.raw", "-256K") == \
        (0, "Image resized.\n", "")
    assert same(twins, "resize", "-f", "qcow2", "--shrink", "q.qcow2", "-256K") == \
        (0, "Image resized.\n", "")
    assert qemu_info(twins[0] / "q.qcow2")["virtual-size"] == 768 * KiB


def test_block_resize_over_longer_backing_matches_qsd(tmp_path):
    """QMP block_resize of an overlay over a longer backing node: the new
    area reads zeroes, as qemu-storage-daemon leaves it (the same map)."""
    from daemon_util import qcow2_node, side_by_side

    async def sc(s, d):
        base = str(d / "base.qcow2")
        top = str(d / "top.qcow2")
        qemu_img("create", "-f", "qcow2", base, "4M")
        qemu_io(base, "write -q -P 0x11 0 4M")
        qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", base, top, "1M")
        await s.x("blockdev-add", **qcow2_node("base", base))
        await s.x("blockdev-add", **qcow2_node("top", top, backing="base"))
        return await s.x("block_resize", **{"node-name": "top"}, size=4 << 20)
    ref, ours = side_by_side(tmp_path, sc)
    assert ref == ours == {}
    tops = [tmp_path / name / "top.qcow2" for name in ("qsd", "blkjobs")]
    assert qemu_map(tops[0]) == qemu_map(tops[1])
    check_clean(tops[1])
    qemu_io(tops[1], "read -q -P 0x11 0 1M", "read -q -P 0 1M 3M")


@pytest.mark.parametrize("grow", ["540k", "567k", "600k"])
def test_grow_inside_the_cut_cluster(twins, tmp_path, grow):
    """qemu-iotests 292 without a backing file: a shrink cutting a data
    cluster, then a grow ending inside (or past) that cluster; the old tail
    reads as zeroes and nothing is written past the new end (it failed with
    'write beyond the end of the image')."""
    for d in twins:
        qemu_img("create", "-f", "qcow2", d / "t.qcow2", "1M")
        qemu_io(d / "t.qcow2", "write -q -P 0x22 0 1M")
    same(twins, "resize", "--shrink", "t.qcow2", "520k")
    assert same(twins, "resize", "t.qcow2", grow) == (0, "Image resized.\n", "")
    ours, theirs = (d / "t.qcow2" for d in twins)
    check_clean(ours)
    assert qemu_map(ours) == qemu_map(theirs)
    n = int(grow[:-1]) * KiB
    assert to_raw(ours, tmp_path) == b"\x22" * (520 * KiB) + bytes(n - 520 * KiB)


def _zero_cases():
    """(offset, length) zero writes: every alignment of head and tail to a
    2 KiB subcluster (extended L2, 64 KiB clusters) and to a cluster."""
    sc, cl = 2 * KiB, 64 * KiB
    out = []
    for c, start in enumerate([0, 512, sc, sc + 512, 3 * sc - 512, cl - sc, cl - 512]):
        for length in (512, sc - 512, sc, sc + 512, 3 * sc, cl, cl + sc + 512):
            out.append((2 * c * cl + start, length))
    return out


@pytest.mark.parametrize("backing", [False, True])
@pytest.mark.parametrize("extended", ["on", "off"])
def test_zero_writes_as_qemu_io(tmp_path, extended, backing):
    """Zero writes (qemu-io ``write -z``, blkjobs' write_zeroes without
    unmapping) at every (sub)cluster alignment, over unallocated, zero and
    data clusters, with and without a backing file: the same data byte for
    byte and the same map as QEMU leaves (a partial (sub)cluster whose rest
    reads zeroes becomes a zero (sub)cluster, as in qemu-iotests 271)."""
    from blkjobs.graph import Perm, open_chain
    cases = _zero_cases()
    size = 2 * len(cases) // 7 * 64 * KiB + 256 * KiB
    paths = [tmp_path / "qemu.qcow2", tmp_path / "ours.qcow2"]
    if backing:
        qemu_img("create", "-f", "raw", tmp_path / "base", size)
        qemu_io(tmp_path / "base", f"write -q -P 0xff 0 {size}", fmt="raw")
    for p in paths:
        extra = ["-F", "raw", "-b", tmp_path / "base"] if backing else []
        qemu_img("create", "-f", "qcow2", "-o", f"extended_l2={extended}", *extra, p, size)
        # the second run of every case over data, the third over zeroes
        qemu_io(p, f"write -q -P 5 {size - 128 * KiB} 64k", f"write -q -z {size - 64 * KiB} 64k")
    qemu_io(paths[0], *[f"write -q -z {o} {n}" for o, n in cases],
            *[f"write -q -z {size - 128 * KiB + o % (64 * KiB)} {min(n, 4 * KiB)}"
              for o, n in cases[:7]])
    node = open_chain(str(paths[1]), "qcow2", read_only=False)
    try:
        node.take("test", Perm.CONSISTENT_READ | Perm.WRITE)
        for o, n in cases:
            node.write_zeroes(o, n, may_unmap=False)
        for o, n in cases[:7]:
            node.write_zeroes(size - 128 * KiB + o % (64 * KiB), min(n, 4 * KiB),
                              may_unmap=False)
    finally:
        node.graph.close()
    check_clean(paths[1])
    assert to_raw(paths[1], tmp_path) == to_raw(paths[0], tmp_path)
    assert qemu_map(paths[1]) == qemu_map(paths[0])


def test_resize_missing_backing_file(twins):
    """resize opens the backing chain, as qemu-img does: a missing backing
    file is refused with its text and the image is left as it was."""
    for d in twins:
        qemu_img("create", "-f", "raw", d / "gone", "1M")
        qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", "gone", d / "t.qcow2", "1M")
        (d / "gone").unlink()
    assert same(twins, "resize", "t.qcow2", "2M") == (
        1, "", "qemu-img: Could not open 't.qcow2': Could not open backing file: "
        "Could not open 'gone': No such file or directory\n")
    assert qemu_info(twins[0] / "t.qcow2")["virtual-size"] == 1 << 20
