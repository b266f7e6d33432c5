"""``convert SRC1 SRC2 ... DST``: the sources concatenated, as qemu-img does
(qemu-iotests 122): the same target contents (qemu-img compare), the same
allocation (qemu-img map), the same refusals, byte for byte."""
from __future__ import annotations

import json

from qemu_oracle import check_clean, qemu_img, qemu_io
from test_parity_invocation import same, twins  # noqa: F401  (twins: a fixture)


def _sources(twins, size="4M", opts=(), writes=("write -P 0x11 0 64k", "write -P 0x22 0 64k",
                                                "write -P 0x33 0 64k")):
    for d in twins:
        for i, w in enumerate(writes, 1):
            img = d / f"t.qcow2.{i}"
            qemu_img("create", "-q", "-f", "qcow2", *opts, img, size)
            for cmd in w.split(";"):
                qemu_io(img, cmd)
    return [f"t.qcow2.{i}" for i in range(1, len(writes) + 1)]


def _same_image(twins, name, fmt="qcow2"):
    a, b = (d / name for d in twins)
    assert qemu_img("compare", "-f", fmt, "-F", fmt, a, b).returncode == 0
    if fmt == "qcow2":
        check_clean(a)
    maps = [qemu_img("map", "--output=json", "-f", fmt, p).stdout for p in (a, b)]
    strip = [[{k: v for k, v in e.items() if k != "offset"} for e in json.loads(m)]
             for m in maps]
    assert strip[0] == strip[1]


def test_concatenate_into_qcow2_and_raw(twins):
    srcs = _sources(twins)
    for args, name, fmt in ((["-O", "qcow2"], "t.qcow2", "qcow2"),
                            (["-c", "-O", "qcow2"], "c.qcow2", "qcow2"),
                            (["-O", "raw"], "t.raw", "raw")):
        assert same(twins, "convert", *args, *srcs, name) == (0, "", "")
        _same_image(twins, name, fmt)
    info = qemu_img("info", "--output=json", twins[0] / "t.qcow2").stdout
    assert '"virtual-size": 12582912' in info
    for off, p in ((0, "0x11"), (4 << 20, "0x22"), (8 << 20, "0x33")):
        r = qemu_io(twins[0] / "c.qcow2", f"read -P {p} {off} 64k")
        assert "read 65536/65536" in r.stdout


def test_compressed_concatenation_of_misaligned_sizes(twins):
    srcs = _sources(twins, "1023k", ("-o", "cluster_size=1024"),
                    ("write -P 0x11 16k 16k;write -P 0x22 130k 130k;write -P 0x33 1022k 1k",
                     "write -P 0x44 0k 1k"))
    assert same(twins, "convert", "-c", "-O", "qcow2", *srcs, "t.qcow2") == (0, "", "")
    _same_image(twins, "t.qcow2")


def test_concatenate_into_an_existing_target(twins):
    srcs = _sources(twins)
    for d in twins:
        qemu_img("create", "-q", "-f", "qcow2", d / "n.qcow2", "12M")
        qemu_io(d / "n.qcow2", "write -P 0x55 0 12M")
    assert same(twins, "convert", "-n", "-O", "qcow2", *srcs, "n.qcow2") == (0, "", "")
    _same_image(twins, "n.qcow2")


def test_concatenation_refusals(twins):
    srcs = _sources(twins)
    for args in (["-B", "t.qcow2.1"], ["-c", "-B", "t.qcow2.1"]):
        assert same(twins, "convert", "-O", "qcow2", *args, *srcs, "t.qcow2") == (
            1, "", "qemu-img: Having a backing file for the target makes no sense when "
            "concatenating multiple input images\n")
    for d in twins:
        qemu_img("create", "-q", "-f", "qcow2", d / "o.qcow2", "4M")
    assert same(twins, "convert", "-O", "qcow2", "-o", "preallocation=metadata", "-n",
                "t.qcow2.1", "o.qcow2") == (
        1, "", "qemu-img: -o has no effect when skipping image creation\n")
    assert not any((d / "t.qcow2").exists() for d in twins)


def test_compressed_with_s0_stores_every_cluster(twins):
    for d in twins:
        qemu_img("create", "-q", "-f", "qcow2", d / "t.qcow2", "8M")
        qemu_io(d / "t.qcow2", "write -P 0x22 0 3M", "write -P 0 3M 3M")
    assert same(twins, "convert", "-O", "qcow2", "-c", "-S", "0", "t.qcow2", "o.qcow2") == (
        0, "", "")
    _same_image(twins, "o.qcow2")
    assert qemu_img("map", "--output=json", twins[0] / "o.qcow2").stdout == (
        '[{ "start": 0, "length": 8388608, "depth": 0, "present": true, "zero": false, '
        '"data": true}]\n')
