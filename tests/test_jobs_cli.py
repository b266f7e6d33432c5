"""blkjobs backup | mirror | stream | commit: files compared with what
qemu-img does to copies of the same files."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import run_blkjobs
from test_jobs_helpers import MiB, assert_same, backing_of, chain3, check, qimg, snapshot


def copy_chain(tmp_path, name):
    d = tmp_path / name
    d.mkdir()
    for f in ("base.qcow2", "mid.qcow2", "top.qcow2"):
        shutil.copy(tmp_path / f, d / f)
    return d


@pytest.mark.parametrize("with_base", [False, True])
def test_commit_like_qemu_img(tmp_path, with_base):
    chain3(tmp_path)
    ours, theirs = copy_chain(tmp_path, "ours"), copy_chain(tmp_path, "theirs")
    extra = ["-b", "base.qcow2"] if with_base else []
    p = run_blkjobs("commit", *extra, ours / "top.qcow2")
    assert p.returncode == 0, p.stderr
    import subprocess
    subprocess.run(["qemu-img", "commit", *extra, str(theirs / "top.qcow2")], check=True,
                   capture_output=True, cwd=theirs)
    for f in ("base.qcow2", "mid.qcow2", "top.qcow2"):
        assert_same(ours / f, theirs / f, "qcow2", "qcow2")
        assert backing_of(ours / f) == backing_of(theirs / f)
        check(ours / f)


def test_stream_like_safe_rebase(tmp_path):
    chain3(tmp_path)
    ours, theirs = copy_chain(tmp_path, "ours"), copy_chain(tmp_path, "theirs")
    p = run_blkjobs("stream", "-b", "base.qcow2", ours / "top.qcow2")
    assert p.returncode == 0, p.stderr
    import subprocess
    subprocess.run(["qemu-img", "rebase", "-b", "base.qcow2", "-F", "qcow2",
                    str(theirs / "top.qcow2")], check=True, capture_output=True, cwd=theirs)
    assert backing_of(ours / "top.qcow2") == backing_of(theirs / "top.qcow2") == "base.qcow2"
    assert_same(ours / "top.qcow2", theirs / "top.qcow2", "qcow2", "qcow2")
    check(ours / "top.qcow2")


def test_backup_and_mirror_events_and_exit_codes(tmp_path):
    chain3(tmp_path)
    view = snapshot(tmp_path / "top.qcow2", "qcow2", tmp_path / "view.raw")
    p = run_blkjobs("backup", "--events", tmp_path / "top.qcow2", tmp_path / "bk.qcow2")
    assert p.returncode == 0, p.stderr
    evs = [json.loads(line) for line in p.stdout.splitlines()]
    assert [e["data"].get("status") for e in evs if e["event"] == "JOB_STATUS_CHANGE"] == \
        ["created", "running", "waiting", "pending", "concluded", "null"]
    assert any(e["event"] == "BLOCK_JOB_COMPLETED" for e in evs)
    assert_same(view, tmp_path / "bk.qcow2", "raw", "qcow2")
    p = run_blkjobs("mirror", "-O", "raw", "-p", tmp_path / "top.qcow2", tmp_path / "m.raw")
    assert p.returncode == 0, p.stderr
    assert_same(view, tmp_path / "m.raw")
    # a target of another size: the job fails -> exit 1, one line
    qimg("create", "-f", "qcow2", tmp_path / "small.qcow2", 1 * MiB)
    p = run_blkjobs("backup", tmp_path / "top.qcow2", tmp_path / "small.qcow2")
    assert p.returncode == 1 and p.stderr.count("\n") == 1
    assert "Source and target image have different sizes" in p.stderr
    p = run_blkjobs("mirror", tmp_path / "top.qcow2", tmp_path / "small.qcow2")
    assert p.returncode == 1 and "mirror job failed" in p.stderr


def test_commit_without_backing_is_one_line_like_qemu_img(tmp_path, qemu_img):
    import subprocess
    img = tmp_path / "nb.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
    theirs = subprocess.run([qemu_img, "commit", str(img)], capture_output=True, text=True)
    p = run_blkjobs("commit", img)
    assert p.returncode == 1
    assert p.stderr == "blkjobs: Image does not have a backing file\n"
    assert theirs.stderr == "qemu-img: Image does not have a backing file\n"
