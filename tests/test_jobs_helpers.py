"""Helpers shared by the tests of blkjobs.jobs (no tests here).

Expectations are built independently of blkjobs: images are made and
filled with qemu-img/qemu-io, snapshots taken with ``qemu-img convert``
before a job starts, and results checked with ``qemu-img compare``.
"""
from __future__ import annotations

import random
import shutil
import subprocess
import threading

import pytest

from blkjobs.engine import Engine

MiB = 1 << 20
SIZE = 4 * MiB


def tool(name):
    path = shutil.which(name)
    if not path:
        pytest.fail(f"{name} is not installed: the oracle is required")
    return path


def qimg(*args):
    p = subprocess.run([tool("qemu-img"), *map(str, args)], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, f"qemu-img {args}: {p.stdout}{p.stderr}"
    return p.stdout


def qio(path, fmt, *cmds):
    args = [tool("qemu-io"), "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    p = subprocess.run(args + [str(path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "error" not in p.stdout.lower(), p.stdout + p.stderr


def mkimg(path, fmt="qcow2", size=SIZE, backing=None, backing_fmt=None, writes=()):
    """Create an image and write (pattern, offset, length) into it; a
    pattern of None writes zeroes (write -z)."""
    args = ["create", "-f", fmt]
    if backing:
        args += ["-b", backing, "-F", backing_fmt or "qcow2"]
    qimg(*args, path, size)
    cmds = [f"write -z {o} {n}" if p is None else f"write -P {p} {o} {n}"
            for p, o, n in writes]
    if cmds:
        qio(path, fmt, *cmds)
    return str(path)


def snapshot(path, fmt, out):
    """The guest view of ``path`` now, as a raw file (independent oracle).
    ``-U``: the engine may hold the image (a qcow2 node opened read-write
    refuses other readers' stable view, as qemu-storage-daemon's does); the
    tests take it while nothing writes."""
    qimg("convert", "-U", "-f", fmt, "-O", "raw", path, out)
    return str(out)


def same(a, b, fa="raw", fb="raw"):
    p = subprocess.run([tool("qemu-img"), "compare", "-f", fa, "-F", fb, str(a), str(b)],
                       capture_output=True, text=True, timeout=60)
    return p.returncode == 0, p.stdout + p.stderr


def assert_same(a, b, fa="raw", fb="raw"):
    ok, out = same(a, b, fa, fb)
    assert ok, out


def backing_of(path):
    import json
    info = json.loads(qimg("info", "--output", "json", "-U", path))
    return info.get("backing-filename")


def wait_writes(w, n, timeout=20):
    import time
    end = time.monotonic() + timeout
    start = w.count
    while w.count < start + n:
        assert time.monotonic() < end, "writer made no progress"
        time.sleep(0.005)


def hold_nth(eng, node, event, n, tag):
    """With a break point ``tag`` on ``event`` of ``node`` set before the job
    started: hold the ``n``-th request raising it (1: the first), each one
    before it let go with the break point set again. Returns the held
    request (``blkdebug.Suspended``); ``eng.blkdebug_resume(tag)`` lets it go."""
    held = eng.blkdebug_wait_break(tag)
    for _ in range(n - 1):
        eng.blkdebug_break(node, event, tag)
        eng.blkdebug_resume(tag)
        held = eng.blkdebug_wait_break(tag)
    return held


#: A job speed that only makes its batches 1 MiB (speed // 10): a break point
#: at the n-th write then holds the copy at offset (n - 1) MiB. Set the speed
#: to 0 once the job is held, so that nothing waits for the rate limit.
MIB_BATCHES = 10 * MiB


def chain3(tmp_path, base_fmt="qcow2"):
    """base <- mid <- top, each layer with its own data (and a zero cluster
    in mid over base data); returns the three paths."""
    base = mkimg(tmp_path / f"base.{base_fmt}", base_fmt,
                 writes=[("0x41", 0, 2 * MiB), ("0x42", 3 * MiB, 1 * MiB)])
    mid = mkimg(tmp_path / "mid.qcow2", backing=f"base.{base_fmt}", backing_fmt=base_fmt,
                writes=[("0x51", 1 * MiB, 1536 << 10), (None, 3 * MiB, 128 << 10)])
    top = mkimg(tmp_path / "top.qcow2", backing="mid.qcow2",
                writes=[("0x61", 0, 256 << 10), ("0x62", 2 * MiB + 8192, 4096)])
    return base, mid, top


def check(path):
    qimg("check", "-U", path)


class Writer(threading.Thread):
    """Random writes (4 KiB aligned, random sizes) through a front end until
    stopped; remembers every write so the final content can be modelled."""

    def __init__(self, fe, size, seed=7, max_len=64 << 10, pause=0.0, zeroes=True,
                 model=None):
        super().__init__(daemon=True)
        self.model = model          # a bytearray of the guest view, kept up to date
        self.fe, self.size = fe, size
        self.rnd = random.Random(seed)
        self.max_len = max_len
        self.pause = pause
        self.zeroes = zeroes
        self.stop_ev = threading.Event()
        self.count = 0
        self.error = None

    def run(self):
        import time
        try:
            while not self.stop_ev.is_set():
                n = self.rnd.randrange(1, self.max_len // 4096 + 1) * 4096
                off = self.rnd.randrange(0, (self.size - n) // 4096 + 1) * 4096
                if self.zeroes and self.rnd.random() < 0.1:
                    self.fe.write_zeroes(off, n)
                    data = bytes(n)
                else:
                    data = self.rnd.randbytes(n)
                    self.fe.write(off, data)
                if self.model is not None:
                    self.model[off:off + n] = data
                self.count += 1
                if self.pause:
                    time.sleep(self.pause)
        except BaseException as e:  # reported by stop()
            self.error = e

    def stop(self):
        self.stop_ev.set()
        self.join(30)
        assert not self.is_alive(), "writer hung"
        if self.error:
            raise self.error


@pytest.fixture
def eng():
    e = Engine()
    yield e
    e.close()
    assert not e.jobs.internal_errors, e.jobs.internal_errors
