"""Behaviour that scripts written for qemu-img rely on, checked against
qemu-img itself: the same invocation given to both tools must leave the same
files, print the same things and exit the same way."""
from __future__ import annotations

import os

import pytest

from conftest import blocks, run_blkjobs
from qemu_oracle import qemu_img, qemu_io, qemu_map

MiB = 1 << 20


def _mapping(path):
    """qemu-img map without host offsets (they differ between writers)."""
    return [{k: v for k, v in e.items() if k != "offset"} for e in qemu_map(path)]


def _source(tmp_path, fmt):
    src = tmp_path / f"src.{fmt}"
    qemu_img("create", "-f", fmt, src, "16M")
    qemu_io(src, "write -P 1 1M 2M", "write -z 8M 1M", fmt=fmt)
    return src


@pytest.mark.parametrize("src_fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("dst_fmt", ["raw", "qcow2"])
def test_convert_S0_allocates_everything_as_qemu_img(tmp_path, src_fmt, dst_fmt):
    src = _source(tmp_path, src_fmt)
    ours, theirs = tmp_path / f"ours.{dst_fmt}", tmp_path / f"theirs.{dst_fmt}"
    run_blkjobs("convert", "-S", "0", "-f", src_fmt, "-O", dst_fmt, src, ours, check=True)
    qemu_img("convert", "-S", "0", "-f", src_fmt, "-O", dst_fmt, src, theirs)
    assert qemu_img("compare", "-f", src_fmt, "-F", dst_fmt, src, ours).returncode == 0
    assert _mapping(ours) == _mapping(theirs)
    assert _mapping(ours) == [{"start": 0, "length": 16 * MiB, "depth": 0, "present": True,
                               "zero": False, "data": True}]
    assert blocks(ours) >= 16 * MiB        # really on disk, not holes behind the tables
    if dst_fmt == "qcow2":
        assert qemu_img("check", ours).returncode == 0
    else:
        assert blocks(ours) == blocks(theirs) == os.path.getsize(ours)


def test_convert_o_backing_file_copies_only_the_difference_as_qemu_img(tmp_path):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", base, "16M")
    qemu_io(base, "write -P 2 0 1M")
    qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    qemu_io(top, "write -P 3 4M 1M")
    opts = f"backing_file={base.name},backing_fmt=qcow2"
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    run_blkjobs("convert", "-O", "qcow2", "-o", opts, top, ours, check=True)
    qemu_img("convert", "-O", "qcow2", "-o", opts, top, theirs)
    assert qemu_map(ours) == qemu_map(theirs)       # only 4M..5M allocated in the top
    assert [e["start"] for e in qemu_map(ours) if e["depth"] == 0 and e["data"]] == [4 * MiB]
    assert os.path.getsize(ours) == os.path.getsize(theirs)
    info = qemu_img("info", "--output", "json", ours).stdout
    assert '"backing-filename": "base.qcow2"' in info and '"backing-filename-format": "qcow2"' in info
    assert qemu_img("compare", top, ours).returncode == 0


def _leaky(path):
    """A leaks-only image: two data clusters counted twice, 17 clusters past
    the end counted once and referenced by nothing (16-bit refcounts, first
    refcount block at 0x20000, as qemu-img creates them)."""
    qemu_img("create", "-f", "qcow2", path, "16M")
    qemu_io(path, "write -P 1 0 128k")
    data = qemu_map(path)[0]["offset"] // 65536
    with open(path, "r+b") as f:
        for c, n in [(data, 2), (data + 1, 2)] + [(c, 1) for c in range(7, 24)]:
            f.seek(0x20000 + 2 * c)
            f.write(n.to_bytes(2, "big"))
        f.truncate(24 * 65536)


def test_check_r_leaks_on_a_leaks_only_image_as_qemu_img(tmp_path):
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    _leaky(ours)
    theirs.write_bytes(ours.read_bytes())
    before = qemu_img("check", ours, check=False)
    assert before.returncode == 2 and "ERROR OFLAG_COPIED" in before.stderr
    a = run_blkjobs("check", "-r", "leaks", ours)
    b = qemu_img("check", "-r", "leaks", theirs, check=False)
    assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr)
    assert a.returncode == 0 and "Leaked cluster 7 refcount=1 reference=0\n" in a.stderr
    after = qemu_img("check", ours, check=False)
    assert after.returncode == 0 and after.stderr == ""
