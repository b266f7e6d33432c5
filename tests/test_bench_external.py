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
