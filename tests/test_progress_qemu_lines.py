"""``-p`` when invoked as ``qemu-img``: qemu-img's lines byte for byte
(qemu-iotests 086), so that a script parsing qemu-img's progress parses
ours; invoked as ``blkjobs`` the richer line stays (tests/test_convert.py)."""
from __future__ import annotations

import os
import re
import subprocess

import pytest

from qemu_oracle import qemu_img, qemu_io
from test_parity_invocation import twins  # noqa: F401  (a fixture)

QEMU_LINE = re.compile(r"    \((\d+\.\d\d)/100%\)\r")


def run(d, *args) -> tuple[int, str, str]:
    """``qemu-img ARGS`` in ``d`` (ours or theirs), the output as bytes
    decoded without newline translation (the lines end with \\r)."""
    p = subprocess.run([str(d / "bin" / "qemu-img"), *args], cwd=d, capture_output=True,
                       timeout=300, env=dict(os.environ, PATH=f"{d / 'bin'}:{os.environ['PATH']}"))
    return p.returncode, p.stdout.decode(), p.stderr.decode()


def same(twins, *args):
    ours, theirs = (run(d, *args) for d in twins)
    assert ours == theirs, args
    return ours


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_convert_p_prints_qemu_img_lines(twins, fmt):
    for d in twins:
        img = d / f"t.{fmt}"
        qemu_img("create", "-q", "-f", fmt, img, "128M")
        for off in ("0", "2M", "4M", "32M"):
            qemu_io(img, f"write {off} 1M", fmt=fmt)
    rc, out, err = same(twins, "convert", "-p", "-O", fmt, "-f", fmt, f"t.{fmt}", "o")
    assert (rc, err) == (0, "")
    assert out == "".join(f"    ({p}/100%)\r" for p in
                          ("0.00", "25.00", "50.00", "75.00", "100.00", "100.00")) + "\n"


def test_convert_p_in_chunks_of_2_mib_and_several_sources(twins):
    for d in twins:
        for name, data in (("a.qcow2", "write -P 1 0 7M"), ("b.qcow2", "write -P 2 1M 3M")):
            qemu_img("create", "-q", "-f", "qcow2", d / name, "16M")
            qemu_io(d / name, data)
    for args in (["a.qcow2"], ["a.qcow2", "b.qcow2"], ["-S", "0", "b.qcow2"]):
        rc, out, err = same(twins, "convert", "-p", "-O", "qcow2", *args, "o.qcow2")
        assert rc == 0 and err == "" and QEMU_LINE.match(out) and out.endswith("\r\n")


def test_compare_p_as_qemu_img_keeps_the_richer_line(twins):
    """Only convert prints qemu-img's exact lines; compare's line holds
    qemu-img's ``(P/100%)`` too."""
    qemu_img("create", "-q", "-f", "qcow2", twins[0] / "a.qcow2", "16M")
    rc, out, err = run(twins[0], "compare", "-p", "a.qcow2", "a.qcow2")
    assert (rc, err) == (0, "")
    assert re.search(r"^\(100\.00/100%\) 16 MiB of 16 MiB, ", out, re.M), out
    assert out.endswith("\nImages are identical.\n")
