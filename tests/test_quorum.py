"""The read-only ``quorum`` driver (formats.quorum) as qemu-img opens one
(iotest 110): a qcow2 image over a quorum of file children, with the real
qemu-img as the oracle, byte for byte."""
from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from blkjobs.units import human
from qemu_oracle import qemu_img, qemu_io
from test_parity_invocation import run, same, twins  # noqa: F401  (twins: a fixture)


def quorum(threshold, *files, fmt="qcow2", extra=""):
    kids = ",".join(f"{{'driver':'file','filename':'{f}'}}" for f in files)
    opts = f"'vote-threshold':{threshold}," if threshold is not None else ""
    return (f"json:{{'driver':'{fmt}','file':{{'driver':'quorum',{opts}"
            f"'children':[{kids}]{extra}}}}}")


def same_info(twins, *args, files=("t.qcow2", "t.qcow2.copy")):
    """``same`` for an ``info`` of a quorum: the same output but for the
    disk size, which each side must report as its own children's allocation
    together (st_blocks). On ext4 the twins' files, made by the same
    commands, may still differ by an extent-tree block (4 KiB) when their
    clusters landed in more pieces on one side: seen in CI under load."""
    outs = []
    for d in twins:
        rc, out, err = run(d, *args)
        if rc == 0 and "\ndisk size: " in out:
            want = sum(os.stat(d / f).st_blocks * 512 for f in files)
            line = re.search(r"\ndisk size: ([^\n]*)\n", out).group(1)
            assert line == human(want), (d, line, want)
            out = out.replace(f"\ndisk size: {line}\n", "\ndisk size: N\n")
        if rc == 0 and '"actual-size": ' in out:
            got = json.loads(out)["actual-size"]
            assert got == sum(os.stat(d / f).st_blocks * 512 for f in files), (d, got)
            out = re.sub(r'"actual-size": \d+', '"actual-size": 0', out)
        outs.append((rc, out, err))
    assert outs[0] == outs[1], args
    return outs[0]


def cp(src, dst):
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)


@pytest.fixture
def images(twins):
    """In each twin: the same base <- t.qcow2 (made by the same commands, so
    the same bytes and the same allocation), t.qcow2.copy and an unrelated
    other.qcow2."""
    for d in twins:
        qemu_img("create", "-f", "qcow2", d / "t.qcow2.base", "64M")
        qemu_img("create", "-f", "qcow2", "-b", "t.qcow2.base", "-F", "qcow2",
                 d / "t.qcow2", "64M")
        qemu_io(d / "t.qcow2", "write -P 0x5a 0 64k")
        cp(d / "t.qcow2", d / "t.qcow2.copy")
        qemu_img("create", "-f", "qcow2", d / "other.qcow2", "64M")
    return twins


def test_info_of_a_qcow2_over_a_quorum(images):
    """110's last case: the json: name with the children as a list, the
    children's disk size together, a backing file whose path cannot be
    determined."""
    rc, out, err = same_info(images, "info", quorum(1, "t.qcow2", "t.qcow2.copy"))
    assert (rc, err) == (0, "")
    assert out.startswith(
        'image: json:{"driver": "qcow2", "file": {"children": [{"driver": "file", '
        '"filename": "t.qcow2"}, {"driver": "file", "filename": "t.qcow2.copy"}], '
        '"driver": "quorum", "vote-threshold": 1}}\nfile format: qcow2\n'
        'virtual size: 64 MiB (67108864 bytes)\n')
    assert "\nbacking file: t.qcow2.base (cannot determine actual path)\n" in out
    rc, out, err = same_info(images, "info", "--output=json",
                             quorum(1, "t.qcow2", "t.qcow2.copy"))
    info = json.loads(out)
    assert "full-backing-filename" not in info and info["backing-filename"] == "t.qcow2.base"


@pytest.mark.parametrize("threshold,files,extra", [
    (None, ("t.qcow2", "t.qcow2.copy"), ""),
    (0, ("t.qcow2", "t.qcow2.copy"), ""),
    (3, ("t.qcow2", "t.qcow2.copy"), ""),
    (1, (), ""),
    (1, ("t.qcow2", "t.qcow2.copy"), ",'read-pattern':'bogus'"),
    (1, ("t.qcow2", "t.qcow2.copy"), ",'blkverify':true"),
    (1, ("t.qcow2", "t.qcow2.copy"), ",'bogus':1"),
    (1, ("t.qcow2", "t.qcow2.copy"), ",'read-pattern':'fifo'"),
])
def test_options_checked_as_qemu_img_does(images, threshold, files, extra):
    p = same_info(images, "info", quorum(threshold, *files, extra=extra), files=files)
    assert p[0] == (0 if "fifo" in extra else 1)


def test_children_of_different_sizes(images):
    assert same(images, "info", quorum(1, "t.qcow2", "other.qcow2")) == (
        1, "", f"qemu-img: Could not open '{quorum(1, 't.qcow2', 'other.qcow2')}': Could not "
               "refresh total sector count: Input/output error\n")


def test_relative_backing_file_cannot_be_opened(images):
    assert same(images, "convert", "-O", "raw", quorum(1, "t.qcow2", "t.qcow2.copy"),
                "out.raw")[0] == 1


def test_children_that_disagree(images):
    """No whole-contents winner: refused in one line (QEMU would vote per
    request); a winner with the threshold: the image reads as the winner
    (a corrupt minority child outvoted)."""
    ours = images[0]
    for d in images:        # same size as t.qcow2, other bytes
        qemu_img("create", "-f", "qcow2", "-b", "other.qcow2", "-F", "qcow2", d / "o2.qcow2",
                 "64M")
        qemu_io(d / "o2.qcow2", "write -P 0x33 0 64k")
    rc, out, err = run(ours, "info", quorum(2, "t.qcow2", "o2.qcow2"))
    assert (rc, out) == (1, "")
    assert err.endswith("': quorum: no version of the children's contents has 2 vote(s) "
                        "(blkjobs votes once on each child's whole contents, not per "
                        "request)\n")
    rc, out, err = run(ours, "info", quorum(1, "t.qcow2", "o2.qcow2"))   # a tie
    assert rc == 1 and "no version of the children's contents has 2 vote(s)" in err
    rc, out, err = same_info(images, "info", quorum(2, "o2.qcow2", "t.qcow2", "t.qcow2.copy"),
                             files=("o2.qcow2", "t.qcow2", "t.qcow2.copy"))
    assert rc == 0 and "backing file: t.qcow2.base (cannot" in out   # the two copies win
    cp(ours / "t.qcow2.base", ours / "b2")
    cp(ours / "t.qcow2.base", ours / "b3")
    with open(ours / "b3", "r+b") as f:     # a corrupt minority: its L1 entry points away
        f.seek(-8, 2)
        f.write(b"\0\0\0\0\0\x05\0\0")
    p = run(ours, "compare", quorum(2, "t.qcow2.base", "b3", "b2"), "t.qcow2.base")
    assert p == (0, "Images are identical.\n", "")

def test_writes_are_refused(images):
    rc, out, err = run(images[0], "resize", quorum(1, "t.qcow2", "t.qcow2.copy"), "128M")
    assert (rc, out) == (1, "")
    assert err.endswith("': blkjobs opens a quorum read-only\n")
