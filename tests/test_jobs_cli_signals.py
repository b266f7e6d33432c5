"""blkjobs backup | mirror | stream | commit (and convert) that do not complete: Ctrl-C
(exit 130), SIGTERM (exit 143) or a failing target (exit 1). The job is
cancelled and waited for, the one line on stderr says what is left in the
files, and that statement is checked against the files with qemu-img."""
from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest

from conftest import BLKJOBS, run_blkjobs
from test_jobs_helpers import MiB, assert_same, backing_of, check, mkimg, same, snapshot

COPIED = r"(\d+(\.\d+)? (B|KiB|MiB)) of 32 MiB"


def interrupt(args, sig, cwd, held="t.qcow2"):
    """Run a job command holding its third write to ``held`` at a break
    point (BLKJOBS_X_BREAK; with ``--speed 10M`` its batches are 1 MiB, so
    the first 1 MiB batch has landed and the rest is not copied), send
    ``sig`` then; (exit status, stderr after the held line)."""
    env = dict(os.environ, BLKJOBS_X_BREAK=f"{held}:write_aio:3")
    # (stdin stays open: its end would let the held request go)
    p = subprocess.Popen(BLKJOBS + [str(a) for a in args], stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         cwd=cwd, env=env)
    try:
        line = p.stderr.readline()
        assert re.fullmatch(r"blkjobs: x-break: write_aio held at offset \d+\n", line), \
            line + p.stderr.read()
        p.send_signal(sig)
        p.wait(60)
        err = p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdin.close()
        p.stderr.close()
    assert "Traceback" not in err, err
    return p.returncode, err


def some_but_not_all(amount, total_mib):
    """``amount`` ("1.5 MiB") is at least the first 1 MiB batch, and short
    of the whole."""
    n, unit = amount.split()
    got = float(n) * {"B": 1, "KiB": 1 << 10, "MiB": MiB}[unit]
    assert MiB <= got < total_mib * MiB, amount


def source(tmp_path):
    """A 32 MiB qcow2 with 24 MiB of data, and its guest view as raw."""
    src = mkimg(tmp_path / "src.qcow2", size=32 * MiB,
                writes=[("0x11", 0, 16 * MiB), ("0x22", 20 * MiB, 8 * MiB)])
    return src, snapshot(src, "qcow2", tmp_path / "src.raw")


@pytest.mark.parametrize("cmd", ["backup", "mirror"])
@pytest.mark.parametrize("sig,code,how", [(signal.SIGINT, 130, "interrupted"),
                                          (signal.SIGTERM, 143, "terminated")])
def test_interrupted_copy_says_the_target_is_incomplete(tmp_path, cmd, sig, code, how):
    src, view = source(tmp_path)
    rc, err = interrupt([cmd, "--speed", "10M", src, "t.qcow2"], sig, tmp_path)
    assert rc == code, err
    m = re.fullmatch(f"blkjobs: {how}: {cmd} job cancelled; the target 't.qcow2' is "
                     f"incomplete \\({COPIED} copied\\); the source is unchanged\n", err)
    assert m, err
    some_but_not_all(m.group(1), 32)
    assert_same(view, src, "raw", "qcow2")
    check(tmp_path / "t.qcow2")
    assert not same(view, tmp_path / "t.qcow2", "raw", "qcow2")[0]


def test_interrupted_backup_into_an_existing_target(tmp_path):
    src, view = source(tmp_path)
    mkimg(tmp_path / "t.qcow2", size=32 * MiB, writes=[("0x77", 0, 32 * MiB)])
    rc, err = interrupt(["backup", "--speed", "10M", src, "t.qcow2"],
                        signal.SIGTERM, tmp_path)
    assert rc == 143, err
    m = re.fullmatch("blkjobs: terminated: backup job cancelled; the target 't.qcow2' was "
                     f"partly overwritten \\({COPIED} copied\\) and is not a complete copy; "
                     "the source is unchanged\n", err)
    assert m, err
    some_but_not_all(m.group(1), 32)
    assert_same(view, src, "raw", "qcow2")
    check(tmp_path / "t.qcow2")


def chain(tmp_path):
    base = mkimg(tmp_path / "base.qcow2", size=32 * MiB, writes=[("0x41", 0, 32 * MiB)])
    top = mkimg(tmp_path / "top.qcow2", size=32 * MiB, backing="base.qcow2",
                writes=[("0x61", 0, 24 * MiB)])
    return base, top, snapshot(top, "qcow2", tmp_path / "top.raw"), \
        snapshot(base, "qcow2", tmp_path / "base.raw")


def test_terminated_commit_leaves_top_reading_the_same(tmp_path):
    base, top, top_view, base_view = chain(tmp_path)
    rc, err = interrupt(["commit", "--speed", "10M", "top.qcow2"],
                        signal.SIGTERM, tmp_path, held="base.qcow2")
    assert rc == 143, err
    m = re.fullmatch("blkjobs: terminated: commit job cancelled; 'base.qcow2' has been partly "
                     r"written \((\d+(\.\d+)? (B|KiB|MiB)) of 24 MiB committed\); 'top.qcow2' "
                     "still reads the same and was not emptied\n", err)
    assert m, err
    some_but_not_all(m.group(1), 24)
    assert_same(top_view, top, "raw", "qcow2")          # what the user sees: unchanged
    assert not same(base_view, base, "raw", "qcow2")[0]  # base was partly written ...
    assert backing_of(top) == "base.qcow2"              # ... and the chain is intact
    check(top)
    check(base)


def test_interrupted_stream_leaves_top_reading_the_same(tmp_path):
    base, top, top_view, _ = chain(tmp_path)
    rc, err = interrupt(["stream", "--speed", "10M", "top.qcow2"],
                        signal.SIGINT, tmp_path, held="top.qcow2")
    assert rc == 130, err
    m = re.fullmatch("blkjobs: interrupted: stream job cancelled; 'top.qcow2' still reads "
                     "the same and keeps its backing file "
                     f"\\({COPIED} pulled into it\\)\n", err)
    assert m, err
    some_but_not_all(m.group(1), 32)
    assert_same(top_view, top, "raw", "qcow2")
    assert backing_of(top) == "base.qcow2"
    check(top)


def test_failed_backup_says_what_the_target_holds(tmp_path, small_tmpfs):
    """ENOSPC on the target (a 2 MiB tmpfs): exit 1, the error and the target."""
    src, view = source(tmp_path)
    dst = small_tmpfs / "t.raw"
    p = run_blkjobs("backup", "-O", "raw", src, dst)
    assert p.returncode == 1, p.stderr
    assert re.fullmatch(f"blkjobs: backup job failed: No space left on device; the target "
                        f"'{dst}' is incomplete \\({COPIED} copied\\); the source is "
                        "unchanged\n", p.stderr), p.stderr
    assert_same(view, src, "raw", "qcow2")


@pytest.mark.parametrize("existing", [False, True])
def test_terminated_convert_says_what_became_of_the_target(tmp_path, existing):
    """blkjobs convert under SIGTERM: exit 143; a target it created is
    removed, an existing one (-n) is said to be partially written; the
    source is unchanged."""
    src, view = source(tmp_path)
    dst = tmp_path / "c.qcow2"
    extra = []
    if existing:
        mkimg(dst, size=32 * MiB)
        extra = ["-n"]
    # at 1 byte/s the copy cannot end: it is still copying when signalled
    p = subprocess.Popen(BLKJOBS + ["convert", "--progress-json", "-r", "1", *extra, "-O",
                                    "qcow2", src, str(dst)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the second progress line: the copy loop runs (the first one comes
        # just before the copy into the target begins)
        for _ in range(2):
            line = p.stderr.readline()
            assert line.startswith("{"), line
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    err = "".join(x for x in err.splitlines(True) if not x.startswith("{"))
    assert p.returncode == 143, err
    if existing:
        assert err == "blkjobs: terminated: the target was left partially written\n"
        assert dst.exists()
    else:
        assert err == "blkjobs: terminated: the incomplete target was removed\n"
        assert not dst.exists()
    assert_same(view, src, "raw", "qcow2")


@pytest.mark.parametrize("spec,msg", [
    ("nonsense", "BLKJOBS_X_BREAK: expected IMAGE:EVENT:N, not 'nonsense'"),
    ("other.qcow2:write_aio:1", "BLKJOBS_X_BREAK: no image 'other.qcow2' in the job, or N < 1"),
    ("t.qcow2:l2_load:1", "blkdebug: event 'l2_load' is not raised by blkjobs (supported: "
                          "read_aio, pwritev, write_aio, pwritev_zero, write_compressed, "
                          "cluster_alloc, flush_to_os, flush_to_disk)")])
def test_x_break_hook_refuses_a_bad_spec(tmp_path, spec, msg):
    """The test hook itself: a bad BLKJOBS_X_BREAK is one line, exit 1."""
    src, _ = source(tmp_path)
    p = subprocess.run(BLKJOBS + ["backup", src, "t.qcow2"], capture_output=True, text=True,
                       cwd=tmp_path, env=dict(os.environ, BLKJOBS_X_BREAK=spec), timeout=60)
    assert (p.returncode, p.stderr) == (1, f"blkjobs: {msg}\n")
