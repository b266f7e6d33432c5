"""blkjobs backup --sync full|incremental|bitmap --bitmap NAME: a full backup
that creates (or clears) a persistent bitmap, incrementals into qcow2
overlays of the previous backup, restore by converting the chain's top.
qemu-img (map, compare, check, info) and qemu-io are the oracle."""
from __future__ import annotations

import subprocess
import sys

from conftest import run_blkjobs
from qemu_oracle import check_clean, qemu_img, qemu_info, qemu_io, qemu_map

K64 = 65536


def _bitmaps(path) -> list[dict]:
    return qemu_info(path)["format-specific"]["data"].get("bitmaps", [])


def _data_at_top(path) -> list[tuple[int, int]]:
    """The runs the overlay itself holds (depth 0 data)."""
    return [(r["start"], r["length"]) for r in qemu_map(path) if r["depth"] == 0 and r["data"]]


def _disk(tmp_path):
    d = tmp_path / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", d, "16M")
    qemu_io(d, "write -P 1 0 4M", "write -P 9 12M 1M")
    return d


def test_full_then_incrementals_then_restore(tmp_path):
    disk = _disk(tmp_path)
    full, inc1, inc2 = (tmp_path / n for n in ("full.qcow2", "inc1.qcow2", "inc2.qcow2"))
    run_blkjobs("backup", "--bitmap", "daily", disk, full, check=True)
    assert _bitmaps(disk) == [{"flags": ["auto"], "name": "daily", "granularity": K64}]
    assert qemu_img("compare", disk, full).returncode == 0
    check_clean(disk)

    qemu_io(disk, "write -P 2 1M 64k", "write -P 3 8M 128k")
    run_blkjobs("backup", "--sync", "incremental", "--bitmap", "daily", "-B", full, disk, inc1,
                check=True)
    # exactly the clusters written since the full backup, on top of it
    assert _data_at_top(inc1) == [(1 << 20, K64), (8 << 20, 2 * K64)]
    assert qemu_info(inc1)["backing-filename"] == "full.qcow2"
    assert qemu_img("compare", disk, inc1).returncode == 0

    qemu_io(disk, "write -P 4 1M 4k", "write -z 12M 64k")
    run_blkjobs("backup", "--sync", "bitmap", "--bitmap-mode", "on-success", "--bitmap",
                "daily", "-B", inc1, disk, inc2, check=True)
    # the zeroed cluster is in the overlay too (data or a zero cluster)
    assert [(r["start"], r["length"]) for r in qemu_map(inc2)
            if r["depth"] == 0 and r["present"]] == [(1 << 20, K64), (12 << 20, K64)]
    assert qemu_img("compare", disk, inc2).returncode == 0

    # restore: convert of the chain's top
    out = tmp_path / "restored.raw"
    run_blkjobs("convert", "-O", "raw", inc2, out, check=True)
    assert qemu_img("compare", "-f", "qcow2", "-F", "raw", disk, out).returncode == 0
    for img in (disk, full, inc1, inc2):
        check_clean(img)


def test_full_backup_clears_an_existing_bitmap(tmp_path):
    disk = _disk(tmp_path)
    qemu_img("bitmap", "--add", disk, "b")
    qemu_io(disk, "write -P 5 0 1M")          # dirty: the full backup takes it all
    run_blkjobs("backup", "--bitmap", "b", disk, tmp_path / "full.qcow2", check=True)
    # nothing written since: the next incremental copies nothing
    inc = tmp_path / "inc.qcow2"
    run_blkjobs("backup", "--sync", "incremental", "--bitmap", "b", "-B",
                tmp_path / "full.qcow2", disk, inc, check=True)
    assert _data_at_top(inc) == []
    assert qemu_img("compare", disk, inc).returncode == 0


def test_bitmap_left_in_use_by_a_crash_is_refused_then_removed(tmp_path):
    disk = _disk(tmp_path)
    full = tmp_path / "full.qcow2"
    run_blkjobs("backup", "--bitmap", "b", disk, full, check=True)
    # a process killed while writing through the bitmap leaves it in use
    code = ("import os, sys\nfrom blkjobs import Engine\neng = Engine()\n"
            "fe = eng.attach(eng.open(sys.argv[1]))\nfe.write(0, b'x' * 4096)\nos._exit(0)\n")
    subprocess.run([sys.executable, "-c", code, str(disk)], check=True, timeout=60)
    assert _bitmaps(disk)[0]["flags"] == ["in-use", "auto"]
    p = run_blkjobs("backup", "--sync", "incremental", "--bitmap", "b", "-B", full, disk,
                    tmp_path / "inc.qcow2")
    assert p.returncode == 1
    assert p.stderr == (
        "blkjobs: Bitmap 'b' is inconsistent and cannot be used (a crash left it in use): "
        f"remove it with 'blkjobs bitmap --remove {disk} b' and take a full backup\n")
    assert not (tmp_path / "inc.qcow2").exists()
    # as qemu-img: check -r all leaves the bitmap, bitmap --remove drops it
    assert run_blkjobs("check", "-r", "all", disk).returncode == 0
    assert _bitmaps(disk)[0]["flags"] == ["in-use", "auto"]
    run_blkjobs("bitmap", "--remove", disk, "b", check=True)
    assert _bitmaps(disk) == []
    run_blkjobs("backup", "--bitmap", "b", disk, tmp_path / "full2.qcow2", check=True)
    assert qemu_img("compare", disk, tmp_path / "full2.qcow2").returncode == 0
    check_clean(disk)


def test_failed_full_backup_does_not_keep_a_new_bitmap(tmp_path, small_tmpfs):
    disk = _disk(tmp_path)
    p = run_blkjobs("backup", "-t", "unsafe", "--bitmap", "b", disk, small_tmpfs / "full.qcow2")
    assert p.returncode == 1, p.stderr
    assert "No space left on device" in p.stderr
    assert _bitmaps(disk) == []
    check_clean(disk)


def test_bitmap_usage_errors(tmp_path):
    disk = _disk(tmp_path)
    cases = [
        (["--sync", "incremental"], "blkjobs: --sync incremental needs --bitmap NAME\n"),
        (["--sync", "top", "--bitmap", "b"],
         "blkjobs: --bitmap goes with --sync full, incremental or bitmap, not top\n"),
        (["--bitmap-mode", "always"], "blkjobs: --bitmap-mode needs --bitmap NAME\n"),
        (["--sync", "incremental", "--bitmap", "b", "--bitmap-mode", "never"],
         "blkjobs: --sync incremental hands the bitmap over on success only "
         "(use --sync bitmap for other bitmap modes)\n"),
        (["--sync", "bitmap", "--bitmap", "b"],
         "blkjobs: --sync bitmap writes an overlay of the previous backup: give it with "
         "-B BACKING\n"),
        (["--sync", "bitmap", "--bitmap", "nope", "-B", disk],
         "blkjobs: Bitmap 'nope' could not be found\n"),
    ]
    for extra, err in cases:
        p = run_blkjobs("backup", *extra, disk, tmp_path / "t.qcow2")
        assert (p.returncode, p.stderr) == (1, err), extra
        assert not (tmp_path / "t.qcow2").exists()


def test_incremental_from_a_bitmap_qemu_made(tmp_path):
    """A bitmap added by qemu-img and dirtied by qemu-io: the incremental
    holds exactly those clusters."""
    disk = _disk(tmp_path)
    full = tmp_path / "full.qcow2"
    qemu_img("convert", "-O", "qcow2", disk, full)
    qemu_img("bitmap", "--add", "-g", "128k", disk, "q")
    qemu_io(disk, "write -P 6 100k 8k", "write -P 7 10M 300k")
    inc = tmp_path / "inc.qcow2"
    run_blkjobs("backup", "--sync", "incremental", "--bitmap", "q", "-B", full, disk, inc,
                check=True)
    # 128 KiB granules: [0, 128k) and [10M, 10M + 384k); the last 64 KiB
    # of the last granule reads as zeros: a zero cluster in the overlay
    assert [(r["start"], r["length"], r["data"]) for r in qemu_map(inc)
            if r["depth"] == 0] == [(0, 2 * K64, True), (10 << 20, 5 * K64, True),
                                    ((10 << 20) + 5 * K64, K64, False)]
    assert qemu_img("compare", disk, inc).returncode == 0
    check_clean(disk)
