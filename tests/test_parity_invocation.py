"""blkjobs installed as qemu-img (a symlink named ``qemu-img``), as
qemu-iotests run it: the same command lines as the real qemu-img give the
same exit status, stdout and stderr byte for byte, and the same images
(qemu-img info/compare). What scripts/iotests found different."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import data_bytes
from qemu_oracle import qemu_img


@pytest.fixture
def twins(tmp_path):
    """(ours, theirs): two directories, each with a `qemu-img` to run there
    (ours: a symlink to blkjobs; theirs: the real one)."""
    exe = Path(sys.executable).parent / "blkjobs"
    assert exe.exists(), exe
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for d in (ours, theirs):
        (d / "bin").mkdir(parents=True)
    (ours / "bin" / "qemu-img").symlink_to(exe)
    (theirs / "bin" / "qemu-img").symlink_to(shutil.which("qemu-img") or "/usr/bin/qemu-img")
    return ours, theirs


def run(d: Path, *args):
    # Run again when QEMU's PBKDF2 timing (a LUKS command's iter-time) says
    # "Unable to get accurate CPU usage": its getrusage() saw no time pass,
    # on a busy machine; the oracle's hiccup, not an answer (tests/test_luks.py)
    for _ in range(5):
        p = subprocess.run([str(d / "bin" / "qemu-img"), *map(str, args)], cwd=d,
                           capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, PATH=f"{d / 'bin'}:{os.environ['PATH']}"))
        if "Unable to get accurate CPU usage" not in p.stderr:
            break
    assert "Traceback" not in p.stderr, p.stderr
    return p.returncode, p.stdout, p.stderr


def same(twins, *args):
    """Run ``qemu-img ARGS`` as both; the same exit, stdout and stderr."""
    ours, theirs = (run(d, *args) for d in twins)
    assert ours == theirs, args
    return ours


def test_prefix_is_the_invoked_name(twins):
    """Errors start with `qemu-img:` when blkjobs is invoked as qemu-img,
    including the continuation lines of a two-line message."""
    for d in twins:
        qemu_img("create", "-f", "qcow2", d / "b.qcow2", "1M")
    same(twins, "bitmap", "--add", "-g", "3x", "b.qcow2", "bm")
    same(twins, "resize", "b.qcow2", "1k")


def test_usage_error_names_the_invoked_name(twins):
    assert run(twins[0], "info")[2].startswith("qemu-img info: ")


def test_options_after_operands(twins):
    """qemu-img's getopt permutes arguments: options may follow the operands."""
    for d in twins:
        qemu_img("create", "-f", "qcow2", d / "base.qcow2", "1M")
    same(twins, "create", "-f", "qcow2", "-b", "base.qcow2", "top.qcow2", "-F", "qcow2", "1M")
    same(twins, "create", "top2.qcow2", "-f", "qcow2", "2M", "-o", "cluster_size=4k")
    infos = [json.loads(qemu_img("info", "--output", "json", d / f).stdout)
             for d in twins for f in ("top.qcow2", "top2.qcow2")]
    for info in infos:
        info.pop("filename")
        info.pop("actual-size")
        info.pop("full-backing-filename", None)
    assert infos[0] == infos[2] and infos[1] == infos[3]
    outs = [run(d, "info", "top.qcow2", "--output", "json", "-U") for d in twins]
    for rc, _out, err in outs:
        assert (rc, err) == (0, "")
    a, b = (json.loads(o[1]) for o in outs)
    assert a.pop("actual-size") > 0 and b.pop("actual-size") > 0
    assert a == b
    same(twins, "map", "top2.qcow2", "--output=json")


@pytest.mark.parametrize("size", ["12Q", "1.5", "10GB", "1e3", "99999999999E"])
def test_create_size_errors(twins, size):
    same(twins, "create", "-f", "qcow2", "x.qcow2", size)
    same(twins, "create", "-f", "raw", "x.raw", size)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_create_rounds_size_to_sectors(twins, fmt):
    """`create IMG 1234` says size=1234 and makes a 1536-byte image."""
    same(twins, "create", "-f", fmt, f"x.{fmt}", "1234")
    infos = [json.loads(qemu_img("info", "--output", "json", d / f"x.{fmt}").stdout)
             for d in twins]
    assert infos[0]["virtual-size"] == infos[1]["virtual-size"] == 1536
    if fmt == "raw":
        assert [os.path.getsize(d / "x.raw") for d in twins] == [1536, 1536]


@pytest.mark.parametrize("size", ["100", "5000", "1M"])
def test_create_raw_allocates_the_first_block(twins, size):
    """QEMU's file driver writes the first block of a new file (512 bytes
    below 4 KiB, else 4 KiB): `map` of a fresh raw image shows it as data
    (iotests 150, 253)."""
    same(twins, "create", "-f", "raw", "x.raw", size)
    maps = [qemu_img("map", "--output", "json", d / "x.raw").stdout for d in twins]
    assert maps[0] == maps[1]


@pytest.mark.parametrize("opts", [
    "lazy_refcounts=on", "compression_type=zstd", "lazy_refcounts=on,compression_type=zstd",
    "extent_size_hint=1M", "compat=0.10,refcount_bits=16,extent_size_hint=0",
    "cluster_size=4k,preallocation=metadata,lazy_refcounts=off"])
def test_create_qcow2_options(twins, opts):
    """Same Formatting line and the same image (qemu-img info, check, compare)."""
    same(twins, "create", "-f", "qcow2", "-o", opts, "x.qcow2", "1M")
    ours, theirs = (json.loads(qemu_img("info", "--output", "json", d / "x.qcow2").stdout)
                    for d in twins)
    for info in (ours, theirs):
        info.pop("filename")
        info.pop("actual-size")
    assert ours == theirs
    qemu_img("check", twins[0] / "x.qcow2")
    qemu_img("compare", twins[0] / "x.qcow2", twins[1] / "x.qcow2")


def test_create_raw_extent_size_hint(twins):
    same(twins, "create", "-f", "raw", "-o", "preallocation=off,extent_size_hint=4k", "x.raw",
         "1M")


def test_create_data_file(twins):
    """An external data file, as qemu-img makes it (tests/test_qcow2_datafile.py)."""
    same(twins, "create", "-f", "qcow2", "-o", "data_file=d.raw", "x.qcow2", "1M")
    for name in ("x.qcow2", "d.raw"):
        assert (twins[0] / name).read_bytes() == (twins[1] / name).read_bytes()


@pytest.mark.parametrize("cmd", [["info"], ["check"], ["map"], ["convert", "-O", "raw"],
                                 ["compare", "missing"]])
def test_missing_image_text(twins, cmd):
    """qemu-img names the image, then the file layer's own failed open."""
    args = [*cmd, "missing"] if cmd[0] != "convert" else [*cmd, "missing", "out.raw"]
    same(twins, *args)


@pytest.mark.parametrize("opts", [
    "cluster_size=1234", "cluster_size=256", "cluster_size=4M", "refcount_bits=3",
    "refcount_bits=128", "compat=0.10,refcount_bits=8", "compat=0.42",
    "compat=0.10,lazy_refcounts=on", "compat=0.10,compression_type=zstd",
    "extended_l2=on,cluster_size=4k", "extended_l2=on,compat=0.10",
    "cluster_size=512,refcount_bits=64"])
def test_create_qcow2_refusals(twins, opts):
    """The Formatting line, then qemu-img's refusal naming the image."""
    same(twins, "create", "-f", "qcow2", "-o", opts, "z.qcow2", "1M")


def test_create_backing_with_preallocation_refused(twins):
    for d in twins:
        qemu_img("create", "-f", "qcow2", d / "base.qcow2", "1M")
    same(twins, "create", "-f", "qcow2", "-o", "preallocation=metadata", "-b", "base.qcow2",
         "-F", "qcow2", "z.qcow2", "1M")


@pytest.mark.parametrize("mode", ["full", "falloc", "off", "metadata", "foo"])
def test_create_raw_preallocation(twins, mode):
    """full writes every block (as qemu-img: the same blocks in use); the
    modes raw has not are refused naming the image."""
    same(twins, "create", "-f", "raw", "-o", f"preallocation={mode}", "x.raw", "3M")
    if mode in ("full", "falloc"):
        used = [data_bytes(d / "x.raw") for d in twins]
        assert used[0] == used[1] >= 3 << 20


def test_backing_chain_loop_text(twins):
    """A chain that comes back to a file it went through."""
    for d in twins:
        qemu_img("create", "-f", "qcow2", d / "a.qcow2", "1M")
        qemu_img("create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", d / "b.qcow2")
        qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", d / "a.qcow2")
        qemu_img("create", "-f", "qcow2", d / "s.qcow2", "1M")
        qemu_img("rebase", "-u", "-b", "s.qcow2", "-F", "qcow2", d / "s.qcow2")
    same(twins, "info", "--backing-chain", "b.qcow2")
    same(twins, "info", "--backing-chain", "s.qcow2")
