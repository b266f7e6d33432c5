"""qemu-iotests 162: the legacy NBD address options of a ``json:`` name
(``host``/``port``, ``path``, of any JSON type) and the names qemu-img
shows for NBD and blkdebug nodes, against the real qemu-img. The servers
are qemu-nbd without ``--persistent``: they serve one connection, so the
image must be opened with one."""
from __future__ import annotations

import socket
import subprocess

import pytest

from test_parity_invocation import run, same, twins  # noqa: F401  (twins: a fixture)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image_line(d, name):
    rc, out, err = run(d, "info", name)
    return rc, [ln for ln in out.splitlines() if ln.startswith("image:")], err


def test_legacy_host_port_one_connection(twins):
    lines = []
    for d in twins:
        port = _free_port()
        subprocess.run(["qemu-nbd", "-p", str(port), "-f", "raw", "--fork", "null-co://"],
                       check=True, timeout=60)
        rc, image, err = _image_line(d, f"json:{{'driver': 'nbd', 'host': 'localhost', "
                                        f"'port': {port}}}")
        lines.append((rc, [ln.replace(str(port), "PORT") for ln in image], err))
    assert lines[0] == lines[1] == (0, ["image: nbd://localhost:PORT"], "")


def test_legacy_path_one_connection(twins):
    lines = []
    for d in twins:
        subprocess.run(["qemu-nbd", "-k", str(d / "42"), "-f", "raw", "--fork", "null-co://"],
                       check=True, timeout=60)
        lines.append(_image_line(d, 'json:{"driver": "nbd", "path": 42}'))
    assert lines[0] == lines[1] == (0, ["image: nbd+unix://?socket=42"], "")


@pytest.mark.parametrize("name", [
    'json:{"driver": "nbd", "host": -1}',                   # resolution fails
    'json:{"driver": "nbd", "path": "nosuch.sock"}',
    'json:{"driver": "nbd", "path": "x", "host": "y"}',
    'json:{"driver": "nbd", "path": "x", "port": 1}',
    'json:{"driver": "nbd", "host": "localhost", "port": 1}',   # refused
    'json:{"driver": "nbd", "server": {"type": "unix", "path": "nosuch.sock"}}',
])
def test_legacy_nbd_refusals(twins, name):
    rc, out, err = same(twins, "info", name)
    assert (rc, out) == (1, "") and err.count("\n") == 1


def test_blkdebug_name(twins):
    for d in twins:
        (d / "42").touch()
    outs = [_image_line(d, 'json:{"driver": "blkdebug", "config": 42, '
                           '"image.driver": "null-co"}') for d in twins]
    assert outs[0] == outs[1] == (0, ["image: blkdebug:42:null-co://"], "")


@pytest.mark.parametrize("args", [
    ['json:{"driver": "ssh", "host": "localhost", "port": "0", "path": "/foo"}'],  # refused
    ["--image-opts", "driver=ssh,host=localhost,port=0,path=/foo"],
    ['json:{"driver": "ssh", "host": "localhost", "port": 0.42, "path": "/foo"}'],
    ["--image-opts", "driver=ssh,host=localhost,port=0.42,path=/foo"],
    ['json:{"driver": "ssh", "host": "localhost", "port": 0}'],           # no path
    ['json:{"driver": "ssh", "port": 1, "path": "/x"}'],
    ['json:{"driver": "ssh", "path": "/x"}'],
    ['json:{"driver": "ssh", "server": {"host": "localhost", "port": "1"}, "path": "/x"}'],
    ['json:{"driver": "ssh", "host": "nonexist.invalid", "path": "/x"}'],
])
def test_ssh_options_and_connection_failures(twins, args):
    """What 162 asks of ssh needs no SSH server: the options are checked
    and the connection fails, in qemu-img's words."""
    rc, out, err = same(twins, "info", *args)
    assert (rc, out) == (1, "") and err.count("\n") == 1
