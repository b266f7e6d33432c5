"""convert -n where the source reads zeroes over the target's data, against
qemu-img 7.2: the target's map (``qemu-img map --output json``, host
offsets included) and its whole file byte for byte.

What qemu-img does there (and so do we): without --target-is-zero it
writes zeroes, and into a qcow2 target a zero write over whole clusters makes
zero clusters whose host clusters are freed and discarded (punched: the
target opened with discard=unmap, unless -S 0), over part of a data cluster
zero bytes; zero blocks found inside the source's data (``-S``) the same.
With --target-is-zero it writes no zeroes at all: the target keeps its old
bytes there (the user said they were zeroes). A raw target gets the same
bytes either way."""
from __future__ import annotations

import json

import pytest

from conftest import run_blkjobs
from qemu_oracle import check_clean, qemu_img, qemu_io

M = 1 << 20


def _source(d, fmt: str):
    """4 MiB: data, a zeroed range (a hole), zeroes written as data, data
    ending inside a cluster, holes; as qcow2 (converted: the zeroes written
    as data become a hole) with one more zero range."""
    qemu_img("create", "-f", "raw", d / "s.raw", "4M")
    qemu_io(d / "s.raw", "write -P 0x11 0 512k", "write -z 512k 512k", "write -P 0 1M 512k",
            "write -P 0x22 2M 100k", "write -P 0x33 3200k 8k", fmt="raw")
    if fmt == "raw":
        return d / "s.raw"
    qemu_img("convert", "-O", "qcow2", d / "s.raw", d / "s.qcow2")
    qemu_io(d / "s.qcow2", "write -z 3M 128k")
    return d / "s.qcow2"


#: what the existing target holds before the convert (qemu-io commands)
TARGETS = {
    "full": ["write -P 0x77 0 4M"],
    "middle": ["write -P 0x77 1M 2M"],
    "unaligned": ["write -P 0x77 1000k 1200k"],
}


def _convert(tmp_path, tool: str, src_fmt: str, fmt: str, target: str, opts: list[str],
             via: str = "file"):
    """``via`` blkdebug: the source under a blkdebug layer without rules
    (our buffer path, convert_nbd, as for NBD sources)."""
    d = tmp_path / tool
    d.mkdir()
    src = _source(d, src_fmt)
    dst = d / f"t.{fmt}"
    qemu_img("create", "-f", fmt, dst, "4M")
    qemu_io(dst, *TARGETS[target], fmt=fmt)
    name = str(src)
    if via == "blkdebug":
        (d / "bd.conf").write_text("")
        name = f"blkdebug:{d / 'bd.conf'}:{src}"
    args = ["convert", "-n", *opts, "-f", src_fmt, "-O", fmt, name, dst]
    p = run_blkjobs(*args) if tool == "ours" else qemu_img(*args, check=False)
    assert (p.returncode, p.stderr) == (0, ""), p.stderr
    return src, dst


@pytest.mark.parametrize("opts", ["", "-S 64k", "-S 1k", "-S 0", "--target-is-zero"])
@pytest.mark.parametrize("via,target", [("file", t) for t in sorted(TARGETS)]
                         + [("blkdebug", "full")])
@pytest.mark.parametrize("src_fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_convert_n_over_data_as_qemu_img(tmp_path, via, fmt, src_fmt, target, opts):
    theirs_src, theirs = _convert(tmp_path, "theirs", src_fmt, fmt, target, opts.split(), via)
    _, ours = _convert(tmp_path, "ours", src_fmt, fmt, target, opts.split(), via)
    maps = [json.loads(qemu_img("map", "--output", "json", "-f", fmt, p).stdout)
            for p in (ours, theirs)]
    if fmt == "raw" or target == "full" or opts in ("-S 0", "--target-is-zero"):
        assert maps[0] == maps[1]
        assert ours.read_bytes() == theirs.read_bytes()
    else:
        # a cluster newly allocated after zeroes freed others: QEMU hands out
        # the freed ones at once, we only after the final flush (a known
        # difference of the allocator, not of the zero handling): the same
        # map but for those host offsets
        for m in maps:
            for r in m:
                r.pop("offset", None)
        assert maps[0] == maps[1]
    if fmt == "qcow2":
        check_clean(ours)
    same = qemu_img("compare", "-f", src_fmt, "-F", fmt, theirs_src, ours, check=False)
    # the data is the source's, except where --target-is-zero was untrue
    assert same.returncode == (1 if opts == "--target-is-zero" else 0), same.stdout
