"""blkjobs bench removes what it made when interrupted: Ctrl-C (SIGINT) and
SIGTERM of the real command, and a KeyboardInterrupt inside a run."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from blkjobs.diskbench.matrix import Case
from blkjobs.diskbench.contenders import Contender
from blkjobs.diskbench.runner import Runner, Settings


@pytest.fixture
def shm(tmp_path):
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else str(tmp_path)
    d = tempfile.mkdtemp(prefix="test-bench.", dir=base)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _wait_for_io(d, proc, deadline=60.0):
    """Wait until the run is past its layout (data.dat exists, full size)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()
        for sub in os.listdir(d):
            p = os.path.join(d, sub, "data.dat")
            if os.path.exists(p) and os.path.getsize(p) == 16 << 20:
                return
        time.sleep(0.02)
    raise AssertionError("the benchmark never started")


@pytest.mark.parametrize("sig,code,said", [(signal.SIGINT, 130, "interrupted"),
                                           (signal.SIGTERM, 143, "terminated")])
def test_signal_removes_files(shm, sig, code, said):
    # --runtime 60 keeps it busy in the C loop until the signal comes.
    proc = subprocess.Popen(
        [sys.executable, "-m", "blkjobs", "bench", shm, "-w", "seqread", "-b", "64k",
         "--size", "16M", "--runtime", "60", "--repeat", "1", "--warmup", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_io(shm, proc)         # past its layout: measuring, for 60 s
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    assert out == ""
    assert err.endswith(f"blkjobs: {said}\n"), err
    assert "Traceback" not in err
    assert os.listdir(shm) == []


class Interrupting(Contender):
    name = "blkjobs"

    def __init__(self):
        self.runs = 0

    def run(self, case, env, progress):
        self.runs += 1
        assert os.path.exists(env.data_file)
        raise KeyboardInterrupt


def test_keyboard_interrupt_inside_a_run(shm):
    s = Settings(dir=shm, cases=[Case("seqread", 65536, 1, False)], size=1 << 20)
    c = Interrupting()
    with pytest.raises(KeyboardInterrupt):
        Runner(s, contenders=[c]).run()
    assert c.runs == 1
    assert os.listdir(shm) == []


@pytest.mark.parametrize("which", ["ioloop", "copy"])
def test_close_interrupted_as_the_free_returns_frees_once(which, monkeypatch, tmp_path):
    """A signal's exception raised right as the C free returns (SIGTERM
    during the join of the loop's threads) left the pointer on the object,
    and __del__ freed it again: 'double free or corruption' in CI."""
    import blkjobs.native.copy as copy_mod
    import blkjobs.native.ioloop as ioloop_mod
    mod, free = (ioloop_mod, "bj_ioloop_free") if which == "ioloop" else (copy_mod, "bj_copy_free")
    real = mod.lib

    class Interrupting:
        def __getattr__(self, name):
            return getattr(real, name)

    def interrupted_free(obj):
        getattr(real, free)(obj)
        raise KeyboardInterrupt         # what the signal handler raises

    proxy = Interrupting()
    setattr(proxy, free, interrupted_free)
    p = tmp_path / "f"
    p.write_bytes(bytes(1 << 20))
    fd = os.open(p, os.O_RDWR)
    if which == "ioloop":
        obj = ioloop_mod.IOLoop(fd, write=False, random=False, bs=65536, size=1 << 20)
    else:
        obj = copy_mod.CopyEngine(fd, fd, threads=1)
    monkeypatch.setattr(mod, "lib", proxy)
    with pytest.raises(KeyboardInterrupt):
        obj.close()
    monkeypatch.setattr(mod, "lib", real)
    obj.close()                         # __del__'s call: must free nothing
    assert getattr(obj, "_b" if which == "ioloop" else "_c") is None
    os.close(fd)
