"""measure, resize, snapshot, amend, dd: each against qemu-img's own output
(text byte for byte, with our program name as the prefix; images by
qemu-img check/compare/map)."""
from __future__ import annotations

import json
import random
import subprocess

import pytest

from blkjobs.cli.main import main as cli_main
from conftest import run_blkjobs, run_blkjobs_in_process
from qemu_oracle import check_clean, qemu_dirty, qemu_img, qemu_io


def _ours(cwd, args):
    import sys
    p = subprocess.run([sys.executable, "-m", "blkjobs", *map(str, args)], capture_output=True,
                       text=True, cwd=cwd, timeout=300)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def _theirs(cwd, args):
    p = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                       timeout=300)
    err = "".join(("blkjobs:" + ln[len("qemu-img:"):]) if ln.startswith("qemu-img:") else ln
                  for ln in p.stderr.splitlines(True)).replace("'qemu-img --help'",
                                                               "'blkjobs --help'")
    return p.returncode, p.stdout, err


def same(cwd, *args):
    """Run ``blkjobs ARGS`` and ``qemu-img ARGS`` in ``cwd``: same exit
    status, stdout and stderr (prefix ours). Returns our stdout."""
    ours = _ours(cwd, args)
    assert (ours.returncode, ours.stdout, ours.stderr) == _theirs(cwd, args), args
    return ours.stdout


def same_ours_in_process(capsys, cwd, *args):
    """``same``, ours in-process (conftest.run_blkjobs_in_process)."""
    ours = run_blkjobs_in_process(capsys, *args, cwd=cwd)
    assert (ours.returncode, ours.stdout, ours.stderr) == _theirs(cwd, args), args
    return ours.stdout


def same_in_process(cwd, capsys, monkeypatch, *args):
    """``same``, ours through the command line's main() in this process
    (exit status, stdout and stderr as the process would give them): for
    the loops of many commands whose outputs are what is compared (an
    interpreter start-up costs more than most of them)."""
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.chdir(cwd)
        rc = cli_main([*map(str, args)])
    out, err = capsys.readouterr()
    assert (rc, out, err) == _theirs(cwd, args), args
    return out


# ---------------------------------------------------------------------------
# measure

@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("measure")
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4k", d / "s1.qcow2", "100M")
    qemu_io(d / "s1.qcow2", "write -P 1 0 100k", "write -P 2 5M 1k", "write -z 10M 1M",
            "write -P 3 50M 3M")
    qemu_img("create", "-f", "qcow2", "-b", "s1.qcow2", "-F", "qcow2", d / "s2.qcow2")
    qemu_io(d / "s2.qcow2", "write -P 4 70M 100k", "write -z 0 64k")
    rnd = random.Random(3)
    with open(d / "s3.raw", "wb") as f:
        f.truncate((33 << 20) + 512)
        for _ in range(40):
            f.seek(rnd.randrange(0, 33 << 20))
            f.write(rnd.randbytes(rnd.randrange(1, 200000)))
    (d / "empty.raw").write_bytes(b"")
    (d / "odd.raw").write_bytes(random.Random(5).randbytes(100001))
    qemu_img("create", "-f", "qcow2", d / "bm.qcow2", "1G")
    qemu_img("bitmap", "--add", d / "bm.qcow2", "b0")
    qemu_img("bitmap", "--add", "-g", "512", d / "bm.qcow2", "a-much-longer-bitmap-name")
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", d / "v2.qcow2", "5M")
    return d


SOURCES = ["-f qcow2 s1.qcow2", "-f qcow2 s2.qcow2", "-f raw s3.raw", "s3.raw", "empty.raw",
           "bm.qcow2", "v2.qcow2", "odd.raw", "--size 0", "--size 1", "--size 511", "--size 10G",
           "--size 3T", "--size 65537"]
TARGET_OPTS = ["", "-o cluster_size=512", "-o cluster_size=4k", "-o cluster_size=2M",
               "-o cluster_size=16k,extended_l2=on", "-o refcount_bits=1",
               "-o refcount_bits=64,cluster_size=1k", "-o compat=0.10",
               "-o preallocation=full", "-o preallocation=metadata", "-o backing_file=x"]


@pytest.mark.parametrize("src", SOURCES)
def test_measure_qcow2_numbers_equal_qemu_img(sources, src, capsys, monkeypatch):
    """Each source with each target's options: the first as a real process,
    the others in-process (154 start-ups were most of the CPU of ours)."""
    for i, opts in enumerate(TARGET_OPTS):
        out = "human" if i % 3 == 0 else "json"
        args = ["measure", "-O", "qcow2", *opts.split(), *src.split(), "--output", out]
        if i == 0:
            same(sources, *args)
        else:
            same_in_process(sources, capsys, monkeypatch, *args)


@pytest.mark.parametrize("src", ["--size 1G", "--size 1000", "s3.raw", "-f qcow2 s2.qcow2",
                                 "empty.raw", "odd.raw"])
def test_measure_raw_equals_qemu_img(sources, src, capsys):
    """The first command of each source as a real process, the others in-process."""
    for out in ("human", "json"):
        if out == "human":
            same(sources, "measure", *src.split(), "--output", out)
        else:
            same_ours_in_process(capsys, sources, "measure", *src.split(), "--output", out)
        same_ours_in_process(capsys, sources, "measure", "-O", "raw", "-o", "preallocation=full",
                             *src.split(), "--output", out)


def test_measure_bitmaps_size_is_shown(sources):
    out = json.loads(same(sources, "measure", "-O", "qcow2", "bm.qcow2", "--output", "json"))
    assert out["bitmaps"] > 0


MEASURE_ERRORS = [
    "", "--size 1G s3.raw", "s3.raw s1.qcow2", "-O qcow2 --size abc", "-O qcow2 --size -5",
    "-O qcow2 nonexist", "-O qcow2 --size 100T -o cluster_size=512",
    "-O qcow2 --size 1G -o cluster_size=3k", "-O qcow2 --size 1G -o cluster_size=abc",
    "-O qcow2 --size 1G -o refcount_bits=3", "-O qcow2 --size 1G -o refcount_bits=8,compat=0.10",
    "-O qcow2 --size 1G -o preallocation=bogus", "-O raw --size 1G -o cluster_size=4k",
    "-O qcow2 --size 1G -o extended_l2=on,cluster_size=4k",
    "-O qcow2 --size 1G -o extended_l2=maybe", "-O qcow2 --size 1G -o foo=1",
    "-O qcow2 --size 1G -o compat=1.5", "-O qcow2 --size 1G --output=foo", "-O foo --size 1G",
    "-O qcow2 -f qcow2 s3.raw", "-O qcow2 --size 10GB", "-O qcow2 --size 10E",
    "-O qcow2 --size 1.3k", "-O qcow2 --size 1G -o cluster_size=99999999999999999999",
    "-O qcow2 --size 1G -o cluster_size=64KiB"]


@pytest.mark.parametrize("args", MEASURE_ERRORS)
def test_measure_errors_as_qemu_img(sources, args, capsys):
    """The first case as a real process, the others in-process."""
    if args == MEASURE_ERRORS[0]:
        same(sources, "measure", *args.split())
    else:
        same_ours_in_process(capsys, sources, "measure", *args.split())


# ---------------------------------------------------------------------------
# resize

def _pair(tmp_path, name, fmt, size, opts=(), writes=()):
    """Two equal images ``name`` and ``name.ref`` (ours / qemu-img's)."""
    a, b = tmp_path / name, tmp_path / (name + ".ref")
    qemu_img("create", "-q", "-f", fmt, *opts, a, size)
    if writes:
        qemu_io(a, *writes, fmt=fmt)
    subprocess.run(["cp", "--sparse=never", a, b], check=True)
    return a, b


def _map_no_offsets(path, fmt):
    m = json.loads(qemu_img("map", "-f", fmt, "--output", "json", path).stdout)
    for e in m:
        e.pop("offset", None)
    return m


WRITES = ("write -P 1 0 1M", "write -P 2 2999000 10k", "write -P 3 9M 500000",
          "write -z 5M 64k")


@pytest.mark.parametrize("opts", ["cluster_size=512", "cluster_size=64k",
                                  "cluster_size=16k,extended_l2=on", "compat=0.10",
                                  "cluster_size=1k,refcount_bits=1"])
@pytest.mark.parametrize("op", ["+100M", "--shrink 3M", "+1536", "20000512", "--shrink 512"])
def test_resize_qcow2_like_qemu_img(tmp_path, opts, op):
    a, b = _pair(tmp_path, "x.qcow2", "qcow2", "10000384", ("-o", opts), WRITES)
    ours = _ours(tmp_path, ["resize", a.name, *op.split()])
    theirs = _theirs(tmp_path, ["resize", b.name, *op.split()])
    assert (ours.returncode, ours.stdout, ours.stderr) == theirs
    check_clean(a)
    assert qemu_img("compare", a, b, check=False).returncode == 0
    assert _map_no_offsets(a, "qcow2") == _map_no_offsets(b, "qcow2")
    assert json.loads(qemu_img("info", "--output", "json", a).stdout)["virtual-size"] == \
        json.loads(qemu_img("info", "--output", "json", b).stdout)["virtual-size"]
    if op.startswith("--shrink"):      # the file is cut after its last used cluster
        assert a.stat().st_size <= b.stat().st_size + 65536
    # and grows again cleanly (with qemu-img) to the same data
    for p in (a, b):
        qemu_img("resize", "-q", p, "+5M")
    assert qemu_img("compare", a, b, check=False).returncode == 0
    check_clean(a)


def test_resize_qcow2_grow_reads_zeroes_past_the_old_end(tmp_path):
    """A cluster cut through by a shrink still holds old data past the end;
    growing again must not bring it back (reads zeroes)."""
    img = tmp_path / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    qemu_io(img, "write -P 0xab 0 1M")
    qemu_img("resize", "-q", "--shrink", img, "66048")      # 64k + 512: mid-cluster
    run_blkjobs("resize", img, "1M", check=True)
    check_clean(img)
    raw = tmp_path / "t.raw"
    qemu_img("convert", "-O", "raw", img, raw)
    data = raw.read_bytes()
    assert data[:66048] == b"\xab" * 66048 and data[66048:] == bytes((1 << 20) - 66048)


def test_resize_qcow2_grows_the_l1_table(tmp_path):
    img = tmp_path / "g.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, "1M")
    qemu_io(img, "write -P 7 0 64k", "write -P 8 1000k 24k")
    run_blkjobs("resize", img, "+200M", check=True)
    check_clean(img)
    info = json.loads(qemu_img("info", "--output", "json", img).stdout)
    assert info["virtual-size"] == (1 << 20) + (200 << 20)
    qemu_io(img, "write -P 9 200M 1M", "read -P 8 1000k 24k", "read -P 0 1M 1M")
    check_clean(img)


@pytest.fixture(scope="module")
def resize_inputs(tmp_path_factory):
    """r.raw and q.qcow2 as qemu-img and qemu-io make them, once per module
    (each case copies them twice)."""
    w = tmp_path_factory.mktemp("resize")
    qemu_img("create", "-q", "-f", "raw", w / "r.raw", "10M")
    qemu_io(w / "r.raw", "write -P 5 0 10M", fmt="raw")
    qemu_img("create", "-q", "-f", "qcow2", w / "q.qcow2", "10M")
    qemu_io(w / "q.qcow2", "write -P 6 1M 8M")
    return w


RESIZE_CASES = [
    "r.raw 5M", "--shrink r.raw 5M", "r.raw +1M", "r.raw -- -1M", "--shrink r.raw -- -1M",
    "r.raw", "r.raw abc", "--shrink r.raw 1001", "-f raw r.raw 3M",
    "--preallocation=falloc r.raw +1M", "--preallocation=full r.raw +1M",
    "--preallocation=metadata r.raw +1M", "--preallocation=bogus r.raw +1M",
    "--shrink --preallocation=full r.raw 1000", "nonexist 1M", "q.qcow2 5M",
    "--shrink q.qcow2 5M", "q.qcow2 20000001", "q.qcow2 +1M", "--shrink q.qcow2 0",
    "q.qcow2 -- -100M", "-f raw q.qcow2 +1M", "r.raw 1M 2M", "--shrink r.raw 0", "q.qcow2 9E",
    "q.qcow2 20E", "-q q.qcow2 +1M", "q.qcow2 100G", "q.qcow2 --shrink 1M", "r.raw 1.5",
    "r.raw 99999999999999999999k", "r.raw 16E", "r.raw +1.5M", "r.raw 10MB"]


@pytest.mark.parametrize("args", RESIZE_CASES)
def test_resize_texts_and_results_as_qemu_img(resize_inputs, tmp_path, args, capsys):
    """The first case as a real process, the others in-process."""
    import shutil
    res = []
    for d in ("ours", "theirs"):
        w = tmp_path / d
        w.mkdir()
        for f in ("r.raw", "q.qcow2"):
            shutil.copyfile(resize_inputs / f, w / f)
        if d == "ours":
            if args == RESIZE_CASES[0]:
                p = _ours(w, ["resize", *args.split()])
            else:
                p = run_blkjobs_in_process(capsys, "resize", *args.split(), cwd=w)
            res.append((p.returncode, p.stdout, p.stderr))
        else:
            res.append(_theirs(w, ["resize", *args.split()]))
    assert res[0] == res[1]
    o, t = tmp_path / "ours", tmp_path / "theirs"
    assert (o / "r.raw").stat().st_size == (t / "r.raw").stat().st_size
    assert (o / "r.raw").read_bytes() == (t / "r.raw").read_bytes()
    assert qemu_img("compare", o / "q.qcow2", t / "q.qcow2", check=False).returncode == 0
    check_clean(o / "q.qcow2")
    if args.endswith("r.raw +1M") and "=f" in args:      # falloc, full: allocated
        assert (o / "r.raw").stat().st_blocks >= (11 << 20) // 512


def test_resize_takes_qemu_locks(tmp_path):
    """An image another process writes is refused with qemu-img's text, and
    measure (a reader) is refused too unless -U."""
    import os
    from blkjobs.graph.lock import FileLock
    from blkjobs.graph.perm import Perm
    img = tmp_path / "l.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    fd = os.open(img, os.O_RDWR)
    lock = FileLock(fd, str(img))
    try:
        lock.apply(Perm.CONSISTENT_READ | Perm.WRITE, Perm.WRITE | Perm.RESIZE)
        same(tmp_path, "resize", "l.qcow2", "2M")
        same(tmp_path, "measure", "-O", "qcow2", "l.qcow2")
        same(tmp_path, "measure", "-U", "-O", "qcow2", "l.qcow2")
    finally:
        lock.release()
        os.close(fd)
    assert json.loads(qemu_img("info", "--output", "json", img).stdout)["virtual-size"] == 1 << 20


# ---------------------------------------------------------------------------
# snapshot -l, info snapshots

@pytest.fixture(scope="module")
def snapped(tmp_path_factory):
    d = tmp_path_factory.mktemp("snap")
    qemu_img("create", "-f", "qcow2", d / "sn.qcow2", "10M")
    qemu_io(d / "sn.qcow2", "write -P 1 0 1M")
    qemu_img("snapshot", "-c", "first", d / "sn.qcow2")
    qemu_io(d / "sn.qcow2", "write -P 2 0 64k")
    qemu_img("snapshot", "-c", "a much longer snapshot name here", d / "sn.qcow2")
    qemu_img("snapshot", "-c", "x" * 40, d / "sn.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", d / "v2.qcow2", "1M")
    qemu_img("snapshot", "-c", "old", d / "v2.qcow2")
    qemu_img("create", "-f", "qcow2", "-b", "sn.qcow2", "-F", "qcow2", d / "ov.qcow2")
    qemu_img("snapshot", "-c", "ovs", d / "ov.qcow2")
    qemu_img("create", "-f", "qcow2", d / "none.qcow2", "1M")
    qemu_img("create", "-f", "raw", d / "r.raw", "1M")
    return d


@pytest.mark.parametrize("img", ["sn.qcow2", "v2.qcow2", "ov.qcow2", "none.qcow2", "r.raw"])
def test_snapshot_list_as_qemu_img(snapped, img):
    out = same(snapped, "snapshot", "-l", img)
    same(snapped, "snapshot", "-l", "-U", img)
    same(snapped, "snapshot", img)
    if img == "sn.qcow2":
        assert out.splitlines()[0] == "Snapshot list:" and len(out.splitlines()) == 5


@pytest.mark.parametrize("img", ["sn.qcow2", "v2.qcow2", "ov.qcow2", "none.qcow2"])
@pytest.mark.parametrize("opts", ["", "--output json", "--backing-chain",
                                  "--backing-chain --output json"])
def test_info_shows_snapshots_as_qemu_img(snapped, img, opts):
    same(snapped, "info", *opts.split(), img)


@pytest.mark.parametrize("args", ["-l", "-l -c x sn.qcow2", "-l sn.qcow2 extra",
                                  "-l nonexist"])
def test_snapshot_errors_as_qemu_img(snapped, args):
    same(snapped, "snapshot", *args.split())


@pytest.mark.parametrize("flag", ["-c", "-a", "-d"])
@pytest.mark.parametrize("img", ["sn.qcow2", "v2.qcow2", "ov.qcow2"])
def test_snapshot_changes_as_qemu_img(snapped, tmp_path, flag, img):
    """-c/-a/-d on images qemu-img made (tests/test_snapshot.py has more):
    the same texts, then images qemu-img reads alike (check clean)."""
    import shutil
    (tmp_path / "o").mkdir()
    (tmp_path / "t").mkdir()
    for d in ("o", "t"):
        for f in ("sn.qcow2", img):
            shutil.copy(snapped / f, tmp_path / d / f)
    name = {"sn.qcow2": "first", "v2.qcow2": "old", "ov.qcow2": "ovs"}[img]
    ours = _ours(tmp_path / "o", ("snapshot", flag, name, img))
    assert (ours.returncode, ours.stdout, ours.stderr) == _theirs(tmp_path / "t", (
        "snapshot", flag, name, img))
    check_clean(tmp_path / "o" / img)
    assert qemu_img("compare", tmp_path / "o" / img, tmp_path / "t" / img).returncode == 0
    ls = [qemu_img("snapshot", "-l", tmp_path / d / img).stdout.splitlines() for d in "ot"]
    assert [ln.split()[:2] for ln in ls[0]] == [ln.split()[:2] for ln in ls[1]]


# ---------------------------------------------------------------------------
# dd

DD_CASES = [
    "if=../in.raw of=o bs=64k count=3 skip=2", "if=../in.raw of=o foo",
    "if=../in.raw of=o bs=1k count=1k skip=1k", "if=../in.raw of=o bs=3G",
    "if=../in.raw of=o bs=1.5k count=2", "if=../in.raw of=o if=../in.raw",
    "-O foo if=../in.raw of=o", "-O qcow2 if=../in.raw of=o bs=1000 count=1",
    "if=../in.raw of=nodir/x", "if=../in.raw of=o count=abc",
    "if=../in.raw of=o bs=1k skip=1023 count=1024", "if=../in.raw of=o bs=1M skip=2",
    "if=../in.raw", "if=../in.raw of=o bs=0", "-f qcow2 if=../in.raw of=o",
    "if=nonexist of=o", "-O qcow2 if=../in64k.raw of=o bs=3 skip=1000",
    "-O raw -f qcow2 if=../ov.qcow2 of=o bs=4k count=100 skip=3",
    "-O qcow2 if=../ov.qcow2 of=o bs=7k skip=5", "if=../in.raw of=o bs=1k count=0",
    "if=../in.raw of=o bs=4k count=1 skip=1 conv=notrunc", "if=../in.raw of=o count=9E",
    "if=../in.raw of=o skip=99999999999999999999", "if=../in.raw of=o bs=1.5k count=1k",
    "if=../in.raw of=o bs=1kB", "-O qcow2 if=../in.raw of=o bs=4k count=10",
    "-O qcow2 if=../in.raw of=o bs=64k count=2", "-O qcow2 if=../in.raw of=o bs=60k count=2",
    "-O qcow2 if=../in.raw of=o bs=1k count=100 skip=3",
    "-O qcow2 -f qcow2 if=../ov.qcow2 of=o bs=3000 count=999"]


@pytest.fixture(scope="module")
def dd_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dd")
    rnd = random.Random(7)
    (d / "in.raw").write_bytes(rnd.randbytes((1 << 20) + 4321))
    # bs=3: qemu-img writes 3 bytes at a time (10 s of its CPU for in.raw);
    # as in.raw, more than a 64k cluster after skip=1000 and 2 bytes in the
    # last block
    (d / "in64k.raw").write_bytes(rnd.randbytes((64 << 10) + 4321))
    qemu_img("create", "-f", "qcow2", d / "base.qcow2", "3M")
    qemu_io(d / "base.qcow2", "write -P 1 0 2M")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d / "ov.qcow2")
    qemu_io(d / "ov.qcow2", "write -P 2 1M 100k", "write -z 64k 64k")
    return d


@pytest.mark.parametrize("args", DD_CASES)
def test_dd_as_qemu_img(dd_inputs, args, tmp_path, capsys):
    """The first case as a real process, the others in-process."""
    ours, theirs = dd_inputs / f"ours{DD_CASES.index(args)}", dd_inputs / \
        f"theirs{DD_CASES.index(args)}"
    ours.mkdir()
    theirs.mkdir()
    if args == DD_CASES[0]:
        p = _ours(ours, ["dd", *args.split()])
    else:
        p = run_blkjobs_in_process(capsys, "dd", *args.split(), cwd=ours)
    assert (p.returncode, p.stdout, p.stderr) == _theirs(theirs, ["dd", *args.split()])
    if (theirs / "o").exists():
        fmt = "qcow2" if "-O qcow2" in args else "raw"
        assert qemu_img("compare", "-f", fmt, "-F", fmt, ours / "o", theirs / "o",
                        check=False).returncode == 0
        assert (ours / "o").stat().st_size == (theirs / "o").stat().st_size
        if fmt == "qcow2":
            check_clean(ours / "o")
            assert _map_no_offsets(ours / "o", fmt) == _map_no_offsets(theirs / "o", fmt)
        # qcow2 too: every cluster where qemu-img puts it (the L2 table
        # before the data, as QEMU allocates), the files equal byte for byte
        assert (ours / "o").read_bytes() == (theirs / "o").read_bytes()
    else:
        assert not (ours / "o").exists()


@pytest.mark.parametrize("new", ["16M", "6M", "7680K"])
def test_resize_qcow2_with_bitmaps_like_qemu_img(tmp_path, new):
    """Persistent bitmaps follow the disk, as qemu-img resizes them: grown
    with clean granules, cut on shrink; then dirtied past the old end by
    QEMU, read back by QEMU, equal on both images."""
    a, b = _pair(tmp_path, "b.qcow2", "qcow2", "8M")
    for img in (a, b):
        qemu_img("bitmap", "--add", img, "b0")
        qemu_img("bitmap", "--add", "-g", "128k", img, "b1")
        qemu_io(img, "write 1M 64k", "write 5M 1M", "write 7M 1M")
    p = run_blkjobs("resize", *(["--shrink"] if new != "16M" else []), a, new)
    assert (p.returncode, p.stdout, p.stderr) == (0, "Image resized.\n", "")
    qemu_img("resize", *(["--shrink"] if new != "16M" else []), b, new)
    for img in (a, b):
        check_clean(img)
        if new == "16M":
            qemu_io(img, "write 12M 64k")
    for name in ("b0", "b1"):
        assert qemu_dirty(a, name) == qemu_dirty(b, name)
    infos = [json.loads(qemu_img("info", "--output", "json", img).stdout) for img in (a, b)]
    for d in infos:     # where the clusters went may differ
        del d["filename"], d["actual-size"]
    assert infos[0] == infos[1]
