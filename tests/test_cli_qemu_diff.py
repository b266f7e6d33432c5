"""Behaviour that scripts written for qemu-img rely on, checked against
qemu-img itself: the same invocation given to both tools must leave the same
files, print the same things and exit the same way."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess

import pytest

from conftest import BLKJOBS, blocks, run_blkjobs
from qemu_oracle import qemu_img, qemu_io, qemu_map

MiB = 1 << 20


def _mapping(path):
    """qemu-img map without host offsets (they differ between writers)."""
    return [{k: v for k, v in e.items() if k != "offset"} for e in qemu_map(path)]


def _source(tmp_path, fmt):
    src = tmp_path / f"src.{fmt}"
    qemu_img("create", "-f", fmt, src, "16M")
    qemu_io(src, "write -P 1 1M 2M", "write -z 8M 1M", fmt=fmt)
    return src


@pytest.mark.parametrize("src_fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("dst_fmt", ["raw", "qcow2"])
def test_convert_S0_allocates_everything_as_qemu_img(tmp_path, src_fmt, dst_fmt):
    src = _source(tmp_path, src_fmt)
    ours, theirs = tmp_path / f"ours.{dst_fmt}", tmp_path / f"theirs.{dst_fmt}"
    run_blkjobs("convert", "-S", "0", "-f", src_fmt, "-O", dst_fmt, src, ours, check=True)
    qemu_img("convert", "-S", "0", "-f", src_fmt, "-O", dst_fmt, src, theirs)
    assert qemu_img("compare", "-f", src_fmt, "-F", dst_fmt, src, ours).returncode == 0
    assert _mapping(ours) == _mapping(theirs)
    assert _mapping(ours) == [{"start": 0, "length": 16 * MiB, "depth": 0, "present": True,
                               "zero": False, "data": True}]
    assert blocks(ours) >= 16 * MiB        # really on disk, not holes behind the tables
    if dst_fmt == "qcow2":
        assert qemu_img("check", ours).returncode == 0
    else:
        assert blocks(ours) == blocks(theirs) == os.path.getsize(ours)


def test_convert_o_backing_file_copies_only_the_difference_as_qemu_img(tmp_path):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", base, "16M")
    qemu_io(base, "write -P 2 0 1M")
    qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    qemu_io(top, "write -P 3 4M 1M")
    opts = f"backing_file={base.name},backing_fmt=qcow2"
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    run_blkjobs("convert", "-O", "qcow2", "-o", opts, top, ours, check=True)
    qemu_img("convert", "-O", "qcow2", "-o", opts, top, theirs)
    assert qemu_map(ours) == qemu_map(theirs)       # only 4M..5M allocated in the top
    assert [e["start"] for e in qemu_map(ours) if e["depth"] == 0 and e["data"]] == [4 * MiB]
    assert os.path.getsize(ours) == os.path.getsize(theirs)
    info = qemu_img("info", "--output", "json", ours).stdout
    assert '"backing-filename": "base.qcow2"' in info and '"backing-filename-format": "qcow2"' in info
    assert qemu_img("compare", top, ours).returncode == 0


def _leaky(path):
    """A leaks-only image: two data clusters counted twice, 17 clusters past
    the end counted once and referenced by nothing (16-bit refcounts, first
    refcount block at 0x20000, as qemu-img creates them)."""
    qemu_img("create", "-f", "qcow2", path, "16M")
    qemu_io(path, "write -P 1 0 128k")
    data = qemu_map(path)[0]["offset"] // 65536
    with open(path, "r+b") as f:
        for c, n in [(data, 2), (data + 1, 2)] + [(c, 1) for c in range(7, 24)]:
            f.seek(0x20000 + 2 * c)
            f.write(n.to_bytes(2, "big"))
        f.truncate(24 * 65536)


def test_check_r_leaks_on_a_leaks_only_image_as_qemu_img(tmp_path):
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    _leaky(ours)
    theirs.write_bytes(ours.read_bytes())
    before = qemu_img("check", ours, check=False)
    assert before.returncode == 2 and "ERROR OFLAG_COPIED" in before.stderr
    a = run_blkjobs("check", "-r", "leaks", ours)
    b = qemu_img("check", "-r", "leaks", theirs, check=False)
    assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr)
    assert a.returncode == 0 and "Leaked cluster 7 refcount=1 reference=0\n" in a.stderr
    after = qemu_img("check", ours, check=False)
    assert after.returncode == 0 and after.stderr == ""


# -- progress -----------------------------------------------------------------
LINE = re.compile(r"\((\d+\.\d\d)/100%\)")
QEMU_SIGNAL_LINE = re.compile(r"^    \(\d+\.\d\d/100%\)$")   # qemu-img's, on SIGUSR1


def _plain_progress(out: str) -> list[float]:
    """The percentages of -p's lines; none may carry \\r or escapes (a pipe)."""
    assert "\r" not in out and "\x1b" not in out, repr(out)
    return [float(m.group(1)) for m in map(LINE.search, out.splitlines()) if m]


def test_p_goes_to_stdout_as_plain_lines_as_qemu_img(tmp_path):
    src = _source(tmp_path, "qcow2")
    theirs = qemu_img("convert", "-p", "-O", "raw", src, tmp_path / "theirs.raw")
    assert theirs.stderr == "" and "(100.00/100%)" in theirs.stdout
    ours = run_blkjobs("convert", "-p", "-O", "raw", src, tmp_path / "ours.raw", check=True)
    assert ours.stderr == ""
    pcts = _plain_progress(ours.stdout)
    assert pcts[-1] == 100.0 and pcts == sorted(pcts)


def _overlay(tmp_path, name="top.qcow2"):
    base, top = tmp_path / f"base-{name}", tmp_path / name
    qemu_img("create", "-f", "qcow2", base, "16M")
    qemu_io(base, "write -P 1 0 8M")
    qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    qemu_io(top, "write -P 2 1M 2M")
    return base, top


def test_compare_q_prints_nothing_as_qemu_img(tmp_path):
    base, top = _overlay(tmp_path)
    other = tmp_path / "other.qcow2"
    qemu_img("create", "-f", "qcow2", other, "16M")
    for a, b, rc in ((top, top, 0), (top, other, 1)):
        theirs = qemu_img("compare", "-q", a, b, check=False)
        ours = run_blkjobs("compare", "-q", a, b)
        assert (ours.returncode, ours.stdout, ours.stderr) == \
            (theirs.returncode, theirs.stdout, theirs.stderr) == (rc, "", "")


def test_compare_p_and_rebase_p_show_progress(tmp_path):
    base, top = _overlay(tmp_path)
    copy = tmp_path / "copy.qcow2"
    qemu_img("convert", "-O", "qcow2", top, copy)
    theirs = qemu_img("compare", "-p", top, copy)
    ours = run_blkjobs("compare", "-p", top, copy)
    assert ours.returncode == theirs.returncode == 0
    def verdict(out):
        return [x for x in out.splitlines() if x.strip() and not LINE.search(x)]
    assert verdict(ours.stdout) == verdict(theirs.stdout) == ["Images are identical."]
    assert _plain_progress(ours.stdout)[-1] == 100.0

    r = run_blkjobs("rebase", "-p", "-b", "", top, check=True)
    assert r.stderr == "" and _plain_progress(r.stdout)[-1] == 100.0
    assert qemu_img("compare", copy, top).returncode == 0
    assert "backing-filename" not in qemu_img("info", "--output", "json", top).stdout


def test_commit_q_t_r_as_qemu_img(tmp_path):
    _, ours = _overlay(tmp_path, "ours.qcow2")
    _, theirs = _overlay(tmp_path, "theirs.qcow2")
    view = tmp_path / "view.raw"
    qemu_img("convert", "-O", "raw", ours, view)
    a = run_blkjobs("commit", "-q", "-t", "none", "-r", "100M", ours)
    b = qemu_img("commit", "-q", "-t", "none", "-r", "100M", theirs)
    assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr) == (0, "", "")
    for img in (ours, theirs):
        assert qemu_img("compare", "-f", "raw", view, img).returncode == 0
    assert _mapping(ours) == _mapping(theirs)
    assert qemu_img("compare", tmp_path / "base-ours.qcow2",
                    tmp_path / "base-theirs.qcow2").returncode == 0
    p = run_blkjobs("commit", "-p", tmp_path / "base-ours.qcow2")
    assert p.returncode == 1 and p.stderr == "blkjobs: Image does not have a backing file\n"


def _slow(tmp_path, cmd, *extra):
    """A convert or backup of 16 MiB of data at 4 MiB/s, --progress-json
    on stderr (its first line says the copy is under way)."""
    src = tmp_path / "slow.qcow2"
    qemu_img("create", "-f", "qcow2", src, "16M")
    qemu_io(src, "write -P 7 0 16M")
    dst = tmp_path / f"slow-{cmd}.qcow2"
    rate = ["-r", "4M"] if cmd == "convert" else ["--speed", "4M"]
    args = [cmd, "--progress-json", *rate, *extra, "-O" if cmd == "convert" else "--format",
            "qcow2", src, dst]
    if cmd == "backup":
        args = [cmd, "--progress-json", *rate, *extra, src, dst]
    return src, dst, args


@pytest.mark.parametrize("cmd", ["convert", "backup"])
def test_sigusr1_prints_a_progress_line_and_carries_on(tmp_path, cmd):
    src, dst, args = _slow(tmp_path, cmd)
    p = subprocess.Popen(BLKJOBS + [str(a) for a in args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stderr.readline().startswith("{")      # copying
        os.kill(p.pid, signal.SIGUSR1)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    # qemu-img's meter without -p says it on stderr (the JSON lines are there too)
    lines = [x for x in err.splitlines() if not x.startswith("{")]
    assert len(lines) == 1 and QEMU_SIGNAL_LINE.match(lines[0]), err
    assert out == "" and "Traceback" not in err
    assert qemu_img("compare", src, dst).returncode == 0


@pytest.mark.parametrize("cmd", ["convert", "backup"])
def test_progress_fd_writes_nbdcopy_lines(tmp_path, cmd):
    src = _source(tmp_path, "qcow2")
    dst = tmp_path / f"fd-{cmd}.qcow2"
    r, w = os.pipe()
    args = [cmd, "--progress-fd", str(w)] + (["-O", "qcow2"] if cmd == "convert" else []) + \
        [src, dst]
    try:
        p = subprocess.run(BLKJOBS + [str(a) for a in args], pass_fds=[w],
                           capture_output=True, text=True, timeout=120)
        os.close(w)
        with os.fdopen(r) as f:
            got = f.read()
    except BaseException:
        os.close(r)
        raise
    assert p.returncode == 0 and p.stdout == "" and p.stderr == "", p.stderr
    lines = got.splitlines()
    assert all(re.fullmatch(r"\d{1,3}/100", x) for x in lines) and lines[-1] == "100/100"
    pcts = [int(x.split("/")[0]) for x in lines]
    assert pcts == sorted(pcts) and len(set(pcts)) == len(pcts)
    assert qemu_img("compare", src, dst).returncode == 0
    bad = run_blkjobs(cmd, "--progress-fd", "97", src, tmp_path / "never.qcow2")
    assert bad.returncode == 1
    assert bad.stderr == "blkjobs: --progress-fd 97: not an open file descriptor\n"


def test_job_progress_json_and_events(tmp_path):
    src, dst, args = _slow(tmp_path, "backup", "--events")
    p = run_blkjobs(*args)
    assert p.returncode == 0, p.stderr
    recs = [json.loads(x) for x in p.stderr.splitlines()]
    assert recs[-1]["final"] is True and recs[-1]["done"] == recs[-1]["total"] == 16 * MiB
    events = [json.loads(x) for x in p.stdout.splitlines()]
    prog = [e["data"] for e in events if e["event"] == "JOB_PROGRESS"]
    assert prog and all(d["id"] == "job0" and d["total-progress"] == 16 * MiB for d in prog)
    cur = [d["current-progress"] for d in prog]
    assert cur == sorted(cur) and len(cur) >= 2
    names = [e["event"] for e in events]
    assert names.index("JOB_PROGRESS") < names.index("BLOCK_JOB_COMPLETED")


# -- help that teaches ----------------------------------------------------------
def _commands():
    import argparse

    from blkjobs.cli.main import build_parser
    p = build_parser([])
    return p, next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_option_has_help_and_every_command_an_example_and_exit_codes():
    import argparse
    top, cmds = _commands()
    assert "exit status:" in top.format_help()
    missing = [(name, a.option_strings or a.dest) for name, p in cmds.items()
               for a in p._actions if not a.help and not isinstance(a, argparse._HelpAction)]
    assert missing == []
    for name, p in cmds.items():
        text = p.format_help()
        assert f"examples:\n  blkjobs {name} " in text, name
        assert "\nexit status: 0 " in text, name


def test_mistyped_command_says_did_you_mean():
    p = run_blkjobs("conver", "a.raw", "b.raw")
    assert (p.returncode, p.stdout) == (1, "")
    assert p.stderr == ("blkjobs: unknown command 'conver'; did you mean 'convert'?\n"
                        "Try 'blkjobs --help' for the list of commands.\n")


def test_usage_error_shows_the_commands_own_usage():
    for args, what in ((["convert", "-Z", "a", "b"], "unrecognized arguments: -Z"),
                       (["convert"], "the following arguments are required: src, dst")):
        p = run_blkjobs(*args)
        assert p.returncode == 1 and p.stdout == ""
        assert p.stderr.startswith("usage: blkjobs convert [-h] ")
        assert p.stderr.endswith(f"blkjobs convert: {what}\n"
                                 "Try 'blkjobs convert --help' for more information.\n")


# -- errors for programs ------------------------------------------------------------
def test_error_format_json_is_one_json_object(tmp_path):
    missing = tmp_path / "missing.qcow2"
    p = run_blkjobs("--error-format", "json", "info", "--output", "json", missing)
    assert p.returncode == 1 and p.stdout == "" and p.stderr.count("\n") == 1
    assert json.loads(p.stderr) == {"error": {
        "class": "OSErrorWithContext", "exit-code": 1, "errno": "ENOENT", "side": None,
        "offset": None, "path": str(missing),
        "message": f"Could not open '{missing}': Could not open '{missing}': "
                   "No such file or directory"}}
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(4096))
    p = run_blkjobs("--error-format", "json", "check", raw)
    assert p.returncode == qemu_img("check", raw, check=False).returncode == 63
    assert json.loads(p.stderr)["error"] == {
        "class": "CheckNotSupported", "exit-code": 63, "errno": None, "side": None,
        "offset": None, "path": None, "message": "This image format does not support checks"}
    # by default (also with --output json) qemu-img's: nothing on stdout, one line
    q = qemu_img("info", "--output", "json", missing, check=False)
    p = run_blkjobs("info", "--output", "json", missing)
    assert p.returncode == q.returncode == 1 and p.stdout == q.stdout == ""
    assert p.stderr == (f"blkjobs: Could not open '{missing}': Could not open '{missing}': "
                        "No such file or directory\n")
