"""raw / qcow2 / chain -> a new qcow2 target: the copy engine allocates the
fresh data clusters it is given ahead of the writes (``prealloc``, as for a
new raw target: the serial buffered writes then skip the file system's
per-block delayed allocation) and punches the zero runs it finds in them
out again. The bytes are the source's (``qemu-img compare``), ``check`` is
clean, the file maps as qemu-img's copy (same runs, host offsets, length),
no block is left allocated and unwritten, and the targets it must leave
alone (``-n``, ``-o preallocation``, ``-c``, O_DIRECT) are."""
from __future__ import annotations

import os

import pytest

from conftest import run_blkjobs
from qemu_oracle import check_clean, qemu_img, qemu_io, qemu_map
from test_convert_q2r_prealloc import _extents, first_check

KiB, MiB = 1 << 10, 1 << 20
SIZE = 8 * MiB


def _raw(path):
    """Data, zeroes written as data (whole clusters and a part of one,
    unaligned), holes, data up to the end."""
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.write(os.urandom(MiB) + bytes(64 * KiB) + os.urandom(960 * KiB))
        f.seek(2052 * KiB)
        f.write(bytes(8 * KiB) + os.urandom(4 * KiB))
        f.seek(3 * MiB)
        f.write(os.urandom(512 * KiB) + bytes(12 * KiB) + os.urandom(500 * KiB))
        f.seek(6 * MiB)
        f.write(os.urandom(2 * MiB))


def _source(tmp_path, kind):
    raw = str(tmp_path / "src.raw")
    _raw(raw)
    if kind == "raw":
        return raw, "raw"
    base = str(tmp_path / "base.qcow2")
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, base)
    if kind == "qcow2":
        return base, "qcow2"
    top = str(tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    qemu_io(top, "write -P 0x55 512k 64k", "write -P 0 3M 128k", "write -z 6M 64k",
            "write -P 0x66 7M 64k", "write -P 0 7232k 4k")
    return top, "qcow2"


def _unwritten(path):
    return [e for e in _extents(path) if e[2]]


@pytest.mark.parametrize("kind", ["raw", "qcow2", "chain"])
@pytest.mark.parametrize("cache", ["unsafe", "writeback", "none"])
def test_new_qcow2_target_as_qemu_img(tmp_path, kind, cache):
    src, fmt = _source(tmp_path, kind)
    ours, ref = str(tmp_path / "ours.qcow2"), str(tmp_path / "ref.qcow2")
    run_blkjobs("convert", "-t", cache, "-f", fmt, "-O", "qcow2", src, ours, check=True)
    qemu_img("convert", "-f", fmt, "-O", "qcow2", src, ref)
    assert qemu_img("compare", "-f", fmt, "-F", "qcow2", src, ours).returncode == 0
    mine, theirs = check_clean(ours), check_clean(ref)
    assert mine["image-end-offset"] == theirs["image-end-offset"]
    assert os.path.getsize(ours) == os.path.getsize(ref)
    assert [(e["start"], e["length"], e["data"], e.get("offset")) for e in qemu_map(ours)] == \
        [(e["start"], e["length"], e["data"], e.get("offset")) for e in qemu_map(ref)]
    # the zero blocks found inside data clusters were punched out again
    assert not _unwritten(ours)


@pytest.mark.parametrize("kind", ["raw", "qcow2"])
def test_data_clusters_allocated_ahead(tmp_path, kind):
    """At the first check of a rate-limited copy the target's data clusters
    are allocated while little of them is written."""
    src, fmt = _source(tmp_path, kind)
    blocks, written = first_check(src, fmt, str(tmp_path / "out.qcow2"), "qcow2")
    # the source's data runs of 256 KiB or more (clusters that read as
    # zeroes are not given any)
    assert blocks >= 5 * MiB
    assert written < 4 * MiB


def test_existing_target_not_allocated_ahead(tmp_path):
    """-n: the target's clusters may be reused in place (its old bytes
    kept where the source is zero with --target-is-zero): the engine
    allocates nothing ahead, the writes do."""
    src, fmt = _source(tmp_path, "raw")
    dst = str(tmp_path / "out.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", dst, str(SIZE))
    before = os.stat(dst).st_blocks * 512
    blocks, written = first_check(src, fmt, dst, "qcow2", no_create=True)
    assert blocks - before < 4 * MiB
    assert written < 4 * MiB


@pytest.mark.parametrize("opts", [["-o", "preallocation=metadata"], ["-c"]])
def test_other_targets_as_before(tmp_path, opts):
    """-o preallocation and -c targets: the bytes and ``check`` as
    qemu-img's, no unwritten block left where data was written."""
    src, fmt = _source(tmp_path, "raw")
    ours = str(tmp_path / "ours.qcow2")
    run_blkjobs("convert", "-f", fmt, "-O", "qcow2", *opts, src, ours, check=True)
    assert qemu_img("compare", "-f", fmt, "-F", "qcow2", src, ours).returncode == 0
    check_clean(ours)
