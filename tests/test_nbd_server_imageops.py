"""``-f raw`` / ``-F raw`` with NBD URIs in compare, convert, info and map:
raw over the NBD protocol node, as qemu-img reads them. Each command's
output and exit code equal qemu-img's, against our export and against
qemu-nbd's (``compare -f raw nbd+unix://...`` used to compare the URI as a
file name: "No such file or directory")."""
from __future__ import annotations

import contextlib
import subprocess

import pytest

from conftest import run_blkjobs
from nbd_peers import blkjobs_export, qemu_nbd
from qemu_oracle import qemu_img

MiB = 1 << 20


@pytest.fixture(params=["blkjobs", "qemu-nbd"])
def served(request, tmp_path):
    """(URI, the qcow2 image it serves, the same as raw, another raw image)."""
    img = str(tmp_path / "d.qcow2")
    qemu_img("create", "-f", "qcow2", img, "4M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 1M", "-c",
                    "write -z 2M 64k", "-c", "write -P 0x62 3M 4k", img],
                   check=True, capture_output=True)
    raw = str(tmp_path / "d.raw")
    qemu_img("convert", "-f", "qcow2", "-O", "raw", img, raw)
    other = str(tmp_path / "o.raw")
    with open(raw, "rb") as f:
        data = bytearray(f.read())
    data[3 * MiB + 100] ^= 0xFF
    with open(other, "wb") as f:
        f.write(data)
    with contextlib.ExitStack() as st:
        if request.param == "blkjobs":
            u = st.enter_context(blkjobs_export(tmp_path, img, "exp"))
        else:
            u = st.enter_context(qemu_nbd(img, str(tmp_path / "q.sock"), "exp", "qcow2", "-r"))
        yield u, img, raw, other


def _same(*args: str) -> subprocess.CompletedProcess:
    ours = run_blkjobs(*args)
    theirs = qemu_img(*args, check=False)
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout), args
    assert ours.stderr == "", ours.stderr
    return ours


def test_compare_with_format_options(served):
    u, img, raw, other = served
    assert _same("compare", "-f", "raw", u, raw).stdout == "Images are identical.\n"
    _same("compare", "-F", "raw", raw, u)
    _same("compare", "-f", "raw", "-F", "raw", u, raw)
    _same("compare", "-f", "raw", "-F", "qcow2", u, img)
    _same("compare", "-s", "-f", "raw", u, raw)
    p = _same("compare", "-f", "raw", u, other)
    assert (p.returncode, p.stdout) == (1, f"Content mismatch at offset {3 * MiB}!\n")
    _same("compare", "-F", "raw", other, u)


def test_info_map_convert_with_format_options(served, tmp_path):
    u, _, raw, _ = served
    _same("info", "-f", "raw", u)
    _same("info", "-f", "raw", "--output", "json", u)
    _same("map", "-f", "raw", "--output", "json", u)
    ours, theirs = str(tmp_path / "ours.raw"), str(tmp_path / "theirs.raw")
    assert run_blkjobs("convert", "-f", "raw", "-O", "raw", u, ours).returncode == 0
    qemu_img("convert", "-f", "raw", "-O", "raw", u, theirs)
    with open(ours, "rb") as a, open(theirs, "rb") as b, open(raw, "rb") as c:
        assert a.read() == b.read() == c.read()
