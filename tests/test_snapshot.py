"""qcow2 internal snapshots (``snapshot -c/-a/-d``), with qemu-img 7.2 as the
oracle: the same command lines give the same exit status and texts and the
same files (byte for byte, the creation dates masked), and writes after a
snapshot copy shared clusters (the snapshot keeps its data)."""
from __future__ import annotations

import json
import struct

import pytest

from qemu_oracle import check_clean, qemu_img, qemu_io, to_raw
from test_parity_invocation import run, same, twins  # noqa: F401  (fixture)

from blkjobs.formats.qcow2.driver import Qcow2


def masked(path) -> bytes:
    """The image's bytes with the date fields of its snapshot table zeroed,
    padded with zeroes to a whole cluster (qemu-img ends the file where a
    snapshot table written last ends; blkjobs at the end of its cluster)."""
    data = bytearray(path.read_bytes())
    data += bytes(-len(data) % 65536)
    nb, off = struct.unpack_from(">IQ", data, 60)
    for _ in range(nb):
        id_len, name_len = struct.unpack_from(">HH", data, off + 12)
        data[off + 16:off + 24] = bytes(8)
        extra = struct.unpack_from(">I", data, off + 36)[0]
        off += 40 + extra + id_len + name_len
        off += -off % 8
    return bytes(data)


def info_no_dates(path) -> list[dict]:
    snaps = json.loads(qemu_img("info", "--output", "json", "-U", path).stdout).get("snapshots", [])
    for s in snaps:
        s.pop("date-sec")
        s.pop("date-nsec")
    return snaps


def mk(twins, *create_opts, size="4M"):
    """The same image in both directories, with data written by qemu-io."""
    for d in twins:
        qemu_img("create", "-f", "qcow2", *create_opts, d / "t.qcow2", size)
        qemu_io(d / "t.qcow2", "write -P 1 0 3M", "write -P 2 64k 4k")
    return [d / "t.qcow2" for d in twins]


def test_create_apply_delete_match_qemu_img(twins):
    """Every step: same exit, stdout, stderr; same file (dates masked);
    qemu-img check clean; the snapshot table as qemu-img info reads it."""
    ours, theirs = mk(twins)
    steps = [("-c", "s1"), ("-c", "s1"), ("-c", ""), ("-a", "2"), ("-a", "s1"),
             ("-d", "s1"), ("-d", "2"), ("-a", "nope"), ("-d", "nope"), ("-c", "x" * 300),
             ("-a", "3"), ("-d", ""), ("-d", "s1"), ("-d", "x" * 255)]
    for i, (flag, name) in enumerate(steps):
        if i == 4:              # data differs between the snapshots
            for p in (ours, theirs):
                qemu_io(p, "write -P 9 1M 128k", "write -z 2M 64k", "discard 0 64k")
        same(twins, "snapshot", flag, name, "t.qcow2")
        assert masked(ours) == masked(theirs), (flag, name)
        check_clean(ours)
        assert info_no_dates(ours) == info_no_dates(theirs)
        assert qemu_img("compare", ours, theirs).returncode == 0
    assert struct.unpack_from(">IQ", ours.read_bytes(), 60) == (0, 0)


def test_texts_and_exit_codes_match_qemu_img(twins):
    mk(twins)
    for d in twins:
        qemu_img("create", "-f", "raw", d / "r.raw", "1M")
    for args in (("-c", "x", "r.raw"), ("-a", "x", "r.raw"), ("-d", "x", "r.raw"),
                 ("-c", "x", "-U", "t.qcow2"), ("-c", "x", "-l", "t.qcow2"),
                 ("-c", "x", "none.qcow2"), ("-a", "x", "t.qcow2"), ("-d", "x", "t.qcow2")):
        rc, _, err = same(twins, "snapshot", *args)
        assert rc == 1 and err
    rc, out, err = same(twins, "snapshot", "-c", "a", "t.qcow2")
    assert (rc, out, err) == (0, "", "")
    for d in twins:
        qemu_img("bitmap", "--add", d / "t.qcow2", "b0")
    for flag in ("-c", "-a", "-d"):     # -a refused: the bitmaps are active ones
        rc, _, err = same(twins, "snapshot", flag, "a", "t.qcow2")
        assert rc == (1 if flag == "-a" else 0), err
    check_clean(twins[0] / "t.qcow2")


def test_list_and_info_show_created_snapshots_as_qemu_img(twins):
    """-l and info (human and JSON) of snapshots made by blkjobs, read by
    qemu-img and by blkjobs: the same (both read the same file)."""
    ours, theirs = mk(twins)
    run(twins[0], "snapshot", "-c", "one", "t.qcow2")
    run(twins[0], "snapshot", "-c", "two", "t.qcow2")
    theirs.unlink()
    theirs.symlink_to(ours)         # both read the same file
    for args in (("snapshot", "-l", "t.qcow2"), ("info", "t.qcow2"),
                 ("info", "--output", "json", "t.qcow2")):
        same(twins, *args)
    lines = run(twins[0], "snapshot", "-l", "t.qcow2")[1].splitlines()
    assert lines[0] == "Snapshot list:"
    assert [ln.split()[:4] for ln in lines[2:]] == [["1", "one", "0", "B"], ["2", "two", "0", "B"]]
    assert [ln.split()[-2:] for ln in lines[2:]] == [["00:00:00.000", "0"]] * 2


@pytest.mark.parametrize("bits,names,failing", [("1", ["foo"], "foo"),
                                                ("2", ["foo", "bar", "baz"], "baz")])
def test_refcount_overflow_fails_as_qemu_img(twins, bits, names, failing):
    """A reference more than refcount_bits holds: EINVAL, only the L1 copy
    leaked (the counting done is undone), as qemu-img."""
    for d in twins:
        qemu_img("create", "-f", "qcow2", "-o", f"refcount_bits={bits}", d / "t.qcow2", "64M")
        qemu_io(d / "t.qcow2", "write 0 512")
    for n in names:
        rc, _, err = same(twins, "snapshot", "-c", n, "t.qcow2")
    assert (rc, err) == (1, f"qemu-img: Could not create snapshot '{failing}': -22 "
                            "(Invalid argument)\n")
    assert masked(twins[0] / "t.qcow2") == masked(twins[1] / "t.qcow2")
    ck = [qemu_img("check", d / "t.qcow2", check=False) for d in twins]
    assert ck[0].returncode == 3 and ck[0].stdout == ck[1].stdout


def _writes(drv_or_path, ours: bool):
    """The same guest writes through our driver and through qemu-io: partial
    clusters (COW of a shared data cluster and of the shared L2 table),
    whole clusters, zeroes, a discard."""
    ops = [("w", 4096, b"\x07" * 8192), ("w", 1 << 20, b"\x08" * 65536),
           ("w", (2 << 20) + 512, b"\x05" * 70000), ("z", 3 << 16, 65536)]
    if not ours:
        cmds = [f"write -P {d[0]} {o} {len(d)}" if k == "w" else f"write -z {o} {d}"
                for k, o, d in ops]
        qemu_io(drv_or_path, *cmds)
        return
    drv = Qcow2(str(drv_or_path), read_only=False)
    try:
        for k, o, d in ops:
            drv.write(o, d) if k == "w" else drv.write_zeroes(o, d)
    finally:
        drv.close()


@pytest.mark.parametrize("opts", [(), ("-o", "extended_l2=on"), ("-o", "cluster_size=4k")])
def test_write_after_snapshot_keeps_the_snapshot(twins, tmp_path, opts):
    """Writes by blkjobs after `snapshot -c` copy the shared clusters: the
    active image reads what qemu-io's same writes give, `snapshot -a` gives
    back the old data byte for byte, and qemu-img check stays clean (before
    the fix such an image could not even be opened for writing)."""
    ours, theirs = mk(twins, *opts)
    before = to_raw(ours, tmp_path)
    same(twins, "snapshot", "-c", "s1", "t.qcow2")
    _writes(ours, True)
    _writes(theirs, False)
    check_clean(ours)
    assert to_raw(ours, tmp_path) == to_raw(theirs, tmp_path)
    assert to_raw(ours, tmp_path) != before
    # the snapshot still reads the old data (as qemu-img reads it)
    qemu_img("convert", "-l", "s1", "-O", "raw", ours, tmp_path / "snap.raw")
    assert (tmp_path / "snap.raw").read_bytes() == before
    same(twins, "snapshot", "-a", "s1", "t.qcow2")
    check_clean(ours)
    assert to_raw(ours, tmp_path) == before == to_raw(theirs, tmp_path)
    same(twins, "snapshot", "-d", "s1", "t.qcow2")
    check_clean(ours)
    assert to_raw(ours, tmp_path) == before


def test_snapshots_made_by_qemu_img_applied_and_deleted_by_blkjobs(twins, tmp_path):
    ours, theirs = mk(twins)
    qemu_img("snapshot", "-c", "a", theirs)
    qemu_io(theirs, "write -P 3 0 1M")
    qemu_img("snapshot", "-c", "b", theirs)
    qemu_io(theirs, "write -P 4 512k 1M")
    ours.write_bytes(theirs.read_bytes())
    for flag, name in (("-a", "a"), ("-d", "b"), ("-a", "1"), ("-d", "a")):
        same(twins, "snapshot", flag, name, "t.qcow2")
        assert masked(ours) == masked(theirs)
        check_clean(ours)


def test_convert_from_a_snapshot_matches_qemu_img(twins, tmp_path):
    """convert -l ID-or-name / snapshot.id=,snapshot.name=: the snapshot's
    data (not the active state's), byte for byte as qemu-img converts it;
    qemu-img's texts for what cannot be loaded."""
    ours, theirs = mk(twins)
    before = to_raw(ours, tmp_path)
    for p in (ours, theirs):
        qemu_img("snapshot", "-c", "s1", p)
        qemu_io(p, "write -P 5 0 2M")
    for args in (("-l", "s1"), ("-l", "1"), ("-l", "snapshot.name=s1"),
                 ("-l", "snapshot.id=1,snapshot.name=s1"), ("-O", "qcow2", "-l", "1")):
        same(twins, "convert", *args, "t.qcow2", "o.img")
        assert to_raw(twins[0] / "o.img", tmp_path, fmt=args[1] if args[0] == "-O" else "raw") \
            == before
        assert qemu_img("compare", twins[0] / "o.img", twins[1] / "o.img").returncode == 0
    for d in twins:
        qemu_img("create", "-f", "raw", d / "r.raw", "1M")
    for args in (("-l", "nope", "t.qcow2"), ("-l", "snapshot.id=1,snapshot.name=x", "t.qcow2"),
                 ("-l", "snapshot.foo=1", "t.qcow2"), ("-l", "x", "-f", "raw", "r.raw")):
        rc, _, err = same(twins, "convert", *args, "n.img")
        assert rc == 1 and err.startswith("qemu-img: ")
        assert not (twins[0] / "n.img").exists()
