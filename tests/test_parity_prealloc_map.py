"""A qcow2 image made with preallocation=metadata (qemu-iotests 250): QEMU
guesses so from its refcounts and the file's allocation, and then its block
status asks the file: preallocated clusters over file holes are zero (and
data), which ``qemu-img map`` leaves out of its human listing. A shrink
gives the clusters it frees back to the file system (QEMU discards them).
Byte for byte against the real qemu-img."""
from __future__ import annotations

from conftest import data_bytes
from qemu_oracle import qemu_img, qemu_io
from test_parity_invocation import same, twins  # noqa: F401  (twins: a fixture)


def _prealloc_image(d):
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=1M,preallocation=metadata",
             d / "t.qcow2", "2100M")
    qemu_io(d / "t.qcow2", "discard 0 10M", "discard 2090M 10M", "write 2090M 10M",
            "write 0 10M")


def test_map_of_metadata_preallocated_image(twins):
    for d in twins:
        _prealloc_image(d)
    out = same(twins, "map", "t.qcow2")[1]
    assert out.splitlines()[1:] == ["0               0xa00000        0x82f00000      t.qcow2",
                                    "0x82a00000      0xa00000        0x500000        t.qcow2"]
    out = same(twins, "map", "--output=json", "t.qcow2")[1]
    assert '"start": 10485760, "length": 2181038080, "depth": 0, "present": true, ' \
           '"zero": true, "data": true, "offset": 15728640}' in out
    same(twins, "map", "--output=json", "-s", "5M", "-l", "20M", "t.qcow2")


def test_map_of_plain_image_with_file_holes_is_data(twins):
    """Not preallocated (few clusters in use): no asking the file."""
    for d in twins:
        qemu_img("create", "-f", "qcow2", d / "p.qcow2", "4M")
        qemu_io(d / "p.qcow2", "write -z 0 64k", "write 1M 64k")
    same(twins, "map", "--output=json", "p.qcow2")
    same(twins, "map", "p.qcow2")


def test_shrink_gives_freed_clusters_back(twins):
    for d in twins:
        _prealloc_image(d)
    same(twins, "resize", "--shrink", "t.qcow2", "5M")
    ours, theirs = (d / "t.qcow2" for d in twins)
    assert data_bytes(ours) == data_bytes(theirs) == 3149824 + (1 << 20) + (5 << 20)
    same(twins, "map", "-f", "raw", "--output=json", "t.qcow2")
    same(twins, "check", "t.qcow2")
