"""blkjobs convert --bitmaps [--skip-broken-bitmaps] against qemu-img
convert --bitmaps: the same bitmaps (names, granularity, flags, bits read
by QEMU), the same refusals and exit codes."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys

from conftest import run_blkjobs
from qemu_oracle import check_clean, qemu_dirty, qemu_img, qemu_info, qemu_io


def _bitmaps(path) -> list[dict]:
    return qemu_info(path)["format-specific"]["data"].get("bitmaps", [])


def _source(tmp_path):
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-f", "qcow2", src, "8M")
    qemu_img("bitmap", "--add", src, "a")
    qemu_img("bitmap", "--add", "-g", "512k", "--disable", src, "b")
    qemu_io(src, "write -P 7 0 64k", "write -P 8 3M 100k")
    qemu_img("bitmap", "--enable", src, "b")
    qemu_io(src, "write -P 9 6M 4k")
    return src


def test_convert_bitmaps_as_qemu_img(tmp_path):
    src = _source(tmp_path)
    ref, ours = tmp_path / "ref.qcow2", tmp_path / "ours.qcow2"
    qemu_img("convert", "--bitmaps", "-O", "qcow2", src, ref)
    run_blkjobs("convert", "--bitmaps", "-O", "qcow2", src, ours, check=True)
    assert _bitmaps(ours) == _bitmaps(ref) == _bitmaps(src)
    for name in "ab":
        assert qemu_dirty(ours, name) == qemu_dirty(ref, name) == qemu_dirty(src, name)
    assert qemu_dirty(ours, "a") == [(0, 65536), (3 << 20, 2 * 65536), (6 << 20, 65536)]
    assert qemu_img("compare", src, ours).returncode == 0
    check_clean(ours)


def _in_use(tmp_path):
    src = _source(tmp_path)
    code = ("import os, sys\nfrom blkjobs import Engine\neng = Engine()\n"
            "eng.attach(eng.open(sys.argv[1])).write(0, b'x')\nos._exit(0)\n")
    subprocess.run([sys.executable, "-c", code, str(src)], check=True, timeout=60)
    assert [b["flags"] for b in _bitmaps(src)] == [["in-use", "auto"], ["in-use", "auto"]]
    qemu_img("bitmap", "--remove", src, "b")
    qemu_img("bitmap", "--add", src, "c")
    return src


def test_convert_broken_bitmaps_as_qemu_img(tmp_path):
    src = _in_use(tmp_path)
    refused = [tmp_path / n for n in ("r1.qcow2", "o1.qcow2")]
    p = qemu_img("convert", "--bitmaps", "-O", "qcow2", src, refused[0], check=False)
    q = run_blkjobs("convert", "--bitmaps", "-O", "qcow2", src, refused[1])
    assert (p.returncode, q.returncode) == (1, 1)
    assert q.stderr == p.stderr.replace("qemu-img", "blkjobs") == (
        "blkjobs: Cannot copy inconsistent bitmap 'a'\n"
        "Try --skip-broken-bitmaps, or use 'blkjobs bitmap --remove' to delete it\n")
    assert not refused[0].exists() and not refused[1].exists()
    ref, ours = tmp_path / "ref.qcow2", tmp_path / "ours.qcow2"
    p = qemu_img("convert", "--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", src, ref)
    q = run_blkjobs("convert", "--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", src, ours)
    assert q.returncode == 0
    assert q.stderr == p.stderr.replace("qemu-img", "blkjobs") == (
        "blkjobs: warning: Skipping inconsistent bitmap 'a'\n")
    assert _bitmaps(ours) == _bitmaps(ref) == [{"flags": ["auto"], "name": "c",
                                                "granularity": 65536}]
    check_clean(ours)


def test_convert_bitmaps_refusals_as_qemu_img(tmp_path):
    src = _source(tmp_path)
    raw = tmp_path / "s.raw"
    qemu_img("create", "-f", "raw", raw, "8M")
    v2 = tmp_path / "v2.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", v2, "8M")
    taken = tmp_path / "taken.qcow2"
    qemu_img("create", "-f", "qcow2", taken, "8M")
    qemu_img("bitmap", "--add", taken, "a")
    cases = [
        (["--bitmaps", "-O", "raw", src, tmp_path / "x.raw"]),
        (["--skip-broken-bitmaps", "-O", "qcow2", src, tmp_path / "x.qcow2"]),
        (["--bitmaps", "-f", "raw", "-O", "qcow2", raw, tmp_path / "x.qcow2"]),
        (["-n", "--bitmaps", "-O", "qcow2", src, v2]),
        (["-n", "--bitmaps", "-O", "qcow2", src, taken]),
    ]
    for args in cases:
        # each tool on its own copy of an existing target (qemu-img stores
        # the bitmaps it added before the refusal)
        twin = args[-1].with_name("twin-" + args[-1].name)
        if args[-1].exists():
            shutil.copyfile(args[-1], twin)
        p = qemu_img("convert", *args, check=False)
        q = run_blkjobs("convert", *args[:-1], twin if twin.exists() else args[-1])
        assert (q.returncode, q.stderr) == (p.returncode,
                                            p.stderr.replace("qemu-img", "blkjobs")), args
        assert q.returncode == 1
    assert _bitmaps(tmp_path / "twin-taken.qcow2") == _bitmaps(taken) == [
        {"flags": ["auto"], "name": "a", "granularity": 65536},
        {"flags": ["auto"], "name": "b", "granularity": 524288}]


def test_inconsistent_bitmaps_in_qemus_order_and_invoked_name(tmp_path):
    """QEMU checks the bitmaps from the last of the directory to the first:
    the first refused, and the order of the warnings, are those (iotest
    qemu-img-bitmaps); invoked as qemu-img, the hint names qemu-img. The
    copies keep the directory's order."""
    import os
    src = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", src, "1M")
    for name in ("x1", "x2", "x3"):
        qemu_img("bitmap", "--add", src, name)
    code = ("import os, sys\nfrom blkjobs import Engine\neng = Engine()\n"
            "eng.attach(eng.open(sys.argv[1])).write(0, b'x')\nos._exit(0)\n")
    subprocess.run([sys.executable, "-c", code, str(src)], check=True, timeout=60)
    for name in ("y2", "y1"):
        qemu_img("bitmap", "--add", src, name)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "qemu-img").symlink_to(os.path.join(os.path.dirname(sys.executable), "blkjobs"))
    outs = []
    for exe in (str(bindir / "qemu-img"), "qemu-img"):
        refused = subprocess.run([exe, "convert", "--bitmaps", "-O", "qcow2", src,
                                  tmp_path / "r.qcow2"], capture_output=True, text=True)
        skipped = subprocess.run([exe, "convert", "--bitmaps", "--skip-broken-bitmaps", "-O",
                                  "qcow2", src, tmp_path / f"{len(outs)}.qcow2"],
                                 capture_output=True, text=True)
        outs.append((refused.returncode, refused.stderr, skipped.returncode, skipped.stderr))
    assert outs[0] == outs[1] == (
        1, "qemu-img: Cannot copy inconsistent bitmap 'x3'\nTry --skip-broken-bitmaps, or use "
        "'qemu-img bitmap --remove' to delete it\n", 0,
        "qemu-img: warning: Skipping inconsistent bitmap 'x3'\n"
        "qemu-img: warning: Skipping inconsistent bitmap 'x2'\n"
        "qemu-img: warning: Skipping inconsistent bitmap 'x1'\n")
    assert [b["name"] for b in _bitmaps(tmp_path / "0.qcow2")] == \
        [b["name"] for b in _bitmaps(tmp_path / "1.qcow2")] == ["y2", "y1"]
    check_clean(tmp_path / "0.qcow2")



def bitmap_layout(path) -> tuple:
    """Where the image's bitmaps lie and their bytes: the directory's
    offset and bytes, each table's offset and bytes, each data cluster's
    offset and bytes; and the file's length."""
    from blkjobs.formats.qcow2.header import parse_header, read_bitmap_directory
    data = path.read_bytes()
    h = parse_header(data[:2 << 20], len(data), str(path))
    fd = os.open(path, os.O_RDONLY)
    try:
        entries = read_bitmap_directory(fd, h, len(data))
    finally:
        os.close(fd)
    _, _, dsize, doff = struct.unpack(">IIQQ", h.ext(0x23852875))
    out: list = [len(data), doff, data[doff:doff + dsize]]
    for e in entries:
        table = data[e.table_offset:e.table_offset + 8 * e.table_size]
        out.append((e.table_offset, table))
        for (x,) in struct.iter_unpack(">Q", table):
            off = x & 0x00FFFFFFFFFFFE00
            out.append((off, data[off:off + h.cluster_size] if off else x))
    return tuple(out)


def test_convert_bitmaps_stored_where_qemu_img_stores_them(tmp_path):
    """The target's bitmaps lie where qemu-img puts them, byte for byte:
    the directory's order (QEMU adds them from the source's last), the
    clusters found first-fit, tables and directory written as long as they
    are (the file ends inside its last cluster, as qemu-img's)."""
    src = _source(tmp_path)
    ref, ours = tmp_path / "ref.qcow2", tmp_path / "ours.qcow2"
    qemu_img("convert", "--bitmaps", "-O", "qcow2", src, ref)
    run_blkjobs("convert", "--bitmaps", "-O", "qcow2", src, ours, check=True)
    assert bitmap_layout(ours) == bitmap_layout(ref)
    assert len(bitmap_layout(ref)) == 2 + 1 + 4    # two tables, two data clusters
