"""External tools in `bench --compare` are measured on their own: the peak
RSS is the tool's, not the memory it inherited from our Python process
before exec (which wait4() would report)."""
from __future__ import annotations

import resource

from blkjobs.diskbench.measure import run_external


def test_external_rss_is_the_tools_own():
    ours = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert ours > 20 << 20                       # pytest + blkjobs: well above `true`
    r = run_external(["true"])
    assert r.rc == 0
    assert 0 < r.rss_bytes < 8 << 20


def test_external_failure_keeps_exit_code():
    r = run_external(["sh", "-c", "echo oops >&2; exit 3"])
    assert r.rc == 3
    assert r.err == "oops\n"          # the tool's stderr only, nothing of GNU time


def test_interrupted_tool_is_killed_with_its_children(tmp_path):
    # Ctrl-C during a run: the tool goes, and what it started too (GNU time
    # runs the tool as its child; a tool may have its own)
    import os
    import signal
    import threading
    import time

    import pytest
    pidfile = tmp_path / "pid"

    def interrupt_once_started():
        end = time.monotonic() + 60
        while not (pidfile.exists() and pidfile.read_text().endswith("\n")):
            if time.monotonic() > end:
                return
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)
    t = threading.Thread(target=interrupt_once_started)
    t.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_external(["sh", "-c", f"sleep 600 & echo $! > {pidfile}; wait"])
    finally:
        t.join()
    grandchild = int(pidfile.read_text())
    end = time.monotonic() + 60
    while _alive(grandchild):
        assert time.monotonic() < end, "the tool's child outlived the interrupt"
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"    # a zombie is gone
    except FileNotFoundError:
        return False
