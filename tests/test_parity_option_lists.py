"""qemu-img's ``-o`` option lists and the formats it knows but cannot
create (qemu-iotests 082 and 113): blkjobs installed as ``qemu-img`` and the
real qemu-img, run on the same command lines, print the same, exit the same
and leave the same images."""
from __future__ import annotations

import json

import pytest

from qemu_oracle import qemu_img
from test_parity_invocation import run, same, twins  # noqa: F401  (twins: a fixture)


def _backing(d, name):
    info = json.loads(qemu_img("info", "-U", "--output", "json", d / name).stdout)
    return info.get("backing-filename"), info.get("backing-filename-format")


@pytest.mark.parametrize("opts", [
    ["-u", "-o", "backing_file=t.qcow2,,help", "-F", "qcow2"],     # one value: "t.qcow2,help"
    ["-u", "-o", "backing_file=t.qcow2,,?", "-F", "qcow2"],
    ["-u", "-o", "backing_file=a,,,,b,,", "-F", "qcow2"],          # "a,,b,"
])
def test_create_escaped_comma_is_no_help(twins, opts):
    rc, out, _ = same(twins, "create", "-f", "qcow2", *opts, "t.qcow2", "128M")
    assert rc == 0 and out.startswith("Formatting 't.qcow2'")
    assert _backing(twins[0], "t.qcow2") == _backing(twins[1], "t.qcow2")
    assert _backing(twins[0], "t.qcow2")[0] in ("t.qcow2,help", "t.qcow2,?", "a,,b,")


@pytest.mark.parametrize("cmd", ["create", "convert"])
@pytest.mark.parametrize("opts", [
    ["-o", "backing_file=t.qcow2,", "-o", "help"],       # odd trailing commas
    ["-o", "backing_file=t.qcow2", "-o", ",help"],       # a leading comma
    ["-o", "backing_file=t.qcow2", "-o", ",,", "-o", "help"],
    ["-o", "", "-o", "help"],                            # empty
    ["-o", "help", "-o", "x,"],                          # help first: still refused
])
def test_invalid_option_list_refused_before_help(twins, cmd, opts):
    for d in twins:
        qemu_img("create", "-f", "qcow2", d / "t.qcow2", "1M")
    tail = ["t.qcow2", "t.qcow2.base"] if cmd == "convert" else ["t.qcow2", "128M"]
    rc, out, err = same(twins, cmd, "-f", "qcow2", *opts, *tail) if cmd == "create" else \
        same(twins, cmd, "-O", "qcow2", *opts, *tail)
    assert (rc, out) == (1, "") and err.startswith("qemu-img: Invalid option list: ")


def test_amend_option_lists(twins):
    for d in twins:
        qemu_img("create", "-f", "qcow2", d / "t.qcow2", "1M")
    for opts in (["-o", "backing_file=t.qcow2,,help"], ["-o", "backing_file=t.qcow2,,?"],
                 ["-o", "backing_file=t.qcow2,", "-o", "help"],
                 ["-o", "backing_file=t.qcow2", "-o", ",help"],
                 ["-o", "backing_file=t.qcow2", "-o", ",,", "-o", "help"]):
        rc, out, err = same(twins, "amend", "-f", "qcow2", *opts, "t.qcow2")
        assert rc == 1 and out == "" and err
    for fmt in ("bochs", "raw", "vmdk", "nosuch"):
        rc, _, err = same(twins, "amend", "-f", fmt, "-o", "help")
        assert rc == 1 and err.count("\n") == 1


def test_convert_escaped_comma_in_backing_file(twins):
    """``backing_file=t.qcow2,,help`` names a file ``t.qcow2,help`` (none here)."""
    for d in twins:
        qemu_img("create", "-f", "qcow2", d / "t.qcow2", "1M")
    rc, out, err = same(twins, "convert", "-O", "qcow2", "-o",
                        "backing_fmt=qcow2,backing_file=t.qcow2,,help", "t.qcow2", "b.qcow2")
    assert (rc, out) == (1, "") and "'t.qcow2,help': No such file" in err
    for d in twins:
        qemu_img("create", "-f", "raw", d / "notq", "1M")
    rc, _, err = same(twins, "convert", "-O", "qcow2", "-B", "notq", "-F", "qcow2", "t.qcow2",
                      "c.qcow2")
    assert rc == 1 and err.endswith("Could not open backing file: Image is not in qcow2 format\n")
    assert not (twins[0] / "b.qcow2").exists() and not (twins[0] / "c.qcow2").exists()


@pytest.mark.parametrize("args", [
    ["create", "-f", "bochs", "nbd://example.com", "64M"],
    ["create", "-f", "cloop", "x", "1M"],
    ["create", "-f", "vvfat", "x", "1M"],
    ["create", "-f", "nosuch", "x", "1M"],
    ["create", "-f", "bochs", "foo:bar", "1M"],         # an unknown protocol comes first
    ["create", "-f", "nosuch", "foo:bar", "1M"],
    ["create", "-f", "bochs", "-o", "help"],
    ["create", "-f", "bochs", "-o", "help", "x"],
    ["convert", "-O", "bochs", "-o", "help"],
    ["convert", "-O", "bochs", "src.raw", "nbd://example.com"],
    ["convert", "-O", "dmg", "nosuch.raw", "x"],        # the source is opened first
    ["convert", "-O", "nosuch", "src.raw", "x"],
])
def test_format_without_image_creation(twins, args):
    for d in twins:
        qemu_img("create", "-f", "raw", d / "src.raw", "1M")
    rc, out, err = same(twins, *args)
    assert (rc, out) == (1, "") and err.count("\n") == 1
    assert not (twins[0] / "x").exists()
