"""blkjobs bench: option parsing and the one-line errors (DIR missing,
read-only, too small, O_DIRECT refused, matplotlib missing)."""
from __future__ import annotations

import errno
import json
import os

import pytest

from blkjobs.diskbench import matrix, workspace
from blkjobs.diskbench.matrix import Case, Density, parse_density, parse_matrix
from blkjobs.diskbench.contenders import parse_compare
from blkjobs.diskbench.sizes import format_size
from blkjobs.cli.main import main
from blkjobs.errors import UsageError


@pytest.fixture
def shm(tmp_path_factory):
    """A directory on tmpfs (/dev/shm) when there is one, else tmp_path."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    import tempfile
    d = tempfile.mkdtemp(prefix="test-bench.", dir=base or str(tmp_path_factory.mktemp("b")))
    yield d
    import shutil
    shutil.rmtree(d, ignore_errors=True)


def bench(capsys, *args):
    rc = main(["bench", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_format_size():
    assert [format_size(n) for n in (512, 4096, 1 << 20, 1536, 3 << 30)] == \
        ["512", "4k", "1M", "1.5k", "3G"]


def test_density():
    assert parse_density("data=30,zero=20,hole=50") == Density(30, 20, 50)
    assert parse_density("data=100") == Density(100, 0, 0)
    for bad, msg in [("data=30,zero=20", "add up to 50"), ("data=30,foo=70", "expected"),
                     ("data=x,hole=100", "not a percentage"), ("data=130", "not in 0..100"),
                     ("data=50,data=50", "expected")]:
        with pytest.raises(UsageError, match=msg):
            parse_density(bad)


def test_matrix_random_uses_rand_bs():
    cases = parse_matrix("seqread,randwrite,copy", "4k,1M", "1,4", "0,1", "4k")
    assert Case("seqread", 4096, 1, False) in cases
    assert Case("seqread", 1 << 20, 4, True) in cases
    assert {c.bs for c in cases if c.workload == "randwrite"} == {4096}
    assert len(cases) == 2 * 2 * 2 + 1 * 2 * 2 + 2 * 2 * 2
    assert parse_matrix("read", "1M", "1", "1", "4k") == [Case("seqread", 1 << 20, 1, True)]


@pytest.mark.parametrize("args,msg", [
    (["-w", "bogus"], "unknown workload 'bogus'"),
    (["-b", "1000"], "must be a multiple of 512"),
    (["-j", "0"], "invalid thread count 0"),
    (["-j", "two"], "invalid thread count 'two'"),
    (["--direct=2"], "invalid --direct value '2'"),
    (["--size", "1k", "-b", "4k"], "smaller than the largest request size"),
    (["--runtime", "soon"], "invalid --runtime 'soon'"),
    (["--runtime", "0"], "must be > 0"),
    (["--repeat", "0"], "invalid --repeat 0"),
    (["--warmup", "-1"], "invalid --warmup -1"),
    (["--compare", "rsync"], "unknown --compare tool 'rsync'"),
    (["--density", "data=10"], "add up to 10"),
])
def test_cli_usage_errors(capsys, shm, args, msg):
    rc, out, err = bench(capsys, shm, *args)
    assert rc == 1
    assert out == ""
    assert msg in err
    assert len(err.strip().splitlines()) == 1
    assert os.listdir(shm) == []


def test_argparse_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--output", "xml"])
    assert e.value.code == 1
    assert "invalid choice: 'xml'" in capsys.readouterr().err


def test_compare_list():
    assert parse_compare(None) == []
    assert parse_compare("all") == ["fio", "dd", "qemu-img", "cp", "nbdcopy"]
    assert parse_compare("dd,fio,dd") == ["dd", "fio"]


def test_missing_dir(capsys, shm):
    rc, out, err = bench(capsys, os.path.join(shm, "nope"), "-q")
    assert rc == 1 and out == ""
    assert err.strip() == f"blkjobs: bench directory '{shm}/nope' does not exist"


def test_not_a_directory(capsys, shm):
    f = os.path.join(shm, "file")
    open(f, "w").close()
    rc, _, err = bench(capsys, f, "-q")
    assert rc == 1
    assert "is not a directory" in err


def test_read_only_dir(capsys, shm, monkeypatch):
    # root writes through mode 0555, so the refusal of a read-only mount is
    # injected where the workspace is created.
    def refuse(*a, **kw):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(workspace.tempfile, "mkdtemp", refuse)
    rc, out, err = bench(capsys, shm, "-q", "-w", "seqread", "--size", "1M")
    assert rc == 1 and out == ""
    assert err.strip() == f"blkjobs: cannot write in '{shm}': read-only file system"


def test_dir_too_small(capsys, shm, monkeypatch):
    real = os.statvfs

    class Small:
        def __init__(self, st):
            self.f_frsize = st.f_frsize
            self.f_bavail = (8 << 20) // st.f_frsize

    monkeypatch.setattr(workspace.os, "statvfs", lambda p: Small(real(p)))
    rc, out, err = bench(capsys, shm, "-q", "-w", "seqread,copy", "--size", "64M")
    assert rc == 1 and out == ""
    # 64M data file + 60% of 64M source + a 64M target + 16M headroom
    assert "not enough free space in" in err
    assert "needs 182.4 MiB, 8.0 MiB available (use a smaller --size)" in err
    assert os.listdir(shm) == []  # nothing written, scratch dir removed


def test_direct_refused(capsys, shm, monkeypatch):
    # tmpfs takes O_DIRECT since Linux 6.6; older kernels, FUSE and some
    # network file systems answer EINVAL: injected here so that the message
    # is tested on every kernel.
    real_open = os.open

    def fake_open(path, flags, *a, **kw):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        return real_open(path, flags, *a, **kw)
    monkeypatch.setattr(workspace.os, "open", fake_open)
    rc, out, err = bench(capsys, shm, "-q", "--direct", "-w", "seqread", "--size", "1M")
    assert rc == 1 and out == ""
    assert f"the file system of '{shm}' refuses O_DIRECT (Invalid argument): run without " \
           "--direct" in err
    assert os.listdir(shm) == []


def test_direct_on_tmpfs_runs_or_says_why(capsys, shm):
    # The real kernel decides: either the run works, or the message is clear.
    rc, out, err = bench(capsys, shm, "-q", "--direct", "-w", "seqread", "--size", "1M",
                         "-b", "64k", "--repeat", "1", "--warmup", "0")
    if rc == 0:
        assert "direct" in out and "bypassed" in out
    else:
        assert "refuses O_DIRECT" in err
    assert os.listdir(shm) == []


def test_plot_without_matplotlib(capsys, shm, monkeypatch):
    import importlib
    real = importlib.import_module

    def no_mpl(name, *a):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *a)
    monkeypatch.setattr(importlib, "import_module", no_mpl)
    rc, out, err = bench(capsys, shm, "-q", "--plot", os.path.join(shm, "x.png"))
    assert rc == 1 and out == ""
    assert "--plot needs matplotlib: pip install 'blkjobs[plot]'" in err
    assert os.listdir(shm) == []  # failed before any I/O


def test_workload_table_is_complete():
    assert set(matrix.WORKLOADS) == {"seqread", "seqwrite", "randread", "randwrite", "copy"}


def test_optional_values_do_not_swallow_dir(shm):
    from blkjobs.cli.cmd_bench import settings_from_args
    from blkjobs.cli.main import build_parser
    p = build_parser()
    s = settings_from_args(p.parse_args(["bench", "--direct", shm, "-w", "seqread"]))
    assert s.dir == shm and all(c.direct for c in s.cases)
    s = settings_from_args(p.parse_args(["bench", "-w", "copy", "--compare", shm]))
    assert s.dir == shm and s.compare == ["fio", "dd", "qemu-img", "cp", "nbdcopy"]
    s = settings_from_args(p.parse_args(["bench", shm, "--direct=0,1", "--compare", "dd"]))
    assert s.dir == shm and s.compare == ["dd"]
    assert {c.direct for c in s.cases} == {False, True}


def test_default_measures_the_disk_with_o_direct(capsys, shm):
    # tmpfs takes O_DIRECT since Linux 6.6: the default then bypasses the cache.
    ws = workspace.Workspace(shm)
    refused = ws.direct_refused()
    ws.cleanup()
    rc, out, err = bench(capsys, shm, "-q", "-w", "seqread,seqwrite", "--size", "1M", "-b",
                         "64k", "--repeat", "1", "--warmup", "0", "--output", "json")
    assert rc == 0, err
    doc = json.loads(out)
    if refused is None:
        assert [(r["io"], r["cache"]) for r in doc["results"]] == [("direct", "bypassed")] * 2
        assert doc["settings"]["cold"] is False
    else:
        assert {r["cache"] for r in doc["results"]} <= {"cold:fadvise", "cold:drop_caches"}
    assert os.listdir(shm) == []


def test_default_falls_back_to_a_cold_cache_where_o_direct_is_refused(capsys, shm,
                                                                      monkeypatch):
    real_open = os.open

    def fake_open(path, flags, *a, **kw):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        return real_open(path, flags, *a, **kw)
    monkeypatch.setattr(workspace.os, "open", fake_open)
    rc, out, err = bench(capsys, shm, "-q", "-w", "seqread,randread", "--size", "1M", "-b",
                         "64k", "--repeat", "1", "--warmup", "0", "--output", "json")
    assert rc == 0, err
    doc = json.loads(out)
    rows = doc["results"]
    assert [r["case"]["workload"] for r in rows] == ["seqread", "randread"]
    assert all(r["io"] == "buffered" and not r["case"]["direct"] for r in rows)
    cold = "cold:drop_caches" if os.geteuid() == 0 else "cold:fadvise"
    assert {r["cache"] for r in rows} <= {cold, "cold:fadvise"}
    assert doc["settings"]["cold"] is True
    assert f"the file system of '{shm}' refuses O_DIRECT (Invalid argument): measured " \
           "buffered with a cold cache instead (the files' pages evicted before every run)" \
           in doc["notes"]
    assert os.listdir(shm) == []


@pytest.mark.parametrize("gone, text", [
    ({"psutil"}, "psutil"), ({"numpy", "psutil"}, "numpy and psutil")])
def test_bench_without_its_extra(capsys, shm, monkeypatch, gone, text):
    import importlib.util
    real = importlib.util.find_spec

    def find_spec(name, *a):
        return None if name in gone else real(name, *a)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    rc, out, err = bench(capsys, shm, "-q", "-w", "seqread", "--size", "1M")
    assert (rc, out, err) == (1, "", f"blkjobs: bench needs {text}: pip install "
                                     "'blkjobs[bench]'\n")
    assert os.listdir(shm) == []
