"""Backing files shorter than the overlay (or none at all), checked against
qemu-img's own result: the same scenario is run once with qemu-img and once
with blkjobs, and the data (byte for byte) and ``qemu-img map`` (without host
offsets) of the results must be equal.

The first test is QEMU's iotest 252 ("rebase without input base"), with its
pattern checks."""
from __future__ import annotations

import shutil

import pytest

from conftest import run_blkjobs
from qemu_oracle import check_clean, qemu_img, qemu_io, qemu_map

K = 64 << 10


def mk(path, size, backing=None, opts=None):
    args = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    if backing:
        args += ["-b", backing, "-F", "qcow2"]
    qemu_img(*args, path, size)


def view(path, tmp_path):
    """(data, map without host offsets) of a qcow2 image."""
    out = tmp_path / "view.raw"
    qemu_img("convert", "-O", "raw", path, out)
    data = out.read_bytes()
    out.unlink()
    m = qemu_map(path)
    for e in m:
        e.pop("offset", None)
    return data, m


def both(tmp_path, setup, blkjobs_args, qemu_args, result):
    """Run ``setup(dir)`` in two directories, then blkjobs in one and
    qemu-img in the other; return (ours, qemu's) view of ``result``."""
    views = []
    for who, args in (("blkjobs", blkjobs_args), ("qemu", qemu_args)):
        d = tmp_path / who
        d.mkdir()
        setup(d)
        if who == "blkjobs":
            p = run_blkjobs(*[d / a if a.endswith(".qcow2") else a for a in args])
            assert p.returncode == 0, p.stderr
        else:
            qemu_img(*[d / a if a.endswith(".qcow2") else a for a in args])
        check_clean(d / result)
        views.append(view(d / result, tmp_path))
    assert views[0][1] == views[1][1], f"map differs from qemu-img's:\n{views[0][1]}\n{views[1][1]}"
    assert views[0][0] == views[1][0], "data differs from qemu-img's"
    return views


# -- rebase --------------------------------------------------------------------
def test_iotest_252_rebase_without_input_base(tmp_path):
    img, new = tmp_path / "t.qcow2", tmp_path / "t.qcow2.base_new"
    mk(img, 6 * K)
    mk(new, 6 * K)
    qemu_io(img, f"write -P 0x22 0 {2 * K}", f"write -P 0x11 {2 * K} {2 * K}")
    qemu_io(new, f"write -P 0x11 0 {K}", f"write -P 0x11 {2 * K} {K}",
            f"write -P 0x11 {4 * K} {K}")
    checks = (f"read -P 0x22 0 {2 * K}", f"read -P 0x11 {2 * K} {2 * K}",
              f"read -P 0x00 {4 * K} {2 * K}")

    run_blkjobs("rebase", "-b", "", img, check=True)       # a no-op
    qemu_io(img, *checks)
    assert [(e["start"], e["length"], e["depth"], e["present"], e["zero"], e["data"])
            for e in qemu_map(img)] == [(0, 4 * K, 0, True, False, True),
                                        (4 * K, 2 * K, 0, False, True, False)]

    run_blkjobs("rebase", "-b", new.name, "-F", "qcow2", img, check=True)
    check_clean(img)
    qemu_io(img, *checks)
    # cluster 4 is a zero cluster in the overlay; cluster 5 reads through
    assert [(e["start"], e["length"], e["depth"], e["present"], e["zero"], e["data"])
            for e in qemu_map(img)] == [(0, 4 * K, 0, True, False, True),
                                        (4 * K, K, 0, True, True, False),
                                        (5 * K, K, 1, False, True, False)]


def _short_old(old_size, opts=None, new_size=6 * K, new_pattern=0x11, top_size=6 * K):
    def setup(d):
        mk(d / "old.qcow2", old_size)
        qemu_io(d / "old.qcow2", f"write -P 0x33 0 {old_size}")
        mk(d / "new.qcow2", new_size)
        qemu_io(d / "new.qcow2", f"write -P {new_pattern} 0 {new_size}")
        mk(d / "t.qcow2", top_size, "old.qcow2", opts)
        qemu_io(d / "t.qcow2", f"write -P 0x22 0 {K}")
    return setup


@pytest.mark.parametrize("opts", [None, "extended_l2=on", "cluster_size=4k", "compat=0.10"])
@pytest.mark.parametrize("old_size", [2 * K, 3 * K + 1536, 1024])
def test_rebase_onto_new_base_past_old_end(tmp_path, old_size, opts):
    """Old backing shorter than the overlay, new one full of data: past the
    old end the overlay gets zero clusters (v3), as with qemu-img."""
    both(tmp_path, _short_old(old_size, opts),
         ["rebase", "-b", "new.qcow2", "-F", "qcow2", "t.qcow2"],
         ["rebase", "-b", "new.qcow2", "-F", "qcow2", "t.qcow2"], "t.qcow2")


@pytest.mark.parametrize("opts", [None, "extended_l2=on"])
@pytest.mark.parametrize("old_size", [2 * K, 3 * K + 1536])
def test_rebase_standalone_with_short_old_backing(tmp_path, old_size, opts):
    both(tmp_path, _short_old(old_size, opts), ["rebase", "-b", "", "t.qcow2"],
         ["rebase", "-b", "", "t.qcow2"], "t.qcow2")


@pytest.mark.parametrize("new_size", [K, 9 * K])
def test_rebase_onto_shorter_or_longer_new_base(tmp_path, new_size):
    both(tmp_path, _short_old(2 * K, new_size=new_size),
         ["rebase", "-b", "new.qcow2", "-F", "qcow2", "t.qcow2"],
         ["rebase", "-b", "new.qcow2", "-F", "qcow2", "t.qcow2"], "t.qcow2")


def test_rebase_new_base_of_zero_data_and_odd_overlay_size(tmp_path):
    both(tmp_path, _short_old(2 * K, new_pattern=0),
         ["rebase", "-b", "new.qcow2", "-F", "qcow2", "t.qcow2"],
         ["rebase", "-b", "new.qcow2", "-F", "qcow2", "t.qcow2"], "t.qcow2")
    shutil.rmtree(tmp_path / "blkjobs")
    shutil.rmtree(tmp_path / "qemu")
    both(tmp_path, _short_old(2 * K, top_size=5 * K + 1024),
         ["rebase", "-b", "new.qcow2", "-F", "qcow2", "t.qcow2"],
         ["rebase", "-b", "new.qcow2", "-F", "qcow2", "t.qcow2"], "t.qcow2")


def _sector_differences(opts, old_size, diff_at=None, new_tail=None, old_data=True):
    def setup(d):
        mk(d / "old.qcow2", old_size)
        mk(d / "new.qcow2", 6 * K)
        if old_data:
            qemu_io(d / "old.qcow2", f"write -P 0x33 0 {old_size}")
            qemu_io(d / "new.qcow2", f"write -P 0x33 0 {old_size}")
        if diff_at is not None:
            qemu_io(d / "new.qcow2", f"write -P 0x44 {diff_at} 512")
        if new_tail is not None:
            qemu_io(d / "new.qcow2", f"write -P 0x55 {new_tail} 512")
        mk(d / "t.qcow2", 6 * K, "old.qcow2", opts)
    return setup


@pytest.mark.parametrize("opts", [None, "extended_l2=on"])
@pytest.mark.parametrize("case", ["inside", "past_end", "across_end", "across_end_zero_head"])
def test_rebase_writes_only_the_granules_that_differ(tmp_path, opts, case):
    """One 512-byte difference: inside the old backing (data written),
    past its end (a zero (sub)cluster), in the (sub)cluster across its end
    (old part with data, or zero by block status)."""
    setup = {
        "inside": _sector_differences(opts, 4 * K, diff_at=K + 4096),
        "past_end": _sector_differences(opts, 4 * K, new_tail=5 * K + 8192),
        "across_end": _sector_differences(opts, 3 * K + 1536, new_tail=3 * K + 8192),
        "across_end_zero_head": _sector_differences(opts, 3 * K + 1536,
                                                    new_tail=3 * K + 8192, old_data=False),
    }[case]
    both(tmp_path, setup, ["rebase", "-b", "new.qcow2", "-F", "qcow2", "t.qcow2"],
         ["rebase", "-b", "new.qcow2", "-F", "qcow2", "t.qcow2"], "t.qcow2")


def test_rebase_unsafe_with_short_backings(tmp_path):
    both(tmp_path, _short_old(2 * K, new_size=K),
         ["rebase", "-u", "-b", "new.qcow2", "-F", "qcow2", "t.qcow2"],
         ["rebase", "-u", "-b", "new.qcow2", "-F", "qcow2", "t.qcow2"], "t.qcow2")


# -- stream / commit through an intermediate shorter than the top ----------------
def _chain(base_size, mid_size, top_size=6 * K):
    """base (0x11 everywhere) <- mid (0x22 in its second cluster) <- t (0x44
    in its first sector, 0x33 in its last cluster)."""
    def setup(d):
        mk(d / "base.qcow2", base_size)
        qemu_io(d / "base.qcow2", f"write -P 0x11 0 {base_size}")
        mk(d / "mid.qcow2", mid_size, "base.qcow2")
        qemu_io(d / "mid.qcow2", f"write -P 0x22 {K} {K}")
        mk(d / "t.qcow2", top_size, "mid.qcow2")
        qemu_io(d / "t.qcow2", f"write -P 0x33 {top_size - K} {K}", "write -P 0x44 0 512")
    return setup


@pytest.mark.parametrize("sizes", [(6 * K, 2 * K), (2 * K, 6 * K), (K, 2 * K)])
def test_stream_onto_base_keeps_zeroes_past_a_short_intermediate(tmp_path, sizes):
    """t reads zeroes past mid's end; after streaming onto base it must not
    read base's data there: the same result as qemu-img rebase -b base."""
    (ours, _), _ = both(tmp_path, _chain(*sizes), ["stream", "-b", "base.qcow2", "t.qcow2"],
                        ["rebase", "-b", "base.qcow2", "-F", "qcow2", "t.qcow2"], "t.qcow2")
    assert ours[2 * K:5 * K] == bytes(3 * K)


def test_stream_whole_chain_with_a_short_intermediate(tmp_path):
    """Nothing is below the short mid once t is standalone: past its end t
    stays unallocated (reads zeroes), as after qemu-img rebase -b ''."""
    both(tmp_path, _chain(6 * K, 2 * K), ["stream", "t.qcow2"], ["rebase", "-b", "", "t.qcow2"],
         "t.qcow2")


def test_commit_into_base_below_a_short_intermediate(tmp_path):
    """Committing t (through mid, shorter) into base: base must read t's
    zeroes past mid's end, as after qemu-img commit -b base."""
    (ours, _), _ = both(tmp_path, _chain(6 * K, 2 * K),
                        ["commit", "-d", "-b", "base.qcow2", "t.qcow2"],
                        ["commit", "-q", "-d", "-b", "base.qcow2", "t.qcow2"], "base.qcow2")
    assert ours[2 * K:5 * K] == bytes(3 * K)
