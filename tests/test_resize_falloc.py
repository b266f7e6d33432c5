"""``resize --preallocation=falloc|full`` of a qcow2 image laid out as
qemu-img 7.2 lays it out (iotest 125's sizes): the cluster the old end cuts
through moves into the new run, after a new refcount table; the file is
qemu-img's byte for byte, with the same guest map and the same allocated
bytes (FIEMAP), so a host-size check sees no extra extent."""
from __future__ import annotations

import pytest

from conftest import data_bytes
from qemu_oracle import check_clean, qemu_img, qemu_io
from test_parity_invocation import same, twins  # noqa: F401  (fixture)

CREATION = 2 * 1024 * 1024 - 48 * 1024


def _map(p):
    return qemu_img("map", "--output=json", p).stdout


@pytest.mark.parametrize("cluster", ["512", "64k"])
@pytest.mark.parametrize("growth,create_mode,mode", [
    ("16", "off", "falloc"), ("48", "metadata", "full"), ("80", "metadata", "falloc"),
    ("80", "full", "full"), ("16", "falloc", "falloc"), ("48", "off", "full")])
def test_grow_preallocated_as_qemu_img(twins, cluster, growth, create_mode, mode):
    ours, theirs = (d / "t.qcow2" for d in twins)
    for p in (ours, theirs):
        qemu_img("create", "-q", "-f", "qcow2", "-o",
                 f"preallocation={create_mode},cluster_size={cluster}", p, str(CREATION))
        qemu_io(p, f"write -P 7 {CREATION - 3000} 3000")   # the cut cluster holds data
    same(twins, "resize", "-f", "qcow2", f"--preallocation={mode}", "t.qcow2", f"+{growth}K")
    assert ours.read_bytes() == theirs.read_bytes()
    assert _map(ours) == _map(theirs)
    assert data_bytes(ours) == data_bytes(theirs)
    check_clean(ours)
    qemu_io(ours, f"read -P 7 {CREATION - 3000} 3000", f"read -P 0 {CREATION} {growth}k")
    before = data_bytes(ours)                      # writing the new area allocates nothing
    qemu_io(ours, f"write -P 1 {CREATION} {growth}k")
    assert data_bytes(ours) == before


@pytest.mark.parametrize("orig", ["31k", "33k"])
def test_grow_full_over_a_backing_file(twins, orig):
    """The moved cut cluster's head comes from the backing file (QEMU's
    copy-on-write), the rest reads zeroes."""
    ours, theirs = (d / "t.qcow2" for d in twins)
    for d in twins:
        qemu_img("create", "-q", "-f", "raw", d / "b.raw", "128k")
        qemu_io(d / "b.raw", "write -P 1 0 128k", fmt="raw")
        qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", "b.raw", "-o",
                 "cluster_size=64k", d / "t.qcow2", orig)
    same(twins, "resize", "-f", "qcow2", "--preallocation=full", "t.qcow2", "128k")
    assert ours.read_bytes() == theirs.read_bytes()
    assert _map(ours) == _map(theirs)
    qemu_io(ours, f"read -P 1 0 {orig}", f"read -P 0 {orig} 63k")
