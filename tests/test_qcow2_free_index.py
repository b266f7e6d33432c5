"""Free clusters an image holds when it is opened are taken first, lowest
first, as QEMU's free cluster index takes them (it starts at cluster 0 in
each session): a ``convert -n`` into a qcow2 image whose clusters another
session freed (qemu-io discard, zero writes with unmap) lays out the new
clusters as qemu-img 7.2 does, byte for byte (``cmp``), blkjobs installed
as ``qemu-img``. A free run that reaches the end of the file is where
QEMU's run starts even when it is too short: the run goes on past the end
(src/blkjobs/formats/qcow2/refcount.py)."""
from __future__ import annotations

import pytest

from qemu_oracle import qemu_img, qemu_io
from test_parity_invocation import run, twins  # noqa: F401  (the fixture: twin dirs)


@pytest.mark.parametrize("free", ["discard 1M 2M", "discard 4M 2M", "discard 0 1M",
                                  "discard 2M 512k", "write -z -u 1M 3M", "discard 5M 1M"])
def test_convert_n_fills_the_freed_clusters_as_qemu_img(twins, free):
    for d in twins:
        qemu_img("create", "-f", "raw", d / "s.raw", "8M")
        qemu_io(d / "s.raw", "write -P 1 0 6M", "write -P 2 6M 2M", fmt="raw")
        qemu_img("create", "-f", "qcow2", d / "t.qcow2", "8M")
        qemu_io(d / "t.qcow2", "write -P 1 0 6M")
        qemu_io(d / "t.qcow2", free)
    ours, theirs = (run(d, "convert", "-n", "-f", "raw", "-O", "qcow2", "s.raw", "t.qcow2")
                    for d in twins)
    assert ours == theirs == (0, "", "")
    a, b = ((d / "t.qcow2").read_bytes() for d in twins)
    assert len(a) == len(b) and a == b
    for d in twins:
        p = qemu_img("check", d / "t.qcow2")
        assert p.returncode == 0, p.stdout
