"""Backing chains: opening, naming, reads, COW writes, block status."""
from __future__ import annotations

import os

import pytest

from blkjobs.errors import ImageError, UsageError
from blkjobs.formats import create_image, open_image
from blkjobs.graph import Graph, Perm, PermissionConflict, open_chain
from qemu_oracle import check_clean, qemu_img, qemu_io, qemu_map, to_raw

SIZE = 1 << 20


def _chain(tmp_path, n=3):
    paths = []
    for i in range(n):
        p = tmp_path / f"l{i}.qcow2"
        if i == 0:
            qemu_img("create", "-f", "qcow2", p, SIZE)
        else:
            qemu_img("create", "-f", "qcow2", "-b", paths[-1].name, "-F", "qcow2",
                     "-o", "cluster_size=4096", p)
        qemu_io(p, f"write -P {i + 1} {i * 64}k 100k")
        paths.append(p)
    return paths


def test_names_and_relative_backing(tmp_path):
    paths = _chain(tmp_path)
    cwd = os.getcwd()
    os.chdir("/")
    try:
        g = Graph()
        top = open_chain(str(paths[-1]), graph=g, name="top")
        assert [n.name for n in top.chain()] == ["top", "#block1", "#block2"]
        assert [os.path.basename(n.filename) for n in top.chain()] == ["l2.qcow2", "l1.qcow2",
                                                                      "l0.qcow2"]
        assert g["#block2"] is top.chain()[2]
        assert top.read(0, SIZE) == to_raw(paths[-1], tmp_path)
        with pytest.raises(UsageError):
            g.add(open_image(str(paths[0])), name="top")
        g.close()
        assert g.nodes == {}
    finally:
        os.chdir(cwd)


def test_block_status_depths(tmp_path):
    paths = _chain(tmp_path)
    top = open_chain(str(paths[-1]))
    got = top.block_status()
    top.close_chain()
    for e in got:
        e.pop("compressed")
    assert got == qemu_map(paths[-1])


def test_probe_unrecorded_backing_format_read_only(tmp_path):
    base = tmp_path / "base.img"
    base.write_bytes(b"\x42" * SIZE)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.img", "-F", "raw", top)
    with open_image(str(top), read_only=False) as img:      # drop the recorded format
        img.set_backing("base.img", None)
    with open_image(str(top)) as img:
        assert img.backing_format is None
    node = open_chain(str(top), read_only=False)
    b = node.backing
    assert b.format == "raw" and b.read_only
    with pytest.raises(PermissionConflict):
        b.take("x", Perm.WRITE)
    assert node.read(0, 16) == b"\x42" * 16
    node.close_chain()


def test_loop_detected(tmp_path):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    create_image(str(a), "qcow2", SIZE)
    create_image(str(b), "qcow2", SIZE, backing_file="a.qcow2", backing_format="qcow2")
    with open_image(str(a), read_only=False) as img:
        img.set_backing("b.qcow2", "qcow2")
    with pytest.raises(ImageError, match="loop"):
        open_chain(str(b))


def test_missing_backing(tmp_path):
    t = tmp_path / "t.qcow2"
    create_image(str(t), "qcow2", SIZE, backing_file="nope.qcow2", backing_format="qcow2")
    with pytest.raises(ImageError, match=r"nope\.qcow2"):
        open_chain(str(t))


def test_cow_write_partial_clusters(tmp_path):
    paths = _chain(tmp_path, 2)
    top = open_chain(str(paths[-1]), read_only=False)
    expect = bytearray(top.read(0, SIZE))
    with pytest.raises(PermissionConflict, match="take it first"):
        top.write(0, b"x")
    with top.take("writer", Perm.WRITE | Perm.CONSISTENT_READ, Perm.CONSISTENT_READ):
        top.write(10, b"\xee" * 5)
        top.write(200000, b"\xdd" * 70000)
        top.write_zeroes(500000, 3)
        expect[10:15] = b"\xee" * 5
        expect[200000:270000] = b"\xdd" * 70000
        expect[500000:500003] = bytes(3)
        assert top.read(0, SIZE) == expect
    top.close_chain()
    check_clean(paths[-1])
    assert to_raw(paths[-1], tmp_path) == expect


def test_shorter_backing_reads_zero(tmp_path):
    base = tmp_path / "b.qcow2"
    create_image(str(base), "qcow2", 64 << 10)
    with open_image(str(base), read_only=False) as b:
        b.write(0, b"\x01" * (64 << 10))
    top = tmp_path / "t.qcow2"
    create_image(str(top), "qcow2", SIZE, backing_file="b.qcow2", backing_format="qcow2")
    node = open_chain(str(top), read_only=False)
    with node.take("w", Perm.WRITE):
        node.write(60000, b"\x02" * 10000)      # COW crosses the backing end
    data = node.read(0, SIZE)
    st = node.block_status()
    node.close_chain()
    assert data == to_raw(top, tmp_path)
    assert st[-1]["present"] is False and st[-1]["zero"] is True


def test_io_through_a_filter_taken_out_of_the_graph_is_a_clear_error(tmp_path):
    """A filter node that left the graph (closed: no file child any more)
    refuses I/O with one line, instead of an AttributeError on None."""
    p = tmp_path / "d.qcow2"
    qemu_img("create", "-f", "qcow2", p, SIZE)
    g = Graph()
    top = open_chain(str(p), graph=g, read_only=False, name="disk")
    f = g.add_filter("copy-before-write", top, name="cbw")
    assert f.read(0, 512) == bytes(512)
    f.close()
    msg = "^filter node 'cbw' has been removed from the graph$"
    with pytest.raises(ImageError, match=msg):
        f.read(0, 512)
    with pytest.raises(ImageError, match=msg):
        f.flush()
    with pytest.raises(ImageError, match=msg):
        f.block_status()
    with pytest.raises(ImageError, match=msg):
        f.below_filters()
    g.close()
