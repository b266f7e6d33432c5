"""Qcow2Driver.allocate(undo=...) then undo_allocate: a job's batch that did
not land puts the target back as it read before, whatever each cluster was:
unallocated (reads the backing file), a zero cluster with or without a host
cluster, extended-L2 subclusters partly allocated or zero. Checked against
qemu-img (the guest view before, ``qemu-img check`` after), with garbage
written into the clusters as a half-done copy would leave them."""
from __future__ import annotations

import os

import pytest

from blkjobs.formats import open_image
from qemu_oracle import check_clean, qemu_img, qemu_io, to_raw

SIZE = 4 << 20
CS = 65536


def make(tmp_path, extended: bool):
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), str(SIZE))
    qemu_io(str(base), f"write -P 0x41 0 {SIZE}")
    top = tmp_path / "top.qcow2"
    opts = f"cluster_size={CS}" + (",extended_l2=on" if extended else "")
    qemu_img("create", "-f", "qcow2", "-o", opts, "-b", "base.qcow2", "-F", "qcow2", str(top))
    qemu_io(str(top),
            "write -z 65536 65536",                   # cluster 1: zero, no host
            "write -P 0x62 131072 65536",             # cluster 2: data ...
            "write -z 131072 65536",                  # ... then zero, host kept
            "write -P 0x63 200704 4096",              # cluster 3: 4 KiB of data
            "write -z 266240 4096",                   # cluster 4: 4 KiB zero
            "write -P 0x64 327680 65536")             # cluster 5: plain data
    return top


@pytest.mark.parametrize("extended", [False, True])
def test_undo_allocate_restores_what_the_image_read(tmp_path, extended):
    top = make(tmp_path, extended)
    before = to_raw(top, tmp_path)
    with open_image(str(top), read_only=False) as img:
        undo: list = []
        runs = img.allocate(0, 8 * CS, undo)
        assert sum(r.length for r in runs) == 8 * CS
        covered = sorted((s, n) for s, n, _, _ in undo)
        # every cluster but the plain data one (5) changed what it reads
        # (cluster 3 and 4 of a standard image were COW-ed whole by qemu-io)
        want_changed = {0, 1, 2, 6, 7} | ({3, 4} if extended else set())
        changed = {c for s, n in covered for c in range(s // CS, (s + n) // CS)}
        assert changed == want_changed
        # A copy that stopped half-way: garbage in the first half of each
        # changed cluster, except the bytes cluster 3 held itself (a copy
        # writes what they hold there: the rest of a cluster is filled from
        # the source's view, which includes them).
        for r in runs:
            for g in range(r.start, r.start + r.length, CS):
                if g // CS in changed:
                    os.pwrite(img.fd, b"\xee" * (CS // 2), r.host_offset + g - r.start)
                if g // CS == 3:
                    os.pwrite(img.fd, b"\x63" * 4096, r.host_offset + g - r.start + 4096)
        img.undo_allocate(undo)
        img.flush()
    check_clean(top)
    assert to_raw(top, tmp_path) == before


def test_undo_allocate_gives_the_space_back(tmp_path):
    """The clusters it had taken are punched: the file's blocks go back to
    the file system at once (a job stopped by ENOSPC can resume once space
    is freed)."""
    top = make(tmp_path, False)
    with open_image(str(top), read_only=False) as img:
        undo: list = []
        runs = img.allocate(16 * CS, 32 * CS, undo)
        for r in runs:
            os.pwrite(img.fd, b"\xee" * r.length, r.host_offset)
        blocks = os.fstat(img.fd).st_blocks
        img.undo_allocate(undo)
        assert os.fstat(img.fd).st_blocks <= blocks - 32 * CS // 512
        img.flush()
        undo = []
        again = img.allocate(16 * CS, 32 * CS, undo)
        for r in again:
            os.pwrite(img.fd, b"\x77" * r.length, r.host_offset)
        img.release_allocated(undo)
        img.flush()
    check_clean(top)
    data = to_raw(top, tmp_path)
    assert data[16 * CS:48 * CS] == b"\x77" * 32 * CS
