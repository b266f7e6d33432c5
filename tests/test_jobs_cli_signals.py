"""blkjobs backup | mirror | stream | commit (and convert) that do not complete: Ctrl-C
(exit 130), SIGTERM (exit 143) or a failing target (exit 1). The job is
cancelled and waited for, the one line on stderr says what is left in the
files, and that statement is checked against the files with qemu-img."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import pytest

from conftest import BLKJOBS, run_blkjobs
from test_jobs_helpers import MiB, assert_same, backing_of, check, mkimg, same, snapshot

COPIED = r"(\d+(\.\d+)? (B|KiB|MiB)) of 32 MiB"


def interrupt(args, sig, cwd):
    """Run a rate-limited job command (with --events), send ``sig`` once its
    job runs; (exit status, stderr)."""
    p = subprocess.Popen(BLKJOBS + [str(a) for a in args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=cwd)
    try:
        deadline = time.monotonic() + 30
        for line in p.stdout:
            ev = json.loads(line)
            if ev["event"] == "JOB_STATUS_CHANGE" and ev["data"]["status"] == "running":
                break
            assert time.monotonic() < deadline
        time.sleep(0.3)         # let it copy a little
        p.send_signal(sig)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert "Traceback" not in err, err
    return p.returncode, err


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
    rc, err = interrupt([cmd, "--events", "--speed", "4M", src, "t.qcow2"], sig, tmp_path)
    assert rc == code, err
    m = re.fullmatch(f"blkjobs: {how}: {cmd} job cancelled; the target 't.qcow2' is "
                     f"incomplete \\({COPIED} copied\\); the source is unchanged\n", err)
    assert m, err
    assert_same(view, src, "raw", "qcow2")
    check(tmp_path / "t.qcow2")
    assert not same(view, tmp_path / "t.qcow2", "raw", "qcow2")[0]


def test_interrupted_backup_into_an_existing_target(tmp_path):
    src, view = source(tmp_path)
    mkimg(tmp_path / "t.qcow2", size=32 * MiB, writes=[("0x77", 0, 32 * MiB)])
    rc, err = interrupt(["backup", "--events", "--speed", "4M", src, "t.qcow2"],
                        signal.SIGTERM, tmp_path)
    assert rc == 143, err
    assert re.fullmatch("blkjobs: terminated: backup job cancelled; the target 't.qcow2' was "
                        f"partly overwritten \\({COPIED} copied\\) and is not a complete copy; "
                        "the source is unchanged\n", err), err
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
    rc, err = interrupt(["commit", "--events", "--speed", "2M", "top.qcow2"],
                        signal.SIGTERM, tmp_path)
    assert rc == 143, err
    m = re.fullmatch("blkjobs: terminated: commit job cancelled; 'base.qcow2' has been partly "
                     r"written \((\d+(\.\d+)? (B|KiB|MiB)) of 24 MiB committed\); 'top.qcow2' "
                     "still reads the same and was not emptied\n", err)
    assert m, err
    assert_same(top_view, top, "raw", "qcow2")          # what the user sees: unchanged
    assert not same(base_view, base, "raw", "qcow2")[0]  # base was partly written ...
    assert backing_of(top) == "base.qcow2"              # ... and the chain is intact
    check(top)
    check(base)


def test_interrupted_stream_leaves_top_reading_the_same(tmp_path):
    base, top, top_view, _ = chain(tmp_path)
    rc, err = interrupt(["stream", "--events", "--speed", "2M", "top.qcow2"],
                        signal.SIGINT, tmp_path)
    assert rc == 130, err
    assert re.fullmatch("blkjobs: interrupted: stream job cancelled; 'top.qcow2' still reads "
                        "the same and keeps its backing file "
                        f"\\({COPIED} pulled into it\\)\n", err), err
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
    p = subprocess.Popen(BLKJOBS + ["convert", "--progress-json", "-r", "4M", *extra, "-O",
                                    "qcow2", src, str(dst)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stderr.readline()          # the first progress line: copying
        assert line.startswith("{"), line
        time.sleep(0.3)
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
