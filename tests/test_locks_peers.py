"""QEMU's lock bytes against real peers: an image held by qemu-storage-daemon
(read-write and read-only blockdevs) or by qemu-io (read-write and -r), and a
second blkjobs process running a job.

The oracle is qemu-img 7.2 itself: for each command, blkjobs and qemu-img run
with the same arguments against the same holder, and must agree on the exit
status and, when they fail, on the error text (program name aside)."""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from conftest import BLKJOBS, run_blkjobs
from qemu_oracle import qemu_img, qemu_io, to_raw

MiB = 1 << 20
TIMEOUT = 30

# Every command runs in a directory holding: held.qcow2 (the held image),
# over.qcow2 (backed by held.qcow2), base.qcow2 <- top.qcow2, other.qcow2.
COMMANDS = [
    "info held.qcow2",
    "info -U held.qcow2",
    "info over.qcow2",
    "info --backing-chain over.qcow2",
    "map --output json held.qcow2",
    "map -U --output json held.qcow2",
    "map --output json over.qcow2",
    "check held.qcow2",
    "check -U held.qcow2",
    "check -r all held.qcow2",
    "check -r leaks -U held.qcow2",
    "check over.qcow2",
    "compare held.qcow2 other.qcow2",
    "compare -U held.qcow2 other.qcow2",
    "convert -O qcow2 held.qcow2 new.qcow2",
    "convert -U -O qcow2 held.qcow2 new.qcow2",
    "convert -O qcow2 over.qcow2 new.qcow2",
    "convert -n -O qcow2 other.qcow2 held.qcow2",
    "convert -U -n -O qcow2 other.qcow2 held.qcow2",
    "convert -O qcow2 other.qcow2 held.qcow2",
    "convert -O raw other.qcow2 held.qcow2",
    "convert -O qcow2 -B held.qcow2 -F qcow2 other.qcow2 new.qcow2",
    "rebase -u -b other.qcow2 -F qcow2 held.qcow2",
    "rebase -U -u -b other.qcow2 -F qcow2 held.qcow2",
    "rebase -b other.qcow2 -F qcow2 held.qcow2",
    "rebase -u -b held.qcow2 -F qcow2 top.qcow2",
    "rebase -b held.qcow2 -F qcow2 top.qcow2",
    "rebase -U -b held.qcow2 -F qcow2 top.qcow2",
    "rebase -u -b base.qcow2 -F qcow2 over.qcow2",
    "rebase -b base.qcow2 -F qcow2 over.qcow2",
    "commit over.qcow2",
    "commit held.qcow2",
    "create -f qcow2 held.qcow2 1M",
]


_SPARES = ("over.qcow2", "base.qcow2", "top.qcow2", "other.qcow2")


def _make_spares(d):
    """The images but held.qcow2, as qemu-img creates them, in ``d``
    (their backing names are relative: copies elsewhere work alike)."""
    d.mkdir()
    qemu_img("create", "-u", "-f", "qcow2", "-b", "held.qcow2", "-F", "qcow2",
             d / "over.qcow2", "1M")
    qemu_img("create", "-f", "qcow2", d / "base.qcow2", "1M")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d / "top.qcow2")
    qemu_img("create", "-f", "qcow2", d / "other.qcow2", "1M")


def _fresh(d, spares):
    """(Re)make every image but held.qcow2, which the holder keeps open:
    copies of the ones qemu-img made once (4 creates per command and tool
    cost more than 250 qemu-img processes per holder)."""
    for name in (*_SPARES, "new.qcow2"):
        p = d / name
        if p.exists():
            p.unlink()
    for name in _SPARES:
        shutil.copyfile(spares / name, d / name)


class Holder:
    """A QEMU process keeping ``held.qcow2`` open until :meth:`stop`."""

    def __init__(self, kind: str, d):
        self.kind = kind
        if kind.startswith("qsd"):
            ro = "on" if kind == "qsd-ro" else "off"
            sock = str(d / "qsd.sock")
            self.proc = subprocess.Popen(
                [shutil.which("qemu-storage-daemon"),
                 "--blockdev", f"driver=file,node-name=f,filename={d / 'held.qcow2'},"
                               f"read-only={ro}",
                 "--blockdev", f"driver=qcow2,node-name=n,file=f,read-only={ro}",
                 "--chardev", f"socket,path={sock},server=on,wait=off,id=m0",
                 "--monitor", "chardev=m0"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            # the blockdevs (and their locks) exist before the monitor listens
            deadline = time.monotonic() + TIMEOUT
            while not os.path.exists(sock):
                assert self.proc.poll() is None, self.proc.stderr.read()
                assert time.monotonic() < deadline, "qemu-storage-daemon did not start"
                time.sleep(0.02)
        else:
            args = [shutil.which("qemu-io"), "-f", "qcow2"]
            if kind == "io-ro":
                args.append("-r")
            self.proc = subprocess.Popen(args + [str(d / "held.qcow2")], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True)
            # it answers a read once the image is open (and locked)
            self.proc.stdin.write("read 0 512\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
            assert "read 512/512" in line, line + self.proc.stderr.read()

    def stop(self):
        if self.kind.startswith("io"):
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            for f in (self.proc.stdout, self.proc.stderr):
                f.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qsd-rw", "qsd-ro", "io-rw", "io-ro"])
def test_commands_lock_like_qemu_img(tmp_path, kind):
    """Every image command against every holder: same exit status as
    qemu-img 7.2, and on failure the same error text."""
    d = tmp_path
    qemu_img("create", "-f", "qcow2", d / "held.qcow2", "1M")
    qemu_io(d / "held.qcow2", "write -P 0x5a 0 64k")
    before = (d / "held.qcow2").read_bytes()
    _make_spares(d / "spares")
    holder = Holder(kind, d)
    mismatches = []
    try:
        for cmd in COMMANDS:
            results = []
            for tool in (BLKJOBS, [shutil.which("qemu-img")]):
                _fresh(d, d / "spares")
                p = subprocess.run(tool + cmd.split(), capture_output=True, text=True,
                                   cwd=d, timeout=120)
                results.append(p)
            ours, theirs = results
            assert "Traceback" not in ours.stderr, ours.stderr
            want = theirs.stderr.replace("qemu-img: ", "blkjobs: ")
            if ours.returncode != theirs.returncode or \
                    (theirs.returncode != 0 and ours.stderr != want):
                mismatches.append(f"{cmd}: blkjobs rc={ours.returncode} {ours.stderr!r}; "
                                  f"qemu-img rc={theirs.returncode} {theirs.stderr!r}")
    finally:
        holder.stop()
    assert not mismatches, "\n".join(mismatches)
    assert (d / "held.qcow2").read_bytes() == before      # nobody wrote the held image


# ---------------------------------------------------------------------------
# a second blkjobs process


def _held(p):
    """Wait until the job command says its job is held at its break point
    (BLKJOBS_X_BREAK): it runs, with its images open and locked."""
    line = p.stderr.readline()
    assert line.startswith("blkjobs: x-break: "), line + p.stderr.read()


def _job(args, cwd, held):
    """A job command whose first write to the image ``held`` waits at a break
    point until its stdin is closed (:func:`_finish`)."""
    env = dict(os.environ, BLKJOBS_X_BREAK=f"{held}:write_aio:1")
    return subprocess.Popen(BLKJOBS + [str(a) for a in args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=cwd, env=env)


def _finish(p):
    try:
        out, err = p.communicate(timeout=120)      # closes stdin: the job goes on
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert "Traceback" not in err, err
    return p.returncode, err


def _img(path, size, *writes):
    qemu_img("create", "-f", "qcow2", path, size)
    if writes:
        qemu_io(path, *writes)
    return path


def test_convert_n_into_a_running_backups_target_is_refused(tmp_path):
    src = _img(tmp_path / "src.qcow2", "1M", "write -P 0x11 0 1M")
    other = _img(tmp_path / "other.qcow2", "1M", "write -P 0x77 0 1M")
    job = _job(["backup", "src.qcow2", "tgt.qcow2"], tmp_path, "tgt.qcow2")
    try:
        _held(job)
        p = run_blkjobs("convert", "-n", "-O", "qcow2", other, tmp_path / "tgt.qcow2")
        assert p.returncode == 1
        assert p.stderr == (f"blkjobs: Could not open '{tmp_path / 'tgt.qcow2'}': Failed to get "
                            "\"write\" lock\nIs another process using the image "
                            f"[{tmp_path / 'tgt.qcow2'}]?\n")
        # nor may anything else write the source of the backup meanwhile
        w = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x99 0 4k", str(src)],
                           capture_output=True, text=True, timeout=TIMEOUT)
        assert w.returncode == 1
        assert w.stderr == (f"qemu-io: can't open device {src}: Failed to get \"write\" lock\n"
                            f"Is another process using the image [{src}]?\n")
    finally:
        rc, err = _finish(job)
    assert rc == 0, err
    assert qemu_img("compare", src, tmp_path / "tgt.qcow2").returncode == 0


def test_convert_n_into_a_running_commits_base_is_refused(tmp_path):
    base = _img(tmp_path / "base.qcow2", "1M", "write -P 0x11 0 1M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qemu_io(top, "write -P 0x22 0 512k")
    view = to_raw(top, tmp_path)
    other = _img(tmp_path / "other.qcow2", "1M", "write -P 0x77 0 1M")
    job = _job(["commit", "top.qcow2"], tmp_path, "base.qcow2")
    try:
        _held(job)
        p = run_blkjobs("convert", "-n", "-O", "qcow2", other, base)
        assert p.returncode == 1
        assert p.stderr == (f"blkjobs: Could not open '{base}': Failed to get \"write\" lock\n"
                            f"Is another process using the image [{base}]?\n")
    finally:
        rc, err = _finish(job)
    assert rc == 0, err
    assert to_raw(top, tmp_path) == view          # the top's guest view is intact
    assert to_raw(base, tmp_path) == view


def test_convert_n_into_the_sources_own_backing_file_is_refused(tmp_path):
    base = _img(tmp_path / "base.qcow2", "1M", "write -P 0x11 0 1M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qemu_io(top, "write -P 0x22 0 64k")
    view = to_raw(top, tmp_path)
    before = base.read_bytes()
    for extra in (["-n"], []):
        p = run_blkjobs("convert", *extra, "-O", "qcow2", top, base)
        assert p.returncode == 1
        assert p.stderr == (f"blkjobs: Could not open '{base}': Failed to get \"write\" lock\n"
                            f"'{base}' is in the backing chain of the source '{top}' (writing "
                            "it would change what the source reads)\n")
        assert base.read_bytes() == before
        assert to_raw(top, tmp_path) == view
    # qemu-img refuses it too (its lock error)
    assert qemu_img("convert", "-n", "-O", "qcow2", top, base, check=False).returncode == 1


def test_rebase_u_without_backing_format_is_refused(tmp_path):
    """qemu-img 7.2 will not record a probed backing format (safe mode either)."""
    _img(tmp_path / "new.qcow2", "1M")
    top = _img(tmp_path / "top.qcow2", "1M", "write -P 0x22 0 64k")
    before = top.read_bytes()
    for extra in (["-u"], []):
        args = ["rebase", *extra, "-b", "new.qcow2", "top.qcow2"]
        ours = subprocess.run(BLKJOBS + args, capture_output=True, text=True, cwd=tmp_path)
        theirs = subprocess.run(["qemu-img", *args], capture_output=True, text=True,
                                cwd=tmp_path)
        assert ours.returncode == theirs.returncode == 1
        assert ours.stderr == "blkjobs: Could not change the backing file to 'new.qcow2': " \
                              "backing format must be specified\n"
        assert ours.stderr == theirs.stderr.replace("qemu-img: ", "blkjobs: ")
        assert top.read_bytes() == before


@pytest.mark.parametrize("cmd", ["backup", "mirror"])
def test_copy_job_onto_its_own_source_is_refused(tmp_path, cmd):
    src = _img(tmp_path / "src.qcow2", "1M", "write -P 0x11 0 1M")
    os.symlink("src.qcow2", tmp_path / "link.qcow2")
    before = src.read_bytes()
    for target in (src, tmp_path / "link.qcow2"):
        p = run_blkjobs(cmd, src, target)
        assert p.returncode == 1
        assert p.stderr == f"blkjobs: source and target are the same file: '{src}'\n"
    assert src.read_bytes() == before
