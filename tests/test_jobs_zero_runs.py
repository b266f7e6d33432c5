"""Stream and commit turn copied runs of zeroes into zero clusters (qcow2)
or holes (raw) instead of allocating data for them: ``qemu-img map`` of the
result shows no data there, and the guest view is unchanged
(``qemu-img compare`` against a snapshot taken before the job)."""
from __future__ import annotations

import os

import pytest

from qemu_oracle import check_clean, qemu_img, qemu_map
from test_jobs_helpers import MiB, assert_same, eng, mkimg, snapshot  # noqa: F401

SIZE = 16 * MiB
#: the intermediate layer: written zeroes (allocated, not zero clusters) over
#: the base's data and over its holes, data between them, and a zero run
#: that covers one whole 64 KiB cluster and parts of its neighbours
MID_WRITES = [(0, 0, 4 * MiB), (0x22, 4 * MiB, 2 * MiB), (0, 10 * MiB, 2 * MiB),
              (0x33, 13 * MiB, 4096), (0, 7 * MiB + 32768, 131072)]


def data_ranges(path) -> list[tuple[int, int]]:
    return [(r["start"], r["length"]) for r in qemu_map(path) if r["data"]
            and r["depth"] == 0]


def covers(ranges, start, length) -> int:
    """How many bytes of [start, start+length) ``ranges`` cover."""
    return sum(max(0, min(s + n, start + length) - max(s, start)) for s, n in ranges)


def written_zero_chain(tmp_path, base_fmt="qcow2"):
    base = mkimg(tmp_path / f"base.{base_fmt}", base_fmt, SIZE,
                 writes=[(0x11, 0, 8 * MiB)])
    mid = mkimg(tmp_path / "mid.qcow2", "qcow2", SIZE, backing=base.rsplit("/", 1)[1],
                backing_fmt=base_fmt, writes=MID_WRITES)
    top = mkimg(tmp_path / "top.qcow2", "qcow2", SIZE, backing="mid.qcow2",
                writes=[(0x44, 14 * MiB, 65536)])
    # the written zeroes are allocated data in mid (qemu-io write -P 0)
    assert covers(data_ranges(mid), 0, 4 * MiB) == 4 * MiB
    return base, mid, top


def assert_zeroes_unallocated(path):
    """No data in the whole clusters of the zero runs of MID_WRITES; data
    where the non-zero runs are (and in the partial clusters around the
    run at 7 MiB + 32 KiB, which hold 0x11 from the base)."""
    data = data_ranges(path)
    assert covers(data, 0, 4 * MiB) == 0
    assert covers(data, 10 * MiB, 2 * MiB) == 0
    assert covers(data, 7 * MiB + 65536, 65536) == 0
    assert covers(data, 4 * MiB, 2 * MiB) == 2 * MiB


def test_stream_zero_runs_become_zero_clusters(eng, tmp_path):
    base, mid, top = written_zero_chain(tmp_path)
    view = snapshot(top, "qcow2", tmp_path / "view.raw")
    eng.open(top, node_name="top")
    job = eng.stream("top", base_node=eng.graph.nodes["top"].chain()[2].name, job_id="s0")
    assert eng.wait_job(job, 30).value == "completed"
    eng.close()
    assert_same(view, top, "raw", "qcow2")
    assert_zeroes_unallocated(top)
    check_clean(top)
    # qemu-img rebase (safe) of the same chain allocates at least as much
    ref = tmp_path / "ref"
    ref.mkdir()
    _, _, rtop = written_zero_chain(ref)
    qemu_img("rebase", "-b", "base.qcow2", "-F", "qcow2", rtop)
    assert_same(rtop, top, "qcow2", "qcow2")
    ours = sum(n for _, n in data_ranges(top))
    assert ours <= sum(n for _, n in data_ranges(rtop))


def test_stream_everything_zero_runs(eng, tmp_path):
    base, mid, top = written_zero_chain(tmp_path)
    view = snapshot(top, "qcow2", tmp_path / "view.raw")
    eng.open(top, node_name="top")
    job = eng.stream("top", job_id="s0")
    assert eng.wait_job(job, 30).value == "completed"
    eng.close()
    assert_same(view, top, "raw", "qcow2")
    data = data_ranges(top)
    assert covers(data, 0, 4 * MiB) == 0 and covers(data, 10 * MiB, 2 * MiB) == 0
    # the base's data under the zeroes is gone, the rest of it is there
    assert covers(data, 6 * MiB, MiB) == MiB
    check_clean(top)


def test_commit_intermediate_zero_runs(eng, tmp_path):
    base, mid, top = written_zero_chain(tmp_path)
    view = snapshot(top, "qcow2", tmp_path / "view.raw")
    t = eng.open(top, node_name="top")
    job = eng.commit("top", top_node=t.chain()[1].name, job_id="c0")
    assert eng.wait_job(job, 30).value == "completed"
    eng.close()
    assert_same(view, top, "raw", "qcow2")
    assert_zeroes_unallocated(base)
    check_clean(base)


@pytest.mark.parametrize("base_fmt", ["qcow2", "raw"])
def test_active_commit_zero_runs(eng, tmp_path, base_fmt):
    """``blkjobs commit mid`` as the command does it: mid is the active
    layer (a mirror into the base)."""
    base, mid, top = written_zero_chain(tmp_path, base_fmt)
    view = snapshot(mid, "qcow2", tmp_path / "view.raw")
    eng.open(mid, node_name="mid")
    ev = eng.listen(["BLOCK_JOB_READY"])
    job = eng.commit("mid", job_id="c0")
    ev.wait_for("BLOCK_JOB_READY", timeout=30)
    eng.job_complete("c0")
    assert eng.wait_job(job, 30).value == "completed"
    eng.close()
    assert_same(view, base, "raw", base_fmt)
    if base_fmt == "qcow2":
        assert_zeroes_unallocated(base)
        check_clean(base)
    else:
        # holes where the zeroes went (the base had data under 0..4 MiB)
        fd = os.open(base, os.O_RDONLY)
        try:
            assert os.lseek(fd, 0, os.SEEK_DATA) >= 4 * MiB
        finally:
            os.close(fd)
