"""``qemu-img measure``'s argument checks, byte for byte against the real
qemu-img (qemu-iotests 178's input validation): what it checks while
reading the options (``-o`` lists, ``-l`` parameters, ``--output``,
``--size``) comes before the operand checks, and ``-O`` is checked only
after the image opened."""
from __future__ import annotations

import pytest

from qemu_oracle import qemu_img, qemu_io
from test_parity_invocation import same, twins  # noqa: F401  (twins: a fixture)

BAD = [
    (),
    ("--size", "2G", "t.raw"),
    ("t.raw", "a"),
    ("--object", "secret,id=sec0,data=MTIzNDU2,format=base64"),
    ("--image-opts",),
    ("-f", "qcow2"),
    ("-l", "snap1"),
    ("-o", ","),
    ("-o", ""),
    ("-o", "a,,,"),
    ("-O", "foo", "-o", ","),
    ("-l", "snapshot.foo=bar"),
    ("--output", "foo"),
    ("--size", "-1"),
    ("-O", "foo", "t.raw"),
    ("-O", "foo", "nonexistent.raw"),
    ("-l", "snap1", "t.raw"),
    ("-l", "snapshot.name=x", "t.raw"),
    ("-o", "foo=bar", "-O", "qcow2", "t.raw"),
]


@pytest.mark.parametrize("args", BAD, ids=" ".join)
def test_measure_argument_errors(twins, args):
    for d in twins:
        qemu_img("create", "-f", "raw", d / "t.raw", "1G")
    rc, out, _err = same(twins, "measure", *args)
    assert rc == 1 and out == ""


def test_measure_internal_snapshot(twins):
    """-l: the snapshot's data is measured, not the image's current data."""
    for d in twins:
        qemu_img("create", "-f", "qcow2", d / "s.qcow2", "64M")
        qemu_img("snapshot", "-c", "snap1", d / "s.qcow2")
    for d in twins:
        qemu_io(d / "s.qcow2", "write 0 8M")
    now = same(twins, "measure", "-O", "qcow2", "s.qcow2")
    for arg in ("snap1", "snapshot.name=snap1", "snapshot.id=1"):
        snap = same(twins, "measure", "-O", "qcow2", "--output=json", "-l", arg, "s.qcow2")
        assert snap[0] == 0 and snap[1] != now[1]
