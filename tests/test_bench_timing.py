"""The timing logic of blkjobs bench on a fake clock: the alternating
schedule, warm-up discarded, medians, the timing of external tools, the
throttled progress line, and the report built from known samples."""
from __future__ import annotations

import io
import os
import shutil
import tempfile

import pytest

from blkjobs.diskbench import report
from blkjobs.diskbench.matrix import Case
from blkjobs.diskbench.status_line import StatusLine
from blkjobs.diskbench.contenders import Contender
from blkjobs.diskbench.measure import ToolError, run_external
from blkjobs.diskbench.runner import Row, Runner, Settings, ranks, schedule
from blkjobs.diskbench.stats import Sample, summarize


class FakeClock:
    def __init__(self, t=100.0):
        self.t = t

    def __call__(self):
        return self.t


@pytest.fixture
def shm(tmp_path):
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else str(tmp_path)
    d = tempfile.mkdtemp(prefix="test-bench.", dir=base)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_schedule_rotates_and_warms_up():
    assert schedule(3, 1, 2) == [
        (0, 0, False), (0, 1, False), (0, 2, False),
        (1, 1, True), (1, 2, True), (1, 0, True),
        (2, 2, True), (2, 0, True), (2, 1, True)]
    assert schedule(1, 0, 3) == [(0, 0, True), (1, 0, True), (2, 0, True)]


class Fake(Contender):
    """Takes `seconds[i]` of fake time on its i-th run, 1 MB per run."""

    def __init__(self, name, seconds, clock, log, fail=False):
        self.name, self.seconds, self.clock, self.log, self.fail = name, list(seconds), clock, log, fail

    def run(self, case, env, progress):
        self.log.append(self.name)
        if self.fail:
            raise ToolError(f"{self.name} failed (exit 2): boom")
        t0 = self.clock()
        self.clock.t += self.seconds.pop(0)
        progress(1_000_000, 0)
        return Sample(1_000_000, 0, self.clock() - t0, 0.0, 0)


def test_runner_alternates_and_discards_warmup(shm):
    clock, log = FakeClock(), []
    a = Fake("a", [9.0, 1.0, 2.0, 4.0], clock, log)        # warm-up 9 s is dropped
    b = Fake("b", [0.5, 0.5, 0.25, 1.0], clock, log)
    c = Fake("c", [1.0], clock, log, fail=True)
    s = Settings(dir=shm, cases=[Case("seqread", 4096, 1, False)], size=1 << 20,
                 repeat=3, warmup=1)
    rows, notes = Runner(s, clock=clock, contenders=[a, b, c]).run()
    # rotation; c failed in round 0 and is not run again
    assert log == ["a", "b", "c", "b", "a", "a", "b", "a", "b"]
    ra, rb, rc = rows
    assert [x.elapsed_s for x in ra.samples] == [1.0, 2.0, 4.0]
    assert [x.elapsed_s for x in rb.samples] == [0.5, 0.25, 1.0]
    sa = summarize(ra.samples)
    assert (sa.median_bps, sa.min_bps, sa.max_bps) == (500_000, 250_000, 1_000_000)
    assert sa.spread == 1.5
    assert rc.error == "c failed (exit 2): boom" and rc.samples == []
    assert os.listdir(shm) == []


def test_run_external_times_with_the_given_clock():
    ticks = iter([10.0, 12.5])
    r = run_external(["sh", "-c", "echo out; echo err >&2; exit 3"], clock=lambda: next(ticks))
    assert (r.rc, r.elapsed_s, r.out, r.err) == (3, 2.5, "out\n", "err\n")
    assert r.rss_bytes > 0 and r.cpu_s >= 0


def test_progress_throttles_on_a_terminal():
    clock, out = FakeClock(0.0), io.StringIO()
    p = StatusLine(out, clock=clock, interval=0.2, tty=True)
    p.phase("seqread")
    p.step("seqread round 1/6 blkjobs")
    clock.t = 0.1
    p.update("1.0 MiB")          # too soon: not drawn
    clock.t = 0.25
    p.update("2.0 MiB")
    p.done()
    assert out.getvalue().split("\r") == [
        "", "seqread\x1b[K", "seqread round 1/6 blkjobs\x1b[K",
        "seqread round 1/6 blkjobs  2.0 MiB\x1b[K", "\x1b[K"]


def test_progress_in_a_log_is_one_line_per_phase():
    out = io.StringIO()
    p = StatusLine(out, tty=False)
    p.phase("laying out")
    p.step("round 1")
    p.update("1 MiB")
    p.phase("seqread")
    p.done()
    assert out.getvalue() == "laying out\nseqread\n"
    q = StatusLine(out := io.StringIO(), tty=True, enabled=False)
    q.phase("x")
    assert out.getvalue() == ""


def _rows():
    c = Case("randread", 4096, 2, True)
    r1 = Row(c, "blkjobs", "direct", "bypassed",
             [Sample(4 << 20, 1024, t, 0.01, 20 << 20) for t in (0.5, 0.25, 1.0)])
    r2 = Row(c, "fio", "direct", "bypassed", error="fio failed (exit 1): nope")
    return r1, r2


def test_report_table_and_json_from_known_samples():
    s = Settings(dir="/x", cases=[], repeat=3, warmup=1)
    rows = list(_rows())
    text = report.table(s, rows, ["a note"])
    lines = text.splitlines()
    assert lines[1].split() == ["randread", "4k", "2", "direct", "bypassed", "blkjobs", "1",
                                "8.4", "8.0", "4.2-16.8", "2,048", "0.01", "20", "MiB",
                                "-", "-", "-", "-", "2.38", "-", "-", "-", "-"]
    assert lines[2].split()[:8] == ["randread", "4k", "2", "direct", "bypassed", "fio", "-",
                                    "error:"]
    assert "note: a note" in lines
    doc = report.to_json(s, rows, ["a note"])
    blk, fio = doc["results"]
    assert blk["rank"] == 1 and fio["rank"] is None
    assert blk["summary"]["median_bps"] == (4 << 20) / 0.5
    assert blk["summary"]["median_iops"] == 2048
    assert blk["summary"]["peak_rss_bytes"] == 20 << 20
    assert [r["elapsed_s"] for r in blk["runs"]] == [0.5, 0.25, 1.0]
    assert fio["summary"] is None and fio["error"].startswith("fio failed")
    assert blk["latency"] is None and fio["latency"] is None
    assert report.dumps(doc).endswith("}\n")


def test_summarize_rejects_nothing():
    with pytest.raises(ValueError):
        summarize([])


def test_buffered_and_direct_contenders_are_ranked_apart():
    c = Case("copy", 1 << 20, 1, True)
    d = Case("copy", 1 << 20, 1, False)

    def row(case, tool, io, secs):
        return Row(case, tool, io, "bypassed" if io == "direct" else "page-cache",
                   [Sample(1 << 20, 1, secs, 0.0, 0)])
    rows = [row(c, "blkjobs", "direct", 0.5), row(c, "qemu-img", "direct", 0.25),
            row(c, "cp", "buffered", 0.1), row(c, "nbdcopy", "buffered", 0.2),
            row(d, "blkjobs", "buffered", 1.0),
            Row(c, "dd", "direct", "bypassed", error="dd failed")]
    assert ranks(rows) == [2, 1, 1, 2, 1, None]
    doc = report.to_json(Settings(dir="/x", cases=[]), rows, [])
    assert [r["rank"] for r in doc["results"]] == [2, 1, 1, 2, 1, None]
    text = report.table(Settings(dir="/x", cases=[]), rows, [])
    assert [ln.split()[5:7] for ln in text.splitlines()[1:5]] == \
        [["blkjobs", "2"], ["qemu-img", "1"], ["cp", "1"], ["nbdcopy", "2"]]
    assert "rank: by median MB/s among the rows of the same case and the same io; buffered " \
           "and direct contenders are never ranked together." in text
