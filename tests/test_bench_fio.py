"""fio's row in `bench --compare`: the same job as blkjobs' loops, its
latency read from real fio 3.33 json+ reports (tests/data/fio-*.json, taken
on /var/tmp: ext4 on a virtio disk) and summarised as the C loops' is, its
own disk_util beside our device counters, and the ranking."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from blkjobs.cli.main import main
from blkjobs.diskbench import report
from blkjobs.diskbench.contenders import Fio
from blkjobs.diskbench.devio import DevIO
from blkjobs.diskbench.fiojson import parse_fio
from blkjobs.diskbench.latency import summarize_latency
from blkjobs.diskbench.matrix import Case
from blkjobs.diskbench.measure import ExtResult, ToolError
from blkjobs.diskbench.runner import Row, Settings, ranks, row_latency
from blkjobs.diskbench.stats import Sample
from blkjobs.diskbench.workspace import CacheControl

DATA = Path(__file__).parent / "data"
RANDREAD = DATA / "fio-randread-4k-2jobs.json"   # --numjobs=2 --group_reporting
SEQWRITE = DATA / "fio-seqwrite-1M.json"          # --time_based --runtime=1s


def fio_own(path: Path, rw: str) -> dict:
    return json.loads(path.read_text())["jobs"][0][rw]["clat_ns"]


@pytest.mark.parametrize("path,writes", [(RANDREAD, False), (SEQWRITE, True)])
def test_fio_bins_give_fios_own_percentiles(path, writes):
    f = parse_fio(path.read_text(), writes)
    own = fio_own(path, "write" if writes else "read")
    lat = summarize_latency([f.latency])
    assert lat is not None and lat.requests == own["N"] == f.total_ios
    for p, key in (("p50", "50.000000"), ("p90", "90.000000"), ("p99", "99.000000"),
                   ("p99.9", "99.900000")):
        assert lat.percentiles_ns[p] == own["percentile"][key] == f.percentiles_ns[key]
    assert sum(lat.bucket_count) == own["N"]
    assert abs(lat.mean_ns - own["mean"]) <= own["mean"] / 64


def test_fio_report_figures_and_disk_util():
    f = parse_fio(RANDREAD.read_text(), writes=False)
    assert (f.io_bytes, f.total_ios, f.runtime_ms) == (16 << 20, 4096, 228)
    assert f.disk_util == [{"name": "vda", "read_ios": 2889, "write_ios": 2, "read_merges": 0,
                            "write_merges": 0, "read_ticks": 168, "write_ticks": 0,
                            "in_queue": 168, "util": 39.183673}]
    w = parse_fio(SEQWRITE.read_text(), writes=True)
    assert (w.io_bytes, w.total_ios, w.runtime_ms) == (245366784, 234, 1011)
    assert w.disk_util[0]["write_ios"] == 609 and w.disk_util[0]["util"] == 76.518219
    # notes before the document (fio prints some) are skipped
    assert parse_fio("fio: note\n" + RANDREAD.read_text(), False).total_ios == 4096


@pytest.mark.parametrize("text,msg", [
    ("", "cannot read fio's JSON output: JSONDecodeError("),
    ('{"jobs": []}', "cannot read fio's JSON output: IndexError("),
    ('{"jobs": [{"error": 5, "read": {}}]}', "fio reported error 5"),
])
def test_unreadable_fio_output(text, msg):
    with pytest.raises(ToolError) as e:
        parse_fio(text, False)
    assert str(e.value).startswith(msg)


class FakeEnv:
    data_file = "/d/data.dat"
    size = 64 << 20
    runtime = 0.0
    cache = CacheControl(False)


@pytest.mark.parametrize("workload,threads,tail", [
    ("seqread", 1, ["--size=67108864", "--offset_increment=67108864"]),
    ("seqwrite", 4, ["--size=16777216", "--offset_increment=16777216",
                     "--end_fsync=1", "--scramble_buffers=0"]),
    ("randread", 4, ["--size=67108864", "--io_size=16777216"]),
    ("randwrite", 1, ["--size=67108864", "--io_size=67108864", "--end_fsync=1",
                      "--scramble_buffers=0"]),
])
def test_fio_runs_the_c_loops_job(workload, threads, tail):
    # psync, one job (thread) per blkjobs thread, O_DIRECT as asked, the
    # same region: sequential jobs 1/N of the file each, random jobs 1/N of
    # the requests over all of it with repeats (norandommap), as ioloop.c.
    bs = 1 << 20 if workload.startswith("seq") else 4096
    [argv] = Fio().argv(Case(workload, bs, threads, True), FakeEnv())
    rw = {"seqread": "read", "seqwrite": "write"}.get(workload, workload)
    assert argv == ["fio", "--name=blkjobs-bench", "--filename=/d/data.dat", f"--rw={rw}",
                    f"--bs={bs}", "--direct=1", "--ioengine=psync", "--thread",
                    f"--numjobs={threads}", "--group_reporting", "--output-format=json+",
                    "--invalidate=0", "--randrepeat=0", "--norandommap",
                    "--allow_file_create=0"] + tail


def _fio_sample(path: Path, writes: bool, device: DevIO | None = None) -> Sample:
    res = ExtResult(0, 0.5, 0.1, 8 << 20, path.read_text(), "", (16 << 20, 4096))
    s = Fio().sample(res, Case("randread", 4096, 2, True), FakeEnv()) if not writes else \
        Fio().sample(res, Case("seqwrite", 1 << 20, 1, True), FakeEnv())
    return replace(s, device=device)


def test_fio_row_shows_its_latency_device_and_disk_util():
    c = Case("randread", 4096, 2, True)
    dev = DevIO(17 << 20, 0, 190, 4100, 0, 400.0)
    fio = _fio_sample(RANDREAD, False, dev)
    assert fio.bytes == 16 << 20 and fio.ops == 4096 and fio.elapsed_s == 0.228
    blk = Sample(16 << 20, 4096, 0.25, 0.05, 30 << 20, fio.latency, dev)
    rows = [Row(c, "blkjobs", "direct", "bypassed", [blk]),
            Row(c, "fio", "direct", "bypassed", [fio])]
    s = Settings(dir="/x", cases=[], repeat=1, warmup=0)
    lines = report.table(s, rows, []).splitlines()
    own = fio_own(RANDREAD, "read")["percentile"]
    pct = [report._us(own[k]) for k in ("50.000000", "90.000000", "99.000000", "99.900000")]
    assert pct == ["90.6", "132", "399", "3,588"]
    fio_line = lines[2].split()
    assert fio_line[5:7] == ["fio", "1"] and fio_line[-4:] == pct
    # dev MB, own MB (fio's own block I/O), dev MB/s (device bytes over
    # fio's own runtime), dev util%
    assert fio_line[14:18] == ["17.8", "16.8", "78.2", "48"]
    assert lines[1].split()[5:7] == ["blkjobs", "2"]
    assert "note: fio's own disk_util for randread bs=4k jobs=2 direct (vda): 2,891 ios, " \
           "util 39.2%; device counters over the same runs: 4,100 ios, util 47.5% " \
           "(medians)" in lines
    doc = report.to_json(s, rows, [])
    f = doc["results"][1]
    assert f["latency"]["requests"] == 4096
    assert f["latency"]["percentiles_ns"] == {"p50": own["50.000000"], "p90": own["90.000000"],
                                              "p99": own["99.000000"],
                                              "p99.9": own["99.900000"]}
    assert f["runs"][0]["tool_disk"]["name"] == "vda"
    assert f["runs"][0]["device"] == {"read_bytes": 17 << 20, "write_bytes": 0,
                                      "busy_ms": 190, "read_ios": 4100, "write_ios": 0,
                                      "window_ms": 400.0}
    assert [r["rank"] for r in doc["results"]] == [2, 1]
    assert f["summary"]["median_device_ios"] == 4100
    assert f["summary"]["median_device_util"] == 47.5
    assert f["runs"][0]["block_io"] == {"read_bytes": 16 << 20, "write_bytes": 4096}
    assert f["summary"]["median_block_io_bytes"] == (16 << 20) + 4096


def test_fio_rows_are_ranked_with_blkjobs_by_io():
    c = Case("seqwrite", 1 << 20, 1, True)
    b = Case("seqwrite", 1 << 20, 1, False)
    fio = _fio_sample(SEQWRITE, True)        # 245 MB in 1.011 s
    rows = [Row(c, "blkjobs", "direct", "bypassed", [Sample(245366784, 234, 2.0, 0, 0)]),
            Row(c, "fio", "direct", "bypassed", [fio]),
            Row(b, "fio", "buffered", "page-cache", [fio])]
    assert ranks(rows) == [2, 1, 1]
    lat = row_latency(rows[1])
    assert lat is not None and lat.percentiles_ns["p90"] == 15400960


@pytest.fixture
def disk_dir():
    """A directory on a real disk (not tmpfs): /var/tmp."""
    d = tempfile.mkdtemp(prefix="test-bench-fio.", dir="/var/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_real_fio_row_beside_blkjobs(capsys, disk_dir):
    # a real run on the disk: fio's row has its latency of every request and
    # its disk_util, every row the device counters and its own block I/O
    rc = main(["bench", disk_dir, "-q", "-w", "randread,seqwrite", "-b", "256k", "-j", "1,2",
               "--size", "4M", "--repeat", "2", "--warmup", "0", "--direct", "--compare",
               "fio", "--output", "json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    doc = json.loads(out)
    assert [(r["case"]["workload"], r["case"]["threads"], r["tool"])
            for r in doc["results"]] == [(w, j, t) for w in ("randread", "seqwrite")
                                         for j in (1, 2) for t in ("blkjobs", "fio")]
    for r in doc["results"]:
        assert r["error"] is None, r
        lat = r["latency"]
        assert lat["requests"] == sum(x["ops"] for x in r["runs"]) > 0
        assert sum(lat["histogram"]["count"]) == lat["requests"]
        for run in r["runs"]:
            assert run["device"] is not None
            assert (run["tool_disk"] is not None) == (r["tool"] == "fio")
            # each moved its own workload at the block layer (O_DIRECT:
            # nothing cached), plus what it does besides: a binary's pages,
            # metadata, fio laying out its file first when it finds none
            # (one more pass of the size per job); never the whole device's
            own = run["block_io"]["write_bytes" if r["case"]["workload"] == "seqwrite"
                                  else "read_bytes"]
            assert run["bytes"] <= own <= 5 * run["bytes"] + (16 << 20), (r["tool"], run)
    assert os.listdir(disk_dir) == []


def test_plot_draws_fio_beside_blkjobs():
    # throughput lines and latency CDFs for both tools, fio dashed; the CDF
    # is fio's histogram: it reaches all requests
    from blkjobs.diskbench import plot as plotmod
    calls = []

    class Rec:
        def __getattr__(self, name):
            def f(*a, **kw):
                calls.append((name, a, kw))
                return self
            return f
    c = Case("randread", 4096, 2, True)
    fio = _fio_sample(RANDREAD, False)
    blk = Sample(16 << 20, 4096, 0.25, 0.05, 0, fio.latency)
    rows = [Row(c, "blkjobs", "direct", "bypassed", [blk]),
            Row(c, "fio", "direct", "bypassed", [fio])]
    plotmod.plot(rows, "/nowhere.png", Rec())
    steps = [(kw["label"], kw["linestyle"], a) for n, a, kw in calls if n == "step"]
    assert [(lab, st) for lab, st, _ in steps] == [("randread 4k j2 direct blkjobs", "-"),
                                                   ("randread 4k j2 direct fio", "--")]
    xs, ys = steps[1][2]
    assert ys[-1] == 1.0 and xs == sorted(xs)
    lat = summarize_latency([fio.latency])
    assert xs[0] * 1000 == lat.bucket_low_ns[0]
    lines = [(kw["label"], kw["linestyle"]) for n, a, kw in calls if n == "plot"]
    assert lines == [("randread j2 direct blkjobs", "-"), ("randread j2 direct fio", "--")]
