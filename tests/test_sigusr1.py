"""SIGUSR1 asks qemu-img for a progress line; it never ends a command.
qemu-img holds the signal blocked from the start; its progress meter
(convert, compare, rebase, commit, amend), when -p is not given (-q too),
answers it with one line on stderr, ``    (12.34/100%)``, at its next step,
and the command carries on. The commands without a meter (create, resize,
measure, check, dd) leave it unanswered. ``blkjobs bench`` answers with its
current stage. The signal is sent once the command is provably running:
blocked in a read of an NBD source the test holds (an nbdkit sh plugin that
waits on a fifo), at an x-break point of a job, or blocked writing its
output to a pipe the test filled (seen in /proc)."""
from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import subprocess
import time

import pytest

from conftest import BLKJOBS
from qemu_oracle import qemu_img, qemu_io

LINE = re.compile(r"    \(\d{1,3}\.\d\d/100%\)\n")
WAIT = 120.0


def _wait_for(cond, proc, what):
    end = time.monotonic() + WAIT
    while not cond():
        assert proc.poll() is None, (what, proc.returncode)
        assert time.monotonic() < end, what
        select.select([], [], [], 0.01)


def _finish(proc):
    try:
        o, e = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in (e or ""), e
    return proc.returncode, o, e


# -- an NBD source the test holds ------------------------------------------------
@pytest.fixture
def held_source(tmp_path):
    """(uri, data file, wait(proc), release()): an 8 MiB export of a data
    file whose first read at or past 4 MiB waits until release()."""
    data = tmp_path / "data.raw"
    data.write_bytes(bytes(range(256)) * (32 << 10))
    reached, go = tmp_path / "reached", tmp_path / "go"
    os.mkfifo(reached)
    os.mkfifo(go)
    script = tmp_path / "held.sh"
    script.write_text(
        "#!/bin/bash\ncase \"$1\" in\n"
        "  get_size) echo 8388608 ;;\n"
        "  pread) if [ $4 -ge 4194304 ] && mkdir " f"{tmp_path}/passed 2>/dev/null; then\n"
        f"      echo held > {reached}; cat {go} > /dev/null; fi\n"
        f"    tail -c +$(($4 + 1)) {data} | head -c $3 ;;\n"
        "  *) exit 2 ;;\nesac\n")
    script.chmod(0o755)
    sock = tmp_path / "held.sock"
    log = open(tmp_path / "nbdkit.log", "w")
    srv = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "sh", str(script)],
                           stdout=subprocess.DEVNULL, stderr=log)
    _wait_for(sock.exists, srv, "nbdkit's socket")
    fd = os.open(reached, os.O_RDONLY | os.O_NONBLOCK)
    got = bytearray()

    def wait(proc):
        def arrived():
            if select.select([fd], [], [], 0.05)[0]:
                got.extend(os.read(fd, 64))
            return got.endswith(b"\n")
        _wait_for(arrived, proc, "the held read")

    def release():
        if got:                     # the plugin waits to open the fifo: it opens at once
            with open(go, "w") as f:
                f.write("go\n")
    try:
        yield f"nbd+unix:///?socket={sock}", data, wait, release
    finally:
        os.close(fd)
        srv.terminate()
        srv.wait(WAIT)
        log.close()


def _held_run(held_source, args):
    uri, data, wait, release = held_source
    p = subprocess.Popen(BLKJOBS + [str(a).replace("URI", uri) for a in args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait(p)                     # blocked in its read of the source: running
        os.kill(p.pid, signal.SIGUSR1)
    finally:
        release()
    return _finish(p)


def test_convert_answers_on_stderr_and_carries_on(held_source, tmp_path):
    out = tmp_path / "out.raw"
    rc, o, e = _held_run(held_source, ["convert", "-f", "raw", "-O", "raw", "URI", out])
    assert (rc, o) == (0, "") and LINE.fullmatch(e), e
    assert out.read_bytes() == held_source[1].read_bytes()


def test_convert_p_leaves_it_alone(held_source, tmp_path):
    out = tmp_path / "out.raw"
    rc, o, e = _held_run(held_source, ["convert", "-p", "-f", "raw", "-O", "raw", "URI", out])
    assert rc == 0 and e == "" and "(100.00/100%)" in o.splitlines()[-1], (o, e)
    assert not any(LINE.fullmatch(x + "\n") for x in o.splitlines()), o
    assert out.read_bytes() == held_source[1].read_bytes()


def test_dd_carries_on_without_a_line(held_source, tmp_path):
    out = tmp_path / "out.raw"
    rc, o, e = _held_run(held_source, ["dd", "-f", "raw", "-O", "raw", "bs=1M", "if=URI",
                                       f"of={out}"])
    assert (rc, o, e) == (0, "", "")
    assert out.read_bytes() == held_source[1].read_bytes()


# -- a job held at a break point ---------------------------------------------------
def test_commit_answers_on_stderr_and_carries_on(tmp_path):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", base, "16M")
    qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    qemu_io(top, "write -P 7 0 8M")
    env = dict(os.environ, BLKJOBS_X_BREAK="base.qcow2:write_aio:1")
    p = subprocess.Popen(BLKJOBS + ["commit", "-f", "qcow2", str(top)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = p.stderr.readline()
    assert line.startswith("blkjobs: x-break: write_aio held"), line
    os.kill(p.pid, signal.SIGUSR1)
    p.stdin.write("go\n")
    p.stdin.flush()
    rc, o, e = _finish(p)
    assert (rc, o) == (0, "Image committed.\n") and LINE.fullmatch(e), e
    assert qemu_img("compare", "-f", "qcow2", "-F", "qcow2", base, top).returncode == 0


# -- blocked writing its output ----------------------------------------------------
def _full_pipe():
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETFL, os.O_NONBLOCK)
    filled = 0
    try:
        while True:
            filled += os.write(w, b"x" * 65536)
    except BlockingIOError:
        pass
    fcntl.fcntl(w, fcntl.F_SETFL, 0)
    return r, w, filled


def _blocked_writing(pid):
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return "pipe_write" in f.read()      # pipe_write, anon_pipe_write
    except OSError:
        return False


def blocked_output_run(args, cwd):
    """Run ``blkjobs ARGS`` with stdout a full pipe; once it is blocked
    writing there, SIGUSR1, then drain. (status, stdout, stderr)."""
    r, w, filled = _full_pipe()
    try:
        p = subprocess.Popen(BLKJOBS + [str(a) for a in args], stdout=w,
                             stderr=subprocess.PIPE, text=True, cwd=cwd)
    finally:
        os.close(w)
    with os.fdopen(r, "rb") as rf:
        _wait_for(lambda: _blocked_writing(p.pid), p, "a write to the full pipe")
        os.kill(p.pid, signal.SIGUSR1)
        out = rf.read()
    rc, _, e = _finish(p)
    assert out[:filled] == b"x" * filled
    # as text mode reads it (universal newlines), qemu-img's run below too
    return rc, out[filled:].decode().replace("\r\n", "\n").replace("\r", "\n"), e


@pytest.mark.parametrize("args", [
    ["create", "-f", "raw", "-o", "preallocation=full", "c.raw", "64M"],
    ["create", "-f", "qcow2", "-o", "preallocation=full", "c.qcow2", "64M"],
    ["resize", "--preallocation=full", "-f", "qcow2", "r.qcow2", "64M"],
    ["measure", "-O", "qcow2", "-f", "qcow2", "r.qcow2"],
    ["check", "r.qcow2"],
    ["compare", "r.qcow2", "r.qcow2"],
    ["amend", "-p", "-o", "compat=1.1", "r.qcow2"],
    ["rebase", "-p", "-u", "-b", "", "r.qcow2"],
], ids=lambda a: " ".join(a[:2]))
def test_no_command_ends_on_sigusr1(tmp_path, args):
    """Each gives qemu-img's complete output and status; no line for a
    signal after the meter's end (or with -p), none without a meter."""
    for d in ("ours", "theirs"):
        (tmp_path / d).mkdir()
        qemu_img("create", "-f", "qcow2", tmp_path / d / "r.qcow2", "1M")
    rc, out, err = blocked_output_run(args, tmp_path / "ours")
    theirs = subprocess.run(["qemu-img", *args], cwd=tmp_path / "theirs",
                            capture_output=True, text=True, timeout=WAIT)
    if args[0] == "rebase":     # our -p line there is the richer one, not qemu-img's
        assert (rc, err) == (theirs.returncode, theirs.stderr) and "(100.00/100%)" in out
    else:
        assert (rc, out, err) == (theirs.returncode, theirs.stdout, theirs.stderr)
    name = args[-2] if args[0] in ("create",) else "r.qcow2"
    if args[0] in ("create", "resize"):
        assert qemu_img("compare", tmp_path / "ours" / name,
                        tmp_path / "theirs" / name).returncode == 0


def test_bench_answers_with_its_current_stage(tmp_path):
    """Blocked writing its first stage line to a full stderr pipe: the
    signal then, one ``now: STAGE`` line, the bench carries on to its table."""
    r, w, filled = _full_pipe()
    try:
        p = subprocess.Popen(BLKJOBS + ["bench", str(tmp_path), "-w", "seqread", "-b", "64k",
                                        "--size", "4M", "--repeat", "1", "--warmup", "0"],
                             stdout=subprocess.PIPE, stderr=w, text=True)
    finally:
        os.close(w)
    with os.fdopen(r, "rb") as rf:
        _wait_for(lambda: _blocked_writing(p.pid), p, "a write to the full pipe")
        os.kill(p.pid, signal.SIGUSR1)
        err = rf.read()[filled:].decode()
    rc, out, _ = _finish(p)
    assert rc == 0 and "seqread" in out, (out, err)
    stage = err.splitlines()[0]
    assert err.splitlines().count(f"now: {stage}") == 1, err
    assert [x for x in err.splitlines() if x.startswith("now: ")] == [f"now: {stage}"], err
    assert os.listdir(tmp_path) == []


def test_bench_children_get_sigusr1_back(tmp_path):
    """blkjobs holds SIGUSR1 blocked (and Python ignores SIGPIPE); the tools
    `bench --compare` runs get neither: their /proc/PID/status has no
    SIGUSR1 bit in SigBlk or SigIgn, and no SIGPIPE bit in SigIgn. Stand-in
    fio and dd on PATH record what they got (fio then prints a real
    report); they are perl scripts, as perl leaves the mask and these
    dispositions as it found them (a shell clears its mask)."""
    sample = os.path.join(os.path.dirname(__file__), "data", "fio-randread-4k-2jobs.json")
    bindir, work = tmp_path / "bin", tmp_path / "work"
    bindir.mkdir()
    work.mkdir()
    for tool, then in (("fio", f'open(my $j, "<", "{sample}"); print <$j>;'), ("dd", "")):
        script = bindir / tool
        script.write_text(f'#!/usr/bin/perl\nopen(my $s, "<", "/proc/self/status");\n'
                          f'open(my $o, ">", "{tmp_path}/{tool}.status");\n'
                          f'print $o grep {{ /^Sig/ }} <$s>;\nclose($o);\n{then}\n')
        script.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    r = subprocess.run(BLKJOBS + ["bench", str(work), "-q", "-w", "seqread", "-b", "64k",
                                  "--size", "1M", "--repeat", "1", "--warmup", "0",
                                  "--compare", "fio,dd"],
                       env=env, capture_output=True, text=True, timeout=WAIT)
    assert r.returncode == 0, r.stderr
    assert [ln.split()[5] for ln in r.stdout.splitlines()[1:4]] == ["blkjobs", "fio", "dd"]

    def bit(sig):
        return 1 << (sig - 1)
    for tool in ("fio", "dd"):
        status = dict(ln.split(":\t") for ln in
                      (tmp_path / f"{tool}.status").read_text().splitlines())
        blk, ign = int(status["SigBlk"], 16), int(status["SigIgn"], 16)
        assert not blk & bit(signal.SIGUSR1), (tool, status)
        assert not ign & bit(signal.SIGUSR1), (tool, status)
        assert not ign & bit(signal.SIGPIPE), (tool, status)
    assert os.listdir(work) == []
