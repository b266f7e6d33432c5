"""The raw driver and format probing."""
from __future__ import annotations

import os

import pytest

from blkjobs.errors import ImageError, UsageError
from blkjobs.formats import Kind, create_image, open_image, probe_format
from qemu_oracle import qemu_img, qemu_map

SIZE = 4 << 20


def test_map_read_write_zero(tmp_path):
    p = tmp_path / "r.raw"
    create_image(str(p), "raw", SIZE)
    with open_image(str(p), read_only=False) as img:
        assert img.size == SIZE
        # QEMU's file driver writes a new file's first block (qemu-img map: data)
        assert [(m.kind, m.length) for m in img.map_host(0, SIZE)] == \
            [(Kind.DATA, 4096), (Kind.ZERO, SIZE - 4096)]
        img.write(1 << 20, b"\x05" * 8192)
        maps = img.map_host(0, SIZE)
        data = [m for m in maps if m.kind == Kind.DATA]
        assert data and data[0].host_offset == data[0].start
        assert sum(m.length for m in maps) == SIZE
        assert img.read((1 << 20) + 10, 4) == b"\x05" * 4
        img.write_zeroes(1 << 20, 4096)
        assert img.read(1 << 20, 8192) == bytes(4096) + b"\x05" * 4096
        img.write_zeroes((1 << 20) + 4096, 4096, may_unmap=False)
        assert img.read(1 << 20, 8192) == bytes(8192)
        img.write(0, b"\x01" * 4096)
        img.discard(0, 4096)
        assert img.read(0, 4096) == bytes(4096)
        assert img.allocate(0, 4096)[0].host_offset == 0
    ours = []
    with open_image(str(p)) as img:
        for m in img.map_host(0, SIZE):
            ours.append((m.start, m.length, m.kind == Kind.DATA))
    theirs = [(e["start"], e["length"], e["data"]) for e in qemu_map(p)]
    assert ours == theirs


def test_read_only_refuses_write(tmp_path):
    p = tmp_path / "r.raw"
    p.write_bytes(bytes(4096))
    with open_image(str(p)) as img:
        with pytest.raises(ImageError):
            img.write(0, b"x")


def test_probe(tmp_path):
    q = tmp_path / "q.img"
    qemu_img("create", "-f", "qcow2", q, "1M")
    r = tmp_path / "r.img"
    r.write_bytes(b"hello" * 100)
    assert probe_format(str(q)) == "qcow2" and probe_format(str(r)) == "raw"
    with open_image(str(q)) as img:
        assert img.format_name == "qcow2"
    with open_image(str(q), "raw") as img:       # explicit raw: allowed
        # the file's length in whole sectors, as QEMU's raw driver gives it
        # (196616 bytes here: 197120), its exact length apart
        assert img.format_name == "raw" and img.file_length == os.path.getsize(q)
        assert img.size == -(-os.path.getsize(q) // 512) * 512 != os.path.getsize(q)
    with pytest.raises(ImageError, match="No such file"):
        open_image(str(tmp_path / "missing"))
    with pytest.raises(UsageError):
        open_image(str(r), "vdi")
