"""``create -o preallocation=falloc|full`` through a ``qemu-img`` symlink:
QEMU creates the image empty and then grows it with the mode (the same
code as blockdev-create), so the file is qemu-img's byte for byte, with the
same map, check and data allocation (FIEMAP)."""
from __future__ import annotations

import pytest

from conftest import data_bytes
from qemu_oracle import qemu_img
from test_parity_invocation import same, twins  # noqa: F401  (twins: a fixture)


@pytest.mark.parametrize("mode,opts,size", [
    ("falloc", "", "64M"),
    ("full", "", "40M"),
    ("falloc", ",cluster_size=4k", "40M"),          # many refcount blocks
    ("full", ",cluster_size=512", "4M"),
    ("falloc", ",extended_l2=on", "40M"),
    ("falloc", ",refcount_bits=1,cluster_size=1k", "20M"),
])
def test_create_preallocated_as_qemu_img(twins, mode, opts, size):
    same(twins, "create", "-f", "qcow2", "-o", f"preallocation={mode}{opts}", "t.qcow2", size)
    ours, theirs = (d / "t.qcow2" for d in twins)
    assert ours.read_bytes() == theirs.read_bytes()
    maps = [qemu_img("map", "--output=json", p).stdout for p in (ours, theirs)]
    assert maps[0] == maps[1]
    for p in (ours, theirs):
        assert qemu_img("check", p).returncode == 0
    assert data_bytes(ours) == data_bytes(theirs) >= ours.stat().st_size - (1 << 20)
