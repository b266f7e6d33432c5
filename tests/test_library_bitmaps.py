"""The library's dirty bitmaps: persistent ones (stored in the qcow2 image,
reopened by a new Engine, read by QEMU), merge/clear/enable/disable with
QEMU's semantics, the dirty-extent iterator, and wait_job without a
default timeout. QEMU reads the bitmaps back through qemu-nbd -B and
nbdinfo --map (qemu:dirty-bitmap:NAME)."""
from __future__ import annotations

import inspect
import shutil
import subprocess
import threading

import pytest

from blkjobs import DirtyBitmap, Engine, JobOutcome, errors
from qemu_oracle import check_clean, qemu_dirty, qemu_img, qemu_info, qemu_io

K64 = 65536
MiB = 1 << 20


def _img(tmp_path, name="d.qcow2", size="8M"):
    p = tmp_path / name
    qemu_img("create", "-f", "qcow2", p, size)
    return p


def test_persistent_bitmap_survives_close_and_qemu_reads_it(tmp_path):
    img = _img(tmp_path)
    eng = Engine()
    node = eng.open(str(img), node_name="d")
    bm = eng.block_dirty_bitmap_add("d", "p", persistent=True)
    assert isinstance(bm, DirtyBitmap) and bm.persistent
    fe = eng.attach(node)
    fe.write(MiB + 100, b"x" * 5000)
    fe.write(5 * MiB, b"y" * (2 * K64))
    fe.close()
    want = [(MiB, K64), (5 * MiB, 2 * K64)]
    assert list(bm.dirty_extents()) == want
    eng.close()
    assert qemu_info(img)["format-specific"]["data"]["bitmaps"] == [
        {"flags": ["auto"], "name": "p", "granularity": K64}]
    check_clean(img)
    assert qemu_dirty(img, "p") == want
    eng = Engine()
    eng.open(str(img), node_name="d")
    assert [b.name for b in eng.bitmaps("d")] == ["p"]
    assert eng.dirty_extents("d", "p") == want
    assert eng.dirty_extents("d", "p", MiB + 4096, 4 * MiB) == [(MiB + 4096, K64 - 4096),
                                                                 (5 * MiB, 4096)]
    eng.close()


def test_bitmaps_of_qemu_are_read_and_kept_updated(tmp_path):
    img = _img(tmp_path)
    qemu_img("bitmap", "--add", img, "q")
    qemu_io(img, "write 64k 100k")
    before = qemu_dirty(img, "q")   # (open read-write, the bitmap is in use on disk)
    eng = Engine()
    node = eng.open(str(img))
    assert eng.dirty_extents(node, "q") == before == [(K64, 2 * K64)]
    fe = eng.attach(node)
    fe.write(3 * MiB, b"z" * 10)
    fe.close()
    eng.close()
    assert qemu_dirty(img, "q") == [(K64, 2 * K64), (3 * MiB, K64)]
    check_clean(img)


def test_merge_clear_enable_disable_as_qemu_img(tmp_path):
    """The same operations by qemu-img bitmap and by the library give the
    same bitmaps (contents through QEMU, flags through qemu-img info)."""
    base = _img(tmp_path, "base.qcow2")
    for name in "abc":
        qemu_img("bitmap", "--add", base, name)
    qemu_io(base, "write 0 64k")
    qemu_img("bitmap", "--disable", base, "a")
    qemu_io(base, "write 1M 64k")
    qemu_img("bitmap", "--disable", base, "b")
    qemu_io(base, "write 2M 64k")
    ref, ours = tmp_path / "ref.qcow2", tmp_path / "ours.qcow2"
    shutil.copy(base, ref)
    shutil.copy(base, ours)
    qemu_img("bitmap", "--merge", "a", ref, "c")
    qemu_img("bitmap", "--clear", ref, "a")
    qemu_img("bitmap", "--enable", ref, "a")
    qemu_img("bitmap", "--disable", ref, "c")
    eng = Engine()
    eng.open(str(ours), node_name="o")
    eng.block_dirty_bitmap_merge("o", "c", ["a"])
    eng.block_dirty_bitmap_clear("o", "a")
    eng.block_dirty_bitmap_enable("o", "a")
    eng.block_dirty_bitmap_disable("o", "c")
    eng.close()
    info = [qemu_info(p)["format-specific"]["data"]["bitmaps"] for p in (ref, ours)]
    assert info[0] == info[1]
    for name in "abc":
        assert qemu_dirty(ours, name) == qemu_dirty(ref, name), name
    assert qemu_dirty(ours, "c") == [(0, K64), (MiB, K64), (2 * MiB, K64)]
    check_clean(ours)


def test_raw_refuses_persistent_and_in_use_bitmap_is_refused(tmp_path):
    raw = tmp_path / "r.raw"
    qemu_img("create", "-f", "raw", raw, "1M")
    img = _img(tmp_path)
    qemu_img("bitmap", "--add", img, "p")
    # opened read-write, then killed: the bitmap stays in use (a new one
    # would not be on disk at all: QEMU stores those at close)
    code = ("import os, sys\nfrom blkjobs import Engine\neng = Engine()\nn = eng.open(sys.argv[1])\n"
            "eng.attach(n).write(0, b'x')\nos._exit(0)\n")
    import sys
    subprocess.run([sys.executable, "-c", code, str(img)], check=True, timeout=60)
    eng = Engine()
    r = eng.open(str(raw), node_name="r")
    with pytest.raises(errors.JobError) as e:
        eng.block_dirty_bitmap_add(r, "p", persistent=True)
    assert str(e.value) == "Can't store persistent bitmaps to r: Operation not supported"
    eng.open(str(img), node_name="d")
    bm = eng.bitmap("d", "p")
    assert (bm.inconsistent, bm.count(), bm.recording) == (True, 0, False)
    for op in (lambda: eng.block_dirty_bitmap_clear("d", "p"),
               lambda: eng.block_dirty_bitmap_enable("d", "p"),
               lambda: eng.backup("d", eng.create(str(tmp_path / "t.qcow2"), "qcow2", 8 * MiB),
                                  "bitmap", bitmap="p", bitmap_mode="on-success")):
        with pytest.raises(errors.JobError) as e:
            op()
        assert str(e.value) == "Bitmap 'p' is inconsistent and cannot be used"
    eng.block_dirty_bitmap_remove("d", "p")
    eng.close()
    assert "bitmaps" not in qemu_info(img)["format-specific"]["data"]
    check_clean(img)


def test_wait_job_waits_without_a_default_timeout(tmp_path):
    assert inspect.signature(Engine.wait_job).parameters["timeout"].default is None
    img = _img(tmp_path)
    eng = Engine()
    src = eng.open(str(img), node_name="s")
    tgt = eng.create(str(tmp_path / "t.qcow2"), "qcow2", src.size, node_name="t")
    job = eng.backup(src, tgt, "full", job_id="j", auto_finalize=False)
    eng.wait_status(job, "pending")
    with pytest.raises(TimeoutError):
        eng.wait_job(job, timeout=0.05)
    t = threading.Thread(target=lambda: eng.jobs.job_finalize("j"))
    t.start()
    assert eng.wait_job(job) is JobOutcome.COMPLETED
    t.join()
    eng.close()


def test_job_writes_mark_the_bitmaps_of_the_image_they_write(tmp_path):
    """As in QEMU, a job's writes dirty the written image's bitmaps: a
    commit into a base, a mirror into an existing target."""
    from conftest import run_blkjobs
    base, top, dst = (tmp_path / n for n in ("base.qcow2", "top.qcow2", "m.qcow2"))
    qemu_img("create", "-f", "qcow2", base, "4M")
    qemu_img("bitmap", "--add", base, "b")
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    qemu_io(top, "write -P 3 1M 64k", "write -P 4 3M 4k")
    qemu_img("create", "-f", "qcow2", dst, "4M")
    qemu_img("bitmap", "--add", dst, "m")
    run_blkjobs("mirror", top, dst, check=True)
    run_blkjobs("commit", top, check=True)
    for img, name in ((base, "b"), (dst, "m")):
        assert qemu_dirty(img, name) == [(MiB, K64), (3 * MiB, K64)], img
        check_clean(img)


def test_job_writes_mark_the_bitmaps_of_the_node_they_land_on(tmp_path):
    """As QEMU's bdrv_set_dirty for every write to a node: a stream writing
    the base's data into the top marks the top's in-memory bitmap with
    exactly the clusters it copied (guest writes alone did before)."""
    base = _img(tmp_path, "base.qcow2")
    qemu_io(base, "write -P 1 1M 128k", "write -P 2 4M 64k")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    eng = Engine()
    eng.open(str(top), node_name="top", read_only=False)
    bm = eng.block_dirty_bitmap_add("top", "m")
    assert not bm.persistent
    job = eng.stream("top", job_id="s0")
    assert eng.wait_job(job, 60).value == "completed"
    assert list(bm.dirty_extents()) == [(MiB, 2 * K64), (4 * MiB, K64)]
    eng.close()
