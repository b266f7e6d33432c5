"""backup: every sync mode on raw and qcow2, point in time under a writer."""
from __future__ import annotations

import pytest

from test_jobs_helpers import (MIB_BATCHES, SIZE, MiB, Writer, assert_same, check,  # noqa: F401
                               eng, hold_nth, mkimg, snapshot, wait_writes)

WRITES = [("0x11", 0, 1 * MiB), ("0x22", 2 * MiB + 4096, 300 << 10), (None, 3 * MiB, 64 << 10),
          ("0x33", SIZE - (128 << 10), 128 << 10)]


def make_pair(tmp_path, fmt_src, fmt_dst):
    src = mkimg(tmp_path / f"src.{fmt_src}", fmt_src, writes=WRITES)
    dst = mkimg(tmp_path / f"dst.{fmt_dst}", fmt_dst)
    return src, dst


@pytest.mark.parametrize("fmt_src", ["raw", "qcow2"])
@pytest.mark.parametrize("fmt_dst", ["raw", "qcow2"])
def test_full(eng, tmp_path, fmt_src, fmt_dst):
    src, dst = make_pair(tmp_path, fmt_src, fmt_dst)
    expect = snapshot(src, fmt_src, tmp_path / "expect.raw")
    eng.open(src, fmt_src, node_name="src")
    eng.open(dst, fmt_dst, node_name="dst")
    ev = eng.listen()
    job = eng.backup("src", "dst", sync="full", job_id="b0")
    assert eng.wait_job(job, 20).value == "completed"
    done = ev.wait_for("BLOCK_JOB_COMPLETED", timeout=5)
    assert done.data["len"] == done.data["offset"] == SIZE
    eng.close()
    assert_same(expect, dst, "raw", fmt_dst)
    if fmt_dst == "qcow2":
        check(dst)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_full_point_in_time_under_writer(eng, tmp_path, fmt):
    src, dst = make_pair(tmp_path, fmt, fmt)
    expect = snapshot(src, fmt, tmp_path / "expect.raw")
    s = eng.open(src, fmt, node_name="src")
    eng.open(dst, fmt, node_name="dst")
    vm = eng.attach(s)
    # held at its third batch (MiB 2-3; the second, MiB 1-2, is a hole: no
    # data write): MiB 0-1 is copied, MiB 1-2 in flight, MiB 3-4 not yet
    eng.blkdebug_break("dst", "write_aio", "w")
    job = eng.backup("src", "dst", sync="full", job_id="b0", speed=MIB_BATCHES)
    assert hold_nth(eng, "dst", "write_aio", 2, "w").offset == 2 * MiB
    eng.job_set_speed("b0", 0)
    vm.write(4096, b"\xa1" * 8192)                    # copied already: no copy first
    vm.write(3 * MiB + 12288, b"\xa2" * 4096)         # copy-before-write
    vm.write_zeroes(SIZE - 65536, 65536)               # copy-before-write
    w = Writer(vm, SIZE)                               # waits for the held batch ...
    w.start()
    eng.blkdebug_resume("w")
    assert eng.wait_job(job, 60).value == "completed"
    wait_writes(w, 10)                                 # ... and goes on after the job
    w.stop()
    final = snapshot_node(vm, tmp_path / "final.raw")
    eng.close()
    assert_same(expect, dst, "raw", fmt)
    assert_same(final, src, "raw", fmt)     # the guest's writes all landed


def snapshot_node(fe, out):
    with open(out, "wb") as f:
        f.write(fe.read(0, fe.size))
    return str(out)


def test_top_overlay(eng, tmp_path):
    mkimg(tmp_path / "base.qcow2", writes=[("0x44", 0, SIZE)])
    top = mkimg(tmp_path / "top.qcow2", backing="base.qcow2",
                writes=[("0x55", 1 * MiB, 512 << 10), (None, 3 * MiB, 64 << 10)])
    tgt = mkimg(tmp_path / "tgt.qcow2", backing="base.qcow2")
    expect = snapshot(top, "qcow2", tmp_path / "expect.raw")
    s = eng.open(top, node_name="top")
    eng.open(tgt, node_name="tgt")
    vm = eng.attach(s)
    eng.blkdebug_break("tgt", "write_aio", "w")
    job = eng.backup("top", "tgt", sync="top", job_id="b0", speed=MIB_BATCHES)
    # held at the second batch (top's data; the first is base's: no write)
    assert eng.blkdebug_wait_break("w").offset == 1 * MiB
    eng.job_set_speed("b0", 0)
    vm.write(3 * MiB, b"\xa2" * 4096)             # top's zero cluster: saved first
    vm.write(2 * MiB, b"\xa3" * 65536)            # base's: nothing to save
    w = Writer(vm, SIZE)                           # writes while and after it copies
    w.start()
    eng.blkdebug_resume("w")
    assert eng.wait_job(job, 60).value == "completed"
    wait_writes(w, 10)
    w.stop()
    eng.close()
    assert_same(expect, tgt, "raw", "qcow2")
    check(tgt)
    # only what top allocated (plus CBW copies of top clusters) is in tgt
    import json
    import subprocess
    m = json.loads(subprocess.run(["qemu-img", "map", "--output", "json", tgt],
                                  capture_output=True, text=True).stdout)
    own = sum(e["length"] for e in m if e["depth"] == 0 and e["data"])
    assert own <= 1 * MiB


def test_none_saves_only_overwritten(eng, tmp_path):
    src, dst = make_pair(tmp_path, "qcow2", "qcow2")
    expect = snapshot(src, "qcow2", tmp_path / "expect.raw")
    s = eng.open(src, node_name="src")
    eng.open(dst, node_name="dst")
    vm = eng.attach(s)
    ev = eng.listen()
    job = eng.backup("src", "dst", sync="none", job_id="b0")
    vm.write(4096, b"\xee" * 4096)                 # cluster 0 saved first
    vm.write(2 * MiB + 8192, b"\xee" * 100)
    vm.write(4096, b"\xdd" * 4096)                 # already saved: not again
    eng.job_cancel("b0")
    assert eng.wait_job(job, 10).value == "cancelled"
    ev.wait_for("BLOCK_JOB_CANCELLED", timeout=5)
    tgt = eng.open(dst, node_name="dst2", read_only=True) if False else None
    eng.close()
    old = open(expect, "rb").read()
    import subprocess
    raw = tmp_path / "tgt.raw"
    snapshot(dst, "qcow2", raw)
    got = raw.read_bytes()
    c = 64 << 10
    assert got[0:c] == old[0:c]
    assert got[2 * MiB:2 * MiB + c] == old[2 * MiB:2 * MiB + c]
    assert got[c:2 * MiB] == bytes(2 * MiB - c)    # not copied
    del tgt, subprocess


def test_compress_qcow2(eng, tmp_path):
    src, dst = make_pair(tmp_path, "qcow2", "qcow2")
    expect = snapshot(src, "qcow2", tmp_path / "expect.raw")
    eng.open(src, node_name="src")
    eng.open(dst, node_name="dst")
    job = eng.backup("src", "dst", sync="full", job_id="b0", compress=True)
    assert eng.wait_job(job, 20).value == "completed"
    eng.close()
    assert_same(expect, dst, "raw", "qcow2")
    check(dst)
    import json
    import subprocess
    info = json.loads(subprocess.run(["qemu-img", "check", "--output", "json", dst],
                                     capture_output=True, text=True).stdout)
    assert info["compressed-clusters"] > 0


def test_compress_raw_refused(eng, tmp_path):
    src, dst = make_pair(tmp_path, "qcow2", "raw")
    eng.open(src, node_name="src")
    eng.open(dst, "raw", node_name="dst")
    with pytest.raises(Exception, match="Compression is not supported for this drive dst"):
        eng.backup("src", "dst", sync="full", job_id="b0", compress=True)


def test_validation_messages(eng, tmp_path):
    src, dst = make_pair(tmp_path, "qcow2", "qcow2")
    eng.open(src, node_name="src")
    eng.open(dst, node_name="dst")
    other = mkimg(tmp_path / "small.qcow2", size=SIZE // 2)
    eng.open(other, node_name="small")
    eng.block_dirty_bitmap_add("src", "bm0")
    cases = [
        (dict(sync="bitmap"), "must provide a valid bitmap name for 'bitmap' sync mode"),
        (dict(sync="incremental"), "must provide a valid bitmap name for 'incremental' sync mode"),
        (dict(sync="incremental", bitmap="bm0", bitmap_mode="always"),
         "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"),
        (dict(sync="bitmap", bitmap="nope", bitmap_mode="always"),
         "Bitmap 'nope' could not be found"),
        (dict(sync="bitmap", bitmap="bm0"),
         "Bitmap sync mode must be given when providing a bitmap"),
        (dict(sync="none", bitmap="bm0", bitmap_mode="always"),
         "sync mode 'none' does not produce meaningful bitmap outputs"),
        (dict(sync="full", bitmap="bm0", bitmap_mode="never"),
         "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode 'full'"),
        (dict(sync="full", bitmap_mode="never"), "Cannot specify bitmap sync mode without a bitmap"),
        (dict(sync="full", target="small"), "Source and target image have different sizes"),
        (dict(sync="full", target="src"), "Source and target cannot be the same"),
        (dict(sync="full", target="nothere"), "Cannot find device=nothere nor node-name=nothere"),
        (dict(sync="full", speed=-1), "Parameter 'speed' expects a non-negative value"),
    ]
    for kw, msg in cases:
        kw.setdefault("target", "dst")
        with pytest.raises(Exception) as ei:
            eng.backup("src", job_id="b0", **kw)
        assert str(ei.value) == msg, kw
    assert eng.query_jobs() == []


def test_progress_and_pause(eng, tmp_path):
    src, dst = make_pair(tmp_path, "qcow2", "qcow2")
    eng.open(src, node_name="src")
    eng.open(dst, node_name="dst")
    eng.blkdebug_break("dst", "write_aio", "w")
    job = eng.backup("src", "dst", sync="full", job_id="b0", speed=MIB_BATCHES)
    eng.blkdebug_wait_break("w")
    eng.job_pause("b0")
    eng.blkdebug_resume("w")
    # the batches in flight land (the held one and the one claimed before
    # the pause was seen), then the job parks at its pause point
    eng.wait_status(job, "paused", timeout=60)
    a = eng.query_block_jobs()[0]
    b = eng.query_block_jobs()[0]
    assert a == b and b["paused"] and (b["offset"], b["len"]) == (2 * MiB, SIZE)
    eng.job_set_speed("b0", 0)
    eng.job_resume("b0")
    assert eng.wait_job(job, 20).value == "completed"


def test_unaligned_progress_in_clusters_the_message_in_bytes(eng, tmp_path):
    """A backup of a 70000-byte raw image (70144 bytes: whole sectors): its
    progress counts whole clusters of the copy bitmap, as QEMU's (131072;
    tests/test_daemon_qsd_progress.py compares with qemu-storage-daemon), while
    what the command line says it copied counts the image's bytes
    (cli.cmd_backup.copied, the text of a failed or cancelled backup)."""
    from blkjobs.cli.cmd_backup import copied
    src, dst = tmp_path / "s.raw", tmp_path / "d.raw"
    src.write_bytes(b"\x11" * 70000)
    dst.write_bytes(bytes(70144))
    eng.open(str(src), "raw", node_name="src")
    eng.open(str(dst), "raw", node_name="dst")
    ev = eng.listen()
    job = eng.backup("src", "dst", sync="full", job_id="b0")
    assert eng.wait_job(job, 20).value == "completed"
    done = ev.wait_for("BLOCK_JOB_COMPLETED", timeout=5)
    assert (done.data["len"], done.data["offset"]) == (131072, 131072)
    assert copied(job) == "68.5 KiB of 68.5 KiB copied"
    eng.close()
    assert dst.read_bytes() == b"\x11" * 70000 + bytes(144)
