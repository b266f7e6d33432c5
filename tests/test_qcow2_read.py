"""Images qemu-img/qemu-io write read back exactly like `qemu-img convert
-O raw`, and block status agrees with `qemu-img map --output json`."""
from __future__ import annotations

import pytest

from blkjobs.formats import open_image
from blkjobs.graph import open_chain
from qemu_oracle import qemu_img, qemu_io, qemu_map, to_raw

SIZE = 4 << 20

WRITES = [
    "write -P 0x11 0 100k",
    "write -z 192k 128k",
    "write -P 0x22 1M 4k",
    "discard 0 64k",
    "write -P 0x33 2M 1500k",
    "write -z 2200k 4k",
    "write -P 0x44 4000k 96k",
]


def _make(path, opts, writes=WRITES):
    qemu_img("create", "-f", "qcow2", "-o", opts, path, SIZE)
    qemu_io(path, *writes)


def _same_as_qemu(path, tmp_path):
    expect = to_raw(path, tmp_path)
    node = open_chain(str(path))
    try:
        assert node.read(0, node.size) == expect
        got = node.block_status()
    finally:
        node.close_chain()
    want = qemu_map(path)
    for e in got:
        e.pop("compressed")
    assert got == want


@pytest.mark.parametrize("opts", [
    "cluster_size=65536",
    "cluster_size=512",
    "cluster_size=4096,refcount_bits=1",
    "cluster_size=2M",
    "compat=0.10",
    "compat=0.10,cluster_size=4096",
    "extended_l2=on,cluster_size=65536",
    "extended_l2=on,cluster_size=16384",
    "refcount_bits=64",
])
def test_qemu_written(tmp_path, opts):
    path = tmp_path / "q.qcow2"
    _make(path, opts)
    _same_as_qemu(path, tmp_path)


@pytest.mark.parametrize("extra", [[], ["-o", "cluster_size=4096"], ["-o", "compression_type=zlib"]])
def test_compressed_convert(tmp_path, extra):
    src = tmp_path / "s.qcow2"
    _make(src, "cluster_size=65536")
    dst = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", *extra, src, dst)
    with open_image(str(dst)) as img:
        assert any(m.kind == 3 for m in img.map_host(0, img.size))
    _same_as_qemu(dst, tmp_path)


def test_three_deep_chain(tmp_path):
    base, mid, top = tmp_path / "base.qcow2", tmp_path / "mid.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", base, SIZE)
    qemu_io(base, "write -P 1 0 1M", "write -P 2 3M 1M")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             "-o", "cluster_size=4096", mid)
    qemu_io(mid, "write -P 3 512k 1M", "write -z 3200k 64k", "discard 0 8k")
    qemu_img("create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
             "-o", "extended_l2=on", top)
    qemu_io(top, "write -P 4 100k 3k", "write -z 3300k 40k", "write -P 5 3900k 196k")
    _same_as_qemu(top, tmp_path)
    node = open_chain(str(top))
    assert [n.format for n in node.chain()] == ["qcow2"] * 3
    assert [n.name for n in node.chain()] == [n.name for n in node.chain()]
    node.close_chain()


def test_raw_backing_chain(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x07" * (1 << 20))
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top, SIZE)
    qemu_io(top, "write -P 9 64k 64k")
    node = open_chain(str(top))
    try:
        data = node.read(0, SIZE)
    finally:
        node.close_chain()
    assert data == to_raw(top, tmp_path)
