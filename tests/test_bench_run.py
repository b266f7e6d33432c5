"""blkjobs bench end to end on tmpfs: a tiny matrix in a second or two, the
JSON report's schema, the table, the C loops' accounting, the copy's bytes."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import pytest

from blkjobs.diskbench.matrix import Case, Density
from blkjobs.diskbench.contenders import Blkjobs
from blkjobs.diskbench.workspace import CacheControl, Env, Workspace
from blkjobs.cli.main import main
from blkjobs.errors import OSErrorWithContext
from blkjobs.native.ioloop import IOLoop

TOOLS = ["fio", "dd", "qemu-img", "cp", "nbdcopy"]  # Debian: fio coreutils qemu-utils libnbd-bin


@pytest.fixture
def shm(tmp_path):
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else str(tmp_path)
    d = tempfile.mkdtemp(prefix="test-bench.", dir=base)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def bench_json(capsys, *args):
    rc = main(["bench", *map(str, args), "--output", "json", "-q"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)


NUM = (int, float)
SUMMARY_KEYS = {"runs", "median_bps", "min_bps", "max_bps", "median_mb_s", "median_mib_s",
                "min_mb_s", "max_mb_s", "spread", "median_iops", "median_elapsed_s",
                "median_cpu_s", "peak_rss_bytes", "median_cpu_s_per_gb", "median_device_bps",
                "median_device_read_bytes", "median_device_write_bytes", "median_device_ios",
                "median_device_util", "median_block_io_bytes"}


def check_schema(doc):
    assert doc["schema"] == "blkjobs-bench/1"
    assert set(doc) == {"schema", "settings", "host", "notes", "results"}
    s = doc["settings"]
    assert set(s) == {"dir", "size", "runtime_s", "repeat", "warmup", "cold", "density",
                      "compare", "seed"}
    assert set(s["density"]) == {"data", "zero", "hole"}
    assert set(doc["host"]) == {"kernel", "cpus", "filesystem"}
    assert all(isinstance(n, str) for n in doc["notes"])
    for r in doc["results"]:
        assert set(r) == {"case", "tool", "io", "cache", "rank", "error", "runs", "summary",
                          "latency"}
        lat = r["latency"]
        if r["tool"] in ("blkjobs", "fio") and r["case"]["workload"] != "copy":
            # every request of the measured runs, in non-empty buckets
            assert lat["requests"] == sum(x["ops"] for x in r["runs"])
            assert sum(lat["histogram"]["count"]) == lat["requests"]
            assert all(c > 0 for c in lat["histogram"]["count"])
            lows = lat["histogram"]["bucket_low_ns"]
            assert lows == sorted(set(lows))
            p = lat["percentiles_ns"]
            assert list(p) == ["p50", "p90", "p99", "p99.9"]
            assert 0 < p["p50"] <= p["p90"] <= p["p99"] <= p["p99.9"]
        else:
            assert lat is None
        assert set(r["case"]) == {"workload", "bs", "threads", "direct"}
        assert r["io"] in ("direct", "buffered")
        assert r["cache"] in ("bypassed", "page-cache", "cold:drop_caches", "cold:fadvise")
        assert r["cache"] == "bypassed" if r["io"] == "direct" else r["cache"] != "bypassed"
        assert (r["rank"] is None) == (r["summary"] is None)
        summed: dict[int, int] = {}
        for run in r["runs"]:
            assert set(run) == {"bytes", "ops", "elapsed_s", "cpu_s", "peak_rss_bytes",
                                "device", "tool_disk", "block_io", "latency"}
            rl = run.pop("latency")
            if lat is None:
                assert rl is None
            else:   # each run's own histogram; the row's is their sum
                assert rl["requests"] == run["ops"] == sum(rl["histogram"]["count"])
                assert list(rl["percentiles_ns"]) == ["p50", "p90", "p99", "p99.9"]
                for low, c in zip(rl["histogram"]["bucket_low_ns"], rl["histogram"]["count"],
                                  strict=True):
                    summed[low] = summed.get(low, 0) + c
            bio = run.pop("block_io")
            assert set(bio) == {"read_bytes", "write_bytes"} and min(bio.values()) >= 0
            dev = run.pop("device")
            tool_disk = run.pop("tool_disk")
            assert tool_disk is None or r["tool"] == "fio"   # fio's disk_util, on a disk
            assert dev is None or (set(dev) == {"read_bytes", "write_bytes", "busy_ms",
                                                "read_ios", "write_ios", "window_ms"} and
                                   all(isinstance(v, NUM) and v >= 0 for v in dev.values()))
            assert all(isinstance(v, NUM) for v in run.values())
            assert run["elapsed_s"] > 0 and run["bytes"] > 0
        if lat is not None:
            assert summed == dict(zip(lat["histogram"]["bucket_low_ns"],
                                      lat["histogram"]["count"], strict=True))
        if r["error"] is None:
            assert set(r["summary"]) == SUMMARY_KEYS
            assert r["summary"]["runs"] == len(r["runs"]) == s["repeat"]
            sm = r["summary"]
            assert sm["min_bps"] <= sm["median_bps"] <= sm["max_bps"]
            assert sm["median_mib_s"] == pytest.approx(sm["median_bps"] / 2**20)
            assert sm["median_mb_s"] == pytest.approx(sm["median_bps"] / 1e6)


def test_tiny_matrix_json(capsys, shm):
    doc = bench_json(capsys, shm, "-w", "seqread,seqwrite,randread,randwrite,copy",
                     "-b", "64k", "-j", "1,2", "--size", "2M", "--repeat", "2",
                     "--warmup", "1", "--density", "data=40,zero=30,hole=30")
    check_schema(doc)
    assert os.listdir(shm) == []  # everything it made is gone
    res = doc["results"]
    assert [(r["case"]["workload"], r["case"]["threads"]) for r in res] == [
        (w, j) for w in ("seqread", "seqwrite", "randread", "randwrite", "copy") for j in (1, 2)]
    assert all(r["tool"] == "blkjobs" and r["error"] is None for r in res)
    for r in res:
        bs = r["case"]["bs"]
        assert bs == (4096 if r["case"]["workload"].startswith("rand") else 65536)
        for run in r["runs"]:
            assert run["bytes"] == 2 << 20  # one pass over --size
            if r["case"]["workload"] != "copy":
                assert run["ops"] == (2 << 20) // bs
            assert run["peak_rss_bytes"] > 0 and run["cpu_s"] >= 0
    assert doc["settings"]["density"] == {"data": 40, "zero": 30, "hole": 30}
    assert doc["host"]["filesystem"]


def test_compare_tools_in_the_same_table(capsys, shm):
    doc = bench_json(capsys, shm, "-w", "seqread,seqwrite,randread,copy", "-b", "256k",
                     "--size", "2M", "--repeat", "1", "--warmup", "0", "--compare")
    check_schema(doc)
    by = {(r["case"]["workload"], r["tool"]): r for r in doc["results"]}
    for r in doc["results"]:
        assert r["error"] is None, r
    assert {t for (w, t) in by if w == "seqread"} == {"blkjobs", "fio", "dd", "qemu-img"}
    assert {t for (w, t) in by if w == "randread"} == {"blkjobs", "fio"}
    assert {t for (w, t) in by if w == "copy"} == {"blkjobs", "dd", "qemu-img", "cp", "nbdcopy"}
    assert by[("seqread", "fio")]["runs"][0]["bytes"] == 2 << 20
    assert by[("copy", "cp")]["io"] == "buffered"
    assert "fio: no copy workload" in doc["notes"]
    assert os.listdir(shm) == []


def test_human_table(capsys, shm):
    rc = main(["bench", shm, "-w", "seqread,randwrite", "-b", "64k", "--size", "1M",
               "--repeat", "2", "--warmup", "0", "-q", "--direct=0"])
    out, err = capsys.readouterr()
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["workload", "bs", "jobs", "io", "cache", "tool", "rank", "MB/s",
                                "MiB/s", "min-max", "MB/s", "IOPS", "CPU", "s", "peak", "RSS",
                                "dev", "MB", "own", "MB", "dev", "MB/s", "dev", "util%", "CPU",
                                "s/GB",
                                "p50", "p90", "p99", "p99.9"]
    seq = next(line for line in lines if line.startswith("seqread"))
    assert seq.split()[:7] == ["seqread", "64k", "1", "buffered", "page-cache", "blkjobs", "1"]
    rnd = next(line for line in lines if line.startswith("randwrite"))
    assert rnd.split()[10] != "-"  # IOPS for small requests
    p50, p90, p99, p999 = (float(x.replace(",", "")) for x in rnd.split()[-4:])
    assert 0 < p50 <= p90 <= p99 <= p999
    assert "p50..p99.9: per-request latency in microseconds (issue to completion), " \
           "percentiles over all measured runs; fio's from its clat histogram, computed " \
           "alike." in lines
    assert "page-cache: buffered runs on a warm cache measure what the page cache absorbed " \
           "or served, not the disk (--cold evicts it before every run)." in lines
    assert "MB/s = 10^6 bytes/s, MiB/s = 2^20 bytes/s: the median of 2 runs" in out
    assert "Writes include the final fsync." in out


def test_progress_lines_go_to_stderr(capsys, shm):
    rc = main(["bench", shm, "-w", "seqread", "-b", "64k", "--size", "1M", "--repeat", "1",
               "--warmup", "0", "--output", "json", "--direct=0"])
    out, err = capsys.readouterr()
    assert rc == 0
    json.loads(out)  # stdout is only the document
    assert "laying out 1.0 MiB test file" in err
    assert "seqread bs=64k jobs=1 buffered" in err


def test_cold_without_drop_caches_says_so(capsys, shm):
    cache = CacheControl(False)
    cache.cold, cache.method = True, "fadvise"
    assert cache.label(False) == "cold:fadvise"
    assert cache.label(True) == "bypassed"
    assert "posix_fadvise(DONTNEED)" in cache.note()
    p = os.path.join(shm, "f")
    with open(p, "wb") as f:
        f.write(b"x" * 8192)
    cache.before_run([p, os.path.join(shm, "missing")])  # evicts, tolerates absence


def _file(path, size, byte=b"\0"):
    with open(path, "wb") as f:
        f.write(byte * size)


def test_ioloop_counts_and_budgets(shm):
    p = os.path.join(shm, "f")
    _file(p, 1 << 20)
    fd = os.open(p, os.O_RDWR)
    try:
        with IOLoop(fd, write=False, random=False, bs=4096, size=1 << 20, threads=3) as loop:
            assert loop.result().elapsed_ns == 0  # nothing before run()
            r = loop.run()
        assert (r.bytes, r.ops, r.fsync_ns) == (1 << 20, 256, 0)
        assert r.elapsed_ns > 0
        with IOLoop(fd, write=True, random=True, bs=4096, size=1 << 20, threads=2,
                    nbytes=40960) as loop:
            r = loop.run()
        assert (r.bytes, r.ops) == (40960, 10)
        # a time budget with no byte budget: the stream wraps until time is up
        with IOLoop(fd, write=False, random=False, bs=65536, size=1 << 20, threads=1,
                    runtime_s=0.02) as loop:
            r = loop.run(slice_s=0.005)
        assert r.ops > 0 and r.bytes == r.ops * 65536
    finally:
        os.close(fd)
    with open(p, "rb") as f:
        data = f.read()
    assert len(data) == 1 << 20 and data.count(0) < len(data)  # random writes landed


def test_ioloop_writes_patterned_data_sequentially(shm):
    p = os.path.join(shm, "f")
    _file(p, 256 << 10)
    fd = os.open(p, os.O_RDWR)
    try:
        with IOLoop(fd, write=True, random=False, bs=65536, size=256 << 10, threads=2) as loop:
            r = loop.run()
    finally:
        os.close(fd)
    assert (r.bytes, r.ops) == (256 << 10, 4)
    data = open(p, "rb").read()
    assert all(data[i:i + 4096].count(0) < 4096 for i in range(0, len(data), 4096))


def test_ioloop_error_names_the_offset(shm):
    p = os.path.join(shm, "short")
    _file(p, 12288)  # 3 blocks; the region claims 4
    fd = os.open(p, os.O_RDONLY)
    try:
        with IOLoop(fd, write=False, random=False, bs=4096, size=16384, threads=1,
                    path=p) as loop:
            with pytest.raises(OSErrorWithContext) as e:
                loop.run()
    finally:
        os.close(fd)
    assert e.value.offset == 12288
    assert "benchmark read" in str(e.value) and "at offset 12288" in str(e.value)


def test_ioloop_rejects_bad_options(shm):
    from blkjobs.errors import UsageError
    with pytest.raises(UsageError):
        IOLoop(0, write=False, random=False, bs=100, size=4096)
    with pytest.raises(UsageError):
        IOLoop(0, write=False, random=False, bs=4096, size=1024)
    with pytest.raises(UsageError):
        IOLoop(0, write=False, random=False, bs=4096, size=8192, threads=0)


def test_copy_workload_copies_the_image(shm):
    ws = Workspace(shm, keep=False)
    try:
        env = Env(ws, 4 << 20, 0.0, Density(40, 30, 30), CacheControl(False),
                  clock=__import__("time").monotonic)
        env.layout_image()
        sample = Blkjobs().run(Case("copy", 65536, 2, False), env, lambda d, o: None)
        assert sample.bytes == 4 << 20
        src = open(env.src_image, "rb").read()
        dst = open(env.dst_image("blkjobs"), "rb").read()
        assert src == dst
        assert src.count(0) not in (0, len(src))  # it has data and zeroes
        st = os.stat(env.src_image)
        assert st.st_blocks * 512 < 4 << 20  # and holes
    finally:
        ws.cleanup()
    assert os.listdir(shm) == []


def test_density_all_holes_allocates_nothing(shm):
    ws = Workspace(shm)
    try:
        env = Env(ws, 4 << 20, 0.0, Density(0, 0, 100), CacheControl(False), clock=lambda: 0)
        env.layout_image()
        assert os.stat(env.src_image).st_size == 4 << 20
        assert os.stat(env.src_image).st_blocks == 0
    finally:
        ws.cleanup()


def test_keep_leaves_the_files(capsys, shm):
    doc = bench_json(capsys, shm, "-w", "seqread", "-b", "64k", "--size", "1M",
                     "--repeat", "1", "--warmup", "0", "--keep")
    kept = [n for n in doc["notes"] if n.startswith("files kept in ")]
    assert kept
    path = kept[0][len("files kept in "):]
    assert os.listdir(path) == ["data.dat"]


def test_plot_with_a_recording_pyplot(shm, capsys, monkeypatch):
    # The drawing code runs against a stand-in pyplot that records calls
    # (matplotlib is an optional extra, not installed in CI).
    from blkjobs.diskbench import plot as plotmod
    calls = []

    class Rec:
        def __getattr__(self, name):
            def f(*a, **kw):
                calls.append((name, a, kw))
                return self if name != "subplots" else (self, self)
            return f

    monkeypatch.setattr(plotmod, "load_pyplot", lambda: Rec())
    png = os.path.join(shm, "out.png")
    rc = main(["bench", shm, "-w", "seqread", "-b", "64k", "--size", "1M", "--repeat", "2",
               "--warmup", "0", "-q", "--plot", png, "--direct"])
    out, _ = capsys.readouterr()
    assert rc == 0
    names = [c[0] for c in calls]
    assert names[:2] == ["figure", "add_subplot"] and ("savefig", (png,), {}) in calls
    lines = [c for c in calls if c[0] == "plot"]
    assert [c[1][0] for c in lines] == [[65536]]          # one series, at 64k
    assert lines[0][1][1][0] > 0 and lines[0][2]["label"] == "seqread j1 direct blkjobs"
    assert lines[0][2]["linestyle"] == "-"
    steps = [c for c in calls if c[0] == "step"]
    assert len(steps) == 1 and steps[0][1][1][-1] == 1.0   # the CDF reaches all requests
    xs = steps[0][1][0]
    assert xs == sorted(xs) and xs[0] > 0
    assert f"note: plot written to {png}" in out


def written_blocks(path, bs):
    data = open(path, "rb").read()
    return {i for i in range(len(data) // bs) if data[i * bs:(i + 1) * bs] != bytes(bs)}


def test_random_runs_draw_their_own_offsets(shm):
    # every run of a bench has its own offsets, as fio's (randrepeat=0):
    # a measured run does not repeat the warm-up's requests; a bench with
    # the same --seed repeats the same runs
    def runs(n):
        ws = Workspace(shm)
        try:
            env = Env(ws, 1 << 20, 0.0, Density(), CacheControl(False), clock=lambda: 0,
                      seed=7)
            blk, out = Blkjobs(), []
            for _ in range(n):
                with open(env.data_file, "wb") as f:
                    f.truncate(1 << 20)         # zeroes: what a run writes shows
                s = blk.run(Case("randwrite", 4096, 1, False), env, lambda d, o: None)
                assert s.ops == 256
                out.append(written_blocks(env.data_file, 4096))
            return out
        finally:
            ws.cleanup()
    first, second, third = runs(3)
    # 256 uniform draws over 256 blocks touch about 63% of them; two runs
    # with the same offsets would touch the same set
    assert 120 < len(first) < 200 and first != second != third != first
    assert runs(1) == [first]


def test_ioloop_neighbouring_seeds_draw_different_offsets(shm):
    # the C loop used to OR its state with 1, so seeds 2 and 3 (and any
    # 2k, 2k+1) drew the same offsets
    path = os.path.join(shm, "f")
    sets = []
    for seed in (2, 3):
        with open(path, "wb") as f:
            f.truncate(1 << 20)
        fd = os.open(path, os.O_RDWR)
        try:
            with IOLoop(fd, write=True, random=True, bs=4096, size=1 << 20, seed=seed) as loop:
                assert loop.run().ops == 256
        finally:
            os.close(fd)
        sets.append(written_blocks(path, 4096))
    assert 120 < len(sets[0]) < 200 and sets[0] != sets[1]
