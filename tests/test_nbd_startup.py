"""Start-up of an NBD copy: every module imported is CPU time before the
first request (on the shared machine, wall time several times over), so a
``convert`` from an export does not load what it does not use -- luks
(hashlib, uuid), the secrets objects, json, urllib.parse (ipaddress) --
and the URI is still shown as with urllib's split."""
from __future__ import annotations

import subprocess
import sys

import pytest

from test_nbd_client import servers  # noqa: F401

NOT_LOADED = ("blkjobs.formats.luks", "blkjobs.formats.secrets", "json", "urllib.parse",
              "ipaddress", "hashlib", "uuid")


def test_an_nbd_convert_imports_nothing_it_does_not_use(tmp_path, servers):
    _, nbdkit = servers
    s = nbdkit("memory", "1M")
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "blkjobs", "convert", s.uri,
                        str(tmp_path / "out.raw")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    loaded = {line.rpartition("|")[2].strip() for line in r.stderr.splitlines()
              if line.startswith("import time:")}
    assert "blkjobs.native.nbd" in loaded
    assert sorted(loaded & set(NOT_LOADED)) == []


def _urllib_display(uri: str) -> str:
    """formats.nbd.display_name as it was, on urllib.parse."""
    from urllib.parse import parse_qs, unquote, urlsplit
    try:
        u = urlsplit(uri)
        export = unquote(u.path[1:]) if u.path.startswith("/") else unquote(u.path)
        if "unix" in u.scheme:
            sock = parse_qs(u.query).get("socket", [""])[0]
            return f"nbd+unix://{'/' + export if export else ''}?socket={sock}"
        if "+" in u.scheme and "tcp" not in u.scheme:
            return uri
        host = u.hostname or "localhost"
        if ":" in host:
            host = f"[{host}]"
        return f"nbd://{host}:{u.port or 10809}{'/' + export if export else ''}"
    except ValueError:
        return uri


@pytest.mark.parametrize("uri", [
    "nbd+unix:///?socket=/tmp/a.sock", "nbd+unix:///exp?socket=/tmp/a.sock",
    "nbd://localhost:10809/e", "nbd://HOST/e", "nbd://h:99999/x", "nbd://[::1]:5/x",
    "nbds://alice@host:123/x?tls-psk-file=f", "nbds+unix://alice@/?socket=S&tls-psk-file=F",
    "nbd://h", "nbd://h/", "nbd+vsock://2:10809/x", "nbd+tcp://h:1/x", "NBD://H:1/X",
    "nbd://h:/x", "nbd://h:ab/x", "nbd+unix://?socket=/x y", "nbd+unix:///a%20b?socket=/x",
    "nbd://h/x/y", "nbd+unix:///?socket=", "nbd+unix:///?socket=a&socket=b",
    "nbd+unix:///?socket=/s+t", "nbd://h:1/x#frag", "nbd://h:\u0661/x"])
def test_the_uri_is_shown_as_urllib_splits_it(uri):
    from blkjobs.formats.nbd import display_name
    assert display_name(uri) == _urllib_display(uri)


def test_one_connection_per_cpu_at_most_four(servers):
    """nbdcopy's rule for a multi-conn export (its threads are the CPUs)."""
    import os

    from blkjobs.formats.nbd import Nbd
    _, nbdkit = servers
    s = nbdkit("memory", "1M")
    drv = Nbd(s.uri)
    try:
        assert drv.connections == min(4, len(os.sched_getaffinity(0)))
    finally:
        drv.close()
