"""Helpers for the NBD export tests: the real peers (qemu-nbd, nbdinfo,
nbdcopy, qemu-io, qemu-img) run as subprocesses against ``blkjobs serve``'s
exports. Every wait has a timeout; every server started is stopped."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from daemon_util import TIMEOUT, start_blkjobs


def tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.fail(f"{name} is not installed (make deps): it is an NBD peer of the tests")
    return path


def uri(sock: str, name: str) -> str:
    return f"nbd+unix:///{name}?socket={sock}"


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([tool(argv[0]), *argv[1:]], capture_output=True, text=True,
                       timeout=120)
    if check:
        assert p.returncode == 0, (argv, p.stdout, p.stderr)
    return p


def nbd_map(u: str, context: str | None = None) -> str:
    """``nbdinfo --map[=CONTEXT]`` output."""
    return run("nbdinfo", f"--map={context}" if context else "--map", u).stdout


def qemu_io_nbd(u: str, *cmds: str, read_only: bool = False) -> str:
    argv = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
    for c in cmds:
        argv += ["-c", c]
    p = run(*argv, u)
    assert "error" not in p.stdout.lower() and "failed" not in p.stdout.lower(), p.stdout
    return p.stdout


def _wait_for(path: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not os.path.exists(path):
        assert proc.poll() is None, f"server exited: {proc.stderr.read() if proc.stderr else ''}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


@contextlib.contextmanager
def qemu_nbd(image: str, sock: str, name: str, fmt: str = "qcow2",
             *extra: str) -> Iterator[str]:
    """``qemu-nbd`` serving ``image`` (persistent); yields the URI."""
    proc = subprocess.Popen([tool("qemu-nbd"), "-t", "-f", fmt, f"--socket={sock}", "-x", name,
                             *extra, image], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(sock, proc)
        yield uri(sock, name)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stderr:
            proc.stderr.close()


@contextlib.contextmanager
def blkjobs_export(tmp_path, image: str, name: str, writable: bool = False) -> Iterator[str]:
    """``blkjobs serve --export name=image[,writable]``; yields the URI."""
    sock = str(tmp_path / "blkjobs-nbd.sock")
    spec = f"{name}={image}" + (",writable" if writable else "")
    daemon = start_blkjobs(tmp_path, "--export", spec, "--nbd-socket", sock)
    try:
        yield uri(sock, name)
    finally:
        assert daemon.stop() == 0, daemon.stderr
