"""measure, resize, snapshot, amend, dd: each against qemu-img's own output
(text byte for byte, with our program name as the prefix; images by
qemu-img check/compare/map)."""
from __future__ import annotations

import json
import random
import subprocess

import pytest

from conftest import run_blkjobs
from qemu_oracle import check_clean, qemu_img, qemu_io, qemu_map


def _ours(cwd, args):
    import sys
    p = subprocess.run([sys.executable, "-m", "blkjobs", *map(str, args)], capture_output=True,
                       text=True, cwd=cwd, timeout=300)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def _theirs(cwd, args):
    p = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                       timeout=300)
    err = "".join(("blkjobs:" + ln[len("qemu-img:"):]) if ln.startswith("qemu-img:") else ln
                  for ln in p.stderr.splitlines(True))
    return p.returncode, p.stdout, err


def same(cwd, *args):
    """Run ``blkjobs ARGS`` and ``qemu-img ARGS`` in ``cwd``: same exit
    status, stdout and stderr (prefix ours). Returns our stdout."""
    ours = _ours(cwd, args)
    assert (ours.returncode, ours.stdout, ours.stderr) == _theirs(cwd, args), args
    return ours.stdout


# ---------------------------------------------------------------------------
# measure

@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("measure")
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4k", d / "s1.qcow2", "100M")
    qemu_io(d / "s1.qcow2", "write -P 1 0 100k", "write -P 2 5M 1k", "write -z 10M 1M",
            "write -P 3 50M 3M")
    qemu_img("create", "-f", "qcow2", "-b", "s1.qcow2", "-F", "qcow2", d / "s2.qcow2")
    qemu_io(d / "s2.qcow2", "write -P 4 70M 100k", "write -z 0 64k")
    rnd = random.Random(3)
    with open(d / "s3.raw", "wb") as f:
        f.truncate((33 << 20) + 512)
        for _ in range(40):
            f.seek(rnd.randrange(0, 33 << 20))
            f.write(rnd.randbytes(rnd.randrange(1, 200000)))
    (d / "empty.raw").write_bytes(b"")
    qemu_img("create", "-f", "qcow2", d / "bm.qcow2", "1G")
    qemu_img("bitmap", "--add", d / "bm.qcow2", "b0")
    qemu_img("bitmap", "--add", "-g", "512", d / "bm.qcow2", "a-much-longer-bitmap-name")
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", d / "v2.qcow2", "5M")
    return d


SOURCES = ["-f qcow2 s1.qcow2", "-f qcow2 s2.qcow2", "-f raw s3.raw", "s3.raw", "empty.raw",
           "bm.qcow2", "v2.qcow2", "--size 0", "--size 1", "--size 511", "--size 10G",
           "--size 3T", "--size 65537"]
TARGET_OPTS = ["", "-o cluster_size=512", "-o cluster_size=4k", "-o cluster_size=2M",
               "-o cluster_size=16k,extended_l2=on", "-o refcount_bits=1",
               "-o refcount_bits=64,cluster_size=1k", "-o compat=0.10",
               "-o preallocation=full", "-o preallocation=metadata", "-o backing_file=x"]


@pytest.mark.parametrize("src", SOURCES)
def test_measure_qcow2_numbers_equal_qemu_img(sources, src):
    for i, opts in enumerate(TARGET_OPTS):
        out = "human" if i % 3 == 0 else "json"
        same(sources, "measure", "-O", "qcow2", *opts.split(), *src.split(), "--output", out)


@pytest.mark.parametrize("src", ["--size 1G", "--size 1000", "s3.raw", "-f qcow2 s2.qcow2",
                                 "empty.raw"])
def test_measure_raw_equals_qemu_img(sources, src):
    for out in ("human", "json"):
        same(sources, "measure", *src.split(), "--output", out)
        same(sources, "measure", "-O", "raw", "-o", "preallocation=full", *src.split(),
             "--output", out)


def test_measure_bitmaps_size_is_shown(sources):
    out = json.loads(same(sources, "measure", "-O", "qcow2", "bm.qcow2", "--output", "json"))
    assert out["bitmaps"] > 0


@pytest.mark.parametrize("args", [
    "", "--size 1G s3.raw", "s3.raw s1.qcow2", "-O qcow2 --size abc", "-O qcow2 --size -5",
    "-O qcow2 nonexist", "-O qcow2 --size 100T -o cluster_size=512",
    "-O qcow2 --size 1G -o cluster_size=3k", "-O qcow2 --size 1G -o cluster_size=abc",
    "-O qcow2 --size 1G -o refcount_bits=3", "-O qcow2 --size 1G -o refcount_bits=8,compat=0.10",
    "-O qcow2 --size 1G -o preallocation=bogus", "-O raw --size 1G -o cluster_size=4k",
    "-O qcow2 --size 1G -o extended_l2=on,cluster_size=4k",
    "-O qcow2 --size 1G -o extended_l2=maybe", "-O qcow2 --size 1G -o foo=1",
    "-O qcow2 --size 1G -o compat=1.5", "-O qcow2 --size 1G --output=foo", "-O foo --size 1G",
    "-O qcow2 -f qcow2 s3.raw"])
def test_measure_errors_as_qemu_img(sources, args):
    same(sources, "measure", *args.split())
