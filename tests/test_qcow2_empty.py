"""formats.qcow2.empty: emptying a committed overlay in place (what
``qemu-img commit`` does to the top image), with qemu-img as the oracle."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from blkjobs.formats.qcow2 import empty as empty_mod
from blkjobs.formats.qcow2.create import Layout
from blkjobs.formats.qcow2.empty import make_empty
from conftest import run_blkjobs
from qemu_oracle import check_clean, qemu_img, qemu_info, qemu_io, qemu_map

MiB = 1 << 20


def overlay(tmp_path, opts="", size=8 * MiB):
    """base (data everywhere) <- top (data, zeroes, a discard) made by qemu."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", base, size)
    qemu_io(base, f"write -P 0x11 0 {size}")
    args = ["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2"]
    if opts:
        args += ["-o", opts]
    qemu_img(*args, top, size)
    qemu_io(top, "write -P 0x22 0 1M", "write -P 0x33 3M 640k", "write -z 5M 1M",
            "write -P 0x44 7M 64k", "discard 7M 64k")
    return base, top


def header_view(path):
    info = qemu_info(path)
    spec = info.get("format-specific", {}).get("data", {})
    return (info["virtual-size"], info["cluster-size"], info.get("backing-filename"),
            info.get("backing-filename-format"), spec.get("compat"),
            spec.get("extended-l2"), spec.get("refcount-bits"))


@pytest.mark.parametrize("opts", ["", "cluster_size=4096", "extended_l2=on",
                                  "compat=0.10", "cluster_size=512,refcount_bits=64",
                                  "refcount_bits=1"])
def test_in_place_empties_and_keeps_everything_else(tmp_path, opts):
    base, top = overlay(tmp_path, opts)
    before = header_view(top)
    cs = before[1]
    head = top.read_bytes()[:cs]
    ino = os.stat(top).st_ino
    assert make_empty(str(top)) is True
    assert os.stat(top).st_ino == ino                     # the same file
    assert header_view(top) == before                     # size, clusters, backing, ...
    assert top.read_bytes()[:cs] == head                   # cluster 0 untouched
    check_clean(top)
    assert all(m["depth"] >= 1 for m in qemu_map(top))     # nothing allocated in top
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", top, base)
    info = qemu_info(top)
    lay = Layout(info["virtual-size"], cs,
                 cs // (16 if before[5] else 8), before[6] or 16)
    assert os.path.getsize(top) == lay.end                 # the data is freed


def test_commit_cli_empties_in_place(tmp_path):
    base, top = overlay(tmp_path)
    view = tmp_path / "view.raw"
    qemu_img("convert", "-O", "raw", top, view)
    ino = os.stat(top).st_ino
    p = run_blkjobs("commit", top)
    assert p.returncode == 0, p.stderr
    assert os.stat(top).st_ino == ino
    check_clean(top)
    check_clean(base)
    assert all(m["depth"] >= 1 for m in qemu_map(top))
    qemu_img("compare", "-f", "raw", "-F", "qcow2", view, top)
    assert json.loads(qemu_img("info", "--output", "json", top).stdout)[
        "backing-filename"] == "base.qcow2"


def test_moved_tables_are_left_to_the_caller(tmp_path):
    """A resize moves the L1 table: not the standard layout -> False, file
    untouched; the CLI then re-creates the image (still empty, same link)."""
    base, top = overlay(tmp_path)
    qemu_img("resize", top, "+2G")
    qemu_img("resize", base, "+2G")
    data = top.read_bytes()
    assert make_empty(str(top)) is False
    assert top.read_bytes() == data
    p = run_blkjobs("commit", top)
    assert p.returncode == 0, p.stderr
    check_clean(top)
    assert all(m["depth"] >= 1 for m in qemu_map(top))
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", top, base)


def test_dirty_image_is_left_to_the_caller(tmp_path):
    _, top = overlay(tmp_path)
    with open(top, "r+b") as f:                 # incompatible features: dirty bit
        f.seek(72 + 7)
        f.write(b"\x01")
    data = top.read_bytes()
    assert make_empty(str(top)) is False
    assert top.read_bytes() == data


@pytest.mark.parametrize("crash_at", [1, 2, 3, 4])
def test_interrupted_emptying_leaves_a_consistent_image(tmp_path, monkeypatch, crash_at):
    """Stopped at any barrier (the k-th fsync never returns), the image is
    consistent: at worst leaked clusters, no corruption; it reads through
    (the first barrier only marks it dirty: it still reads as before)."""
    base, top = overlay(tmp_path)
    keep = tmp_path / "keep.qcow2"
    shutil.copy(top, keep)
    calls = []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == crash_at:
            raise OSError(5, "simulated crash")

    monkeypatch.setattr(empty_mod.os, "fsync", fsync)
    with pytest.raises(OSError):
        make_empty(str(top))
    p = qemu_img("check", "--output", "json", top, check=False)
    res = json.loads(p.stdout)
    assert p.returncode in (0, 3) and not res.get("corruptions"), res
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", top, keep if crash_at == 1 else base)


def test_commit_cli_empties_under_qemu_lock_bytes(tmp_path):
    """The CLI's emptying holds QEMU's lock bytes: another user that does
    not share write (as a VM reading the image would) makes it fail with
    qemu's message, and the image is not touched."""
    from blkjobs.cli.cmd_commit import make_empty as cli_make_empty
    from blkjobs.graph.lock import FileLock
    from blkjobs.graph.perm import Perm, PermissionConflict
    _, top = overlay(tmp_path)
    before = open(top, "rb").read()
    fd = os.open(top, os.O_RDONLY)
    other = FileLock(fd, str(top))
    other.apply(Perm.CONSISTENT_READ, Perm.WRITE)
    try:
        with pytest.raises(PermissionConflict, match=r"^Failed to get \"write\" lock\n"
                                                     r"Is another process using the image "
                                                     r"\[.*top\.qcow2\]\?$"):
            cli_make_empty(str(top), "qcow2")
    finally:
        other.release()
        os.close(fd)
    assert open(top, "rb").read() == before
    cli_make_empty(str(top), "qcow2")                 # free again: emptied
    assert not any(r["data"] and r["depth"] == 0 for r in qemu_map(top))
