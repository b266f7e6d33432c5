"""The snapshot table at open and in ``check`` as qemu-img 7.2 judges and
repairs it (qemu-iotests 261 and 080): the same refusals, the same lines in
the same order, and the repaired images equal byte for byte."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from qemu_oracle import check_clean, qemu_img, qemu_io
from test_check_repair import _be, _poke
from test_parity_invocation import run, same, twins  # noqa: F401  (twins: a fixture)


def _entries(img: Path) -> list[tuple[bytes, bytes, bytes]]:
    """The snapshot table's entries: (the 40 fixed bytes, extra, id+name)."""
    data = img.read_bytes()
    pos, out = _be(img, 64), []
    for _ in range(_be(img, 60, 4)):
        pos += -pos % 8
        fixed = data[pos:pos + 40]
        idl, nml = struct.unpack_from(">HH", fixed, 12)
        eds = struct.unpack_from(">I", fixed, 36)[0]
        out.append((fixed, data[pos + 40:pos + 40 + eds],
                    data[pos + 40 + eds:pos + 40 + eds + idl + nml]))
        pos += 40 + eds + idl + nml
    return out


def _botched_v3(d: Path) -> Path:
    """261's botched v3 image: a v2 image with three snapshots whose extra
    data are 0, 50 (26 unknown bytes) and 8 bytes long, then made v3."""
    img = d / "t.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", img, "64M")
    for n in ("sn0", "sn1", "sn2"):
        qemu_img("snapshot", "-c", n, img)
    table = bytearray()
    for (fixed, extra, names), eds in zip(_entries(img), (0, 50, 8), strict=True):
        table += bytes(-len(table) % 8)
        new_extra = (extra + b"very important data").ljust(eds, b"\0")[:eds]
        table += fixed[:36] + struct.pack(">I", eds) + new_extra + names
    with open(img, "r+b") as f:
        f.seek(_be(img, 64))
        f.write(table)
    _poke(img, 4, 3, 4)             # version 3
    _poke(img, 100, 104, 4)         # header length
    _poke(img, 96, 4, 4)            # refcount order
    return img


def _both(twins, make) -> list[Path]:
    """The image ``make`` builds in ours, copied to theirs (the snapshots'
    dates then agree)."""
    img = make(twins[0])
    (twins[1] / img.name).write_bytes(img.read_bytes())
    return [img, twins[1] / img.name]


def test_incomplete_v3_entries_are_repaired(twins):
    imgs = _both(twins, _botched_v3)
    rc, out, err = same(twins, "check", "t.qcow2")
    assert rc == 2
    assert err == ("ERROR snapshot table entry 0 is incomplete\n"
                   "ERROR snapshot table entry 2 is incomplete\n")
    rc, out, err = same(twins, "check", "-r", "all", "t.qcow2")
    assert rc == 0
    assert err == ("Repairing snapshot table entry 0 is incomplete\n"
                   "Repairing snapshot table entry 2 is incomplete\n")
    assert out.startswith("The following inconsistencies were found and repaired:\n\n"
                          "    0 leaked clusters\n    2 corruptions\n\n"
                          "Double checking the fixed image now...\n"
                          "No errors were found on the image.\n")
    assert imgs[0].read_bytes() == imgs[1].read_bytes()
    assert [len(e[1]) for e in _entries(imgs[0])] == [24, 50, 24]
    same(twins, "snapshot", "-l", "t.qcow2")


def _too_much_extra(d: Path) -> Path:
    """261: a v3 image whose last snapshot claims 64 KiB of extra data."""
    img = d / "t.qcow2"
    qemu_img("create", "-f", "qcow2", img, "64M")
    qemu_img("snapshot", "-c", "sn0", img)
    qemu_img("snapshot", "-c", "sn1", img)
    first = _entries(img)[0]
    pos = _be(img, 64) + 40 + len(first[1]) + len(first[2])
    pos += -pos % 8
    _poke(img, pos + 36, 0x10000, 4)
    return img


def test_too_much_extra_data_is_refused_then_cut(twins):
    imgs = _both(twins, _too_much_extra)
    rc, out, err = same(twins, "info", "t.qcow2")
    assert err == ("qemu-img: Could not open 't.qcow2': Too much extra metadata in snapshot "
                   "table entry 1\n"
                   "You can force-remove this extra metadata with qemu-img check -r all\n")
    rc, out, err = same(twins, "check", "t.qcow2")
    assert rc == 1
    assert err == ("qemu-img: ERROR failed to read the snapshot table: Too much extra "
                   "metadata in snapshot table entry 1\n"
                   "You can force-remove this extra metadata with qemu-img check -r all\n"
                   "qemu-img: Check failed: File too large\n")
    rc, out, err = same(twins, "check", "-r", "all", "t.qcow2")
    assert rc == 0
    assert err.startswith("Discarding too much extra metadata in snapshot table entry 1 "
                          "(65536 > 1024)\n")
    assert imgs[0].read_bytes() == imgs[1].read_bytes()
    check_clean(imgs[0])


def _too_many(d: Path) -> Path:
    """261's "Too many snapshots": 131072 empty entries from 1 MiB on, the
    last of the first 65536 naming a one-entry L1 table, all of it counted
    in refcount block 0."""
    img = d / "t.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", img, "64M")
    _poke(img, 64, 0x100000)
    _poke(img, 60, 0x20000, 4)
    with open(img, "r+b") as f:
        f.truncate(0x100000 + 40 * 131072)
    _poke(img, 0x100000 + 40 * 65536, 0xE0000)
    _poke(img, 0x100000 + 40 * 65536 + 8, 1, 4)
    _poke(img, 0x100000 - 2 * 65536, 0x80000000000F0000)
    rb = _be(img, _be(img, 48))
    for c in range((0x100000 - 2 * 65536) // 65536, -(-(0x100000 + 40 * 131072) // 65536)):
        _poke(img, rb + c * 2, 1, 2)
    return img


@pytest.mark.slow
def test_too_many_snapshots_are_refused_then_discarded(twins):
    imgs = [_too_many(d) for d in twins]
    rc, out, err = same(twins, "info", "t.qcow2")
    assert err == "qemu-img: Could not open 't.qcow2': Snapshot table too large\n"
    rc, out, err = same(twins, "check", "t.qcow2")
    assert (rc, err) == (1, "qemu-img: ERROR snapshot table too large\n"
                            "You can force-remove all 65536 overhanging snapshots with "
                            "qemu-img check -r all\n"
                            "qemu-img: Check failed: File too large\n")
    rc, out, err = same(twins, "check", "-r", "all", "t.qcow2")
    assert rc == 0
    assert err.startswith("Discarding 65536 overhanging snapshots\n"
                          "Leaked cluster 14 refcount=1 reference=0\n")
    assert "    42 leaked clusters\n    65536 corruptions\n" in out
    assert imgs[0].read_bytes() == imgs[1].read_bytes()
    assert _be(imgs[0], 60, 4) == 65536


def test_snapshot_table_past_the_end_opens(twins):
    """080: 65536 snapshots at 16 MiB, past the end of the file: the image
    opens (the entries read as zeroes) and a new snapshot is one too many."""
    for d in twins:
        img = d / "t.qcow2"
        qemu_img("create", "-f", "qcow2", img, "64M")
        _poke(img, 64, 0x1000000)
        _poke(img, 60, 0x10000, 4)
    rc, out, err = same(twins, "snapshot", "-c", "test", "t.qcow2")
    assert (rc, err) == (1, "qemu-img: Could not create snapshot 'test': -27 (File too large)\n")
    assert run(twins[0], "info", "t.qcow2")[0] == 0


def test_snapshot_of_a_cluster_without_refcount_block(twins):
    """080: an L2 entry naming a cluster no refcount block covers. QEMU
    takes a new refcount block and fails: EFBIG where the refcount table
    could never reach it, EAGAIN where it has the entry (block hooked up)."""
    for d in twins:
        img = d / "t.qcow2"
        qemu_img("create", "-f", "qcow2", img, "64M")
        qemu_io(img, "write 0 512")
    imgs = [d / "t.qcow2" for d in twins]
    for entry, text in ((0xBFFFFFFFFFFF0000, "-27 (File too large)"),
                        (0x800000FFFFFF0000, "-11 (Resource temporarily unavailable)")):
        for img in imgs:
            _poke(img, 0x40000, entry)
        rc, out, err = same(twins, "snapshot", "-c", "test", "t.qcow2")
        assert (rc, err) == (1, f"qemu-img: Could not create snapshot 'test': {text}\n")
        assert imgs[0].read_bytes() == imgs[1].read_bytes()


def test_downgrade_judges_each_snapshot_l1_table(twins):
    """080: amend -o compat=0.10 with a snapshot whose L1 table is invalid
    (unaligned; too large) reports it, then the downgrade's failure."""
    for poke, err_text in (((0x70000, 0x400200, 8), ("Snapshot L1 table offset invalid",
                                                     "Invalid argument")),
                           ((0x70008, 0x10000000, 4), ("Snapshot L1 table too large",
                                                       "File too large"))):
        img = twins[0] / "t.qcow2"
        qemu_img("create", "-f", "qcow2", img, "64M")
        qemu_io(img, "write 0 512")
        qemu_img("snapshot", "-c", "test", img)
        _poke(img, *poke)
        (twins[1] / "t.qcow2").write_bytes(img.read_bytes())
        rc, out, err = same(twins, "amend", "-o", "compat=0.10", "t.qcow2")
        assert (rc, err) == (1, f"qemu-img: {err_text[0]}\n"
                                f"qemu-img: Failed to turn zero into data clusters: {err_text[1]}\n")
        assert img.read_bytes() == (twins[1] / "t.qcow2").read_bytes()


def test_downgrade_with_a_snapshot_sharing_the_l2_table(twins):
    """061: zero clusters in an L2 table the snapshot shares with the
    active L1 (with and without a backing file): expanded once, through the
    active table, as qemu-img does; images equal, clean."""
    for backed in (False, True):
        d = twins[0]
        img = d / "t.qcow2"
        for f in d.glob("t.qcow2*"):
            f.unlink()
        opts = ["-b", "t.qcow2.base", "-F", "qcow2"] if backed else []
        if backed:
            qemu_img("create", "-f", "qcow2", d / "t.qcow2.base", "64M")
            qemu_io(d / "t.qcow2.base", "write -P 0x2a 0 128k")
        qemu_img("create", "-f", "qcow2", "-o", "compat=1.1", *opts, img, "64M")
        qemu_io(img, "write -z 0 128k")
        qemu_img("snapshot", "-c", "foo", img)
        for f in d.glob("t.qcow2*"):
            (twins[1] / f.name).write_bytes(f.read_bytes())
        rc, out, err = same(twins, "amend", "-o", "compat=0.10", "t.qcow2")
        assert (rc, err) == (0, "")
        assert img.read_bytes() == (twins[1] / "t.qcow2").read_bytes()
        check_clean(img)


def test_resize_and_apply_with_snapshots(twins):
    """061: a v2 image with snapshots cannot be resized; a v3 one can, and
    applying a snapshot of another disk size gives the image that size
    back. Same texts and sizes as qemu-img, clean images, the data kept
    (the layout after the shrink differs: QEMU copies the shared L2 table
    even though the cut leaves it unchanged)."""
    for d in twins:
        img = d / "t.qcow2"
        qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", img, "32M")
        qemu_io(img, "write -P 0x2a 24M 64k")
        run(d, "snapshot", "-c", "foo", "t.qcow2")
    rc, out, err = same(twins, "resize", "t.qcow2", "64M")
    assert (rc, err) == (1, "qemu-img: Can't resize a v2 image which has snapshots\n")
    same(twins, "amend", "-o", "compat=1.1,size=128M", "t.qcow2")
    for d in twins:
        run(d, "snapshot", "-c", "bar", "t.qcow2")
    assert same(twins, "resize", "--shrink", "t.qcow2", "64M")[:2] == (0, "Image resized.\n")
    rc, out, err = same(twins, "amend", "-o", "compat=0.10,size=32M", "t.qcow2")
    assert (rc, err) == (1, "qemu-img: Internal snapshots prevent downgrade of image\n")
    for expect in (32 << 20, 128 << 20):
        sizes = [_be(d / "t.qcow2", 24) for d in twins]
        assert sizes == [expect, expect]
        if expect == 32 << 20:
            assert same(twins, "snapshot", "-a", "bar", "t.qcow2")[0] == 0
    for d in twins:
        img = d / "t.qcow2"
        check_clean(img)
        assert "read 65536/65536" in qemu_io(img, "read -P 0x2a 24M 64k").stdout
