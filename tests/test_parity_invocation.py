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
    p = subprocess.run([str(d / "bin" / "qemu-img"), *map(str, args)], cwd=d,
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PATH=f"{d / 'bin'}:{os.environ['PATH']}"))
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
    for rc, out, err in outs:
        assert (rc, err) == (0, "")
    a, b = (json.loads(o[1]) for o in outs)
    assert a.pop("actual-size") > 0 and b.pop("actual-size") > 0
    assert a == b
    same(twins, "map", "top2.qcow2", "--output=json")
