"""A convert through the chain path (qcow2 or raw targets, any source)
starts the copy engine's workers on its first, small work range while it
plans the next ones: the copy of the first range is under way before the
second range is queued (before, every worker waited for the whole first
feed, 20-25 ms of planning of a 1 GiB VM-shaped image). The bytes stay the
source's."""
from __future__ import annotations

import os
import threading
import time

import pytest

from blkjobs.imageops import convert_chain
from blkjobs.imageops.convert import ConvertOptions, convert
from blkjobs.native.copy import CopyEngine
from qemu_oracle import check_clean, qemu_img

MiB = 1 << 20


def _source(path):
    size = 2 * convert_chain.FIRST_WORK + 4 * MiB
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(os.urandom(4 * MiB))
        f.seek(convert_chain.FIRST_WORK + 2 * MiB)
        f.write(os.urandom(4 * MiB))
        f.seek(size - MiB)
        f.write(os.urandom(MiB))


@pytest.mark.parametrize("src_fmt, fmt", [("raw", "qcow2"), ("qcow2", "raw"), ("qcow2", "qcow2")])
def test_first_range_copied_while_the_next_is_planned(tmp_path, monkeypatch, src_fmt, fmt):
    src, dst = str(tmp_path / f"src.{src_fmt}"), str(tmp_path / f"dst.{fmt}")
    _source(str(tmp_path / "src.raw"))
    if src_fmt == "qcow2":
        qemu_img("convert", "-f", "raw", "-O", "qcow2", str(tmp_path / "src.raw"), src)
    adds: list[int] = []      # bytes done when each later range was queued
    real_add = CopyEngine.add

    def add(self, ranges):
        if adds or getattr(self, "_seen", False):
            # wait (bounded) for the engine to finish copying something:
            # it only can if its workers were started before this add
            deadline = time.monotonic() + 30
            ev = threading.Event()
            while self.status().done == 0 and time.monotonic() < deadline:
                ev.wait(0.005)
            adds.append(self.status().done)
        self._seen = True
        real_add(self, ranges)

    monkeypatch.setattr(CopyEngine, "add", add)
    convert(src, dst, ConvertOptions(src_fmt=src_fmt, dst_fmt=fmt, flush=False))
    assert adds and adds[0] > 0
    assert qemu_img("compare", "-f", src_fmt, "-F", fmt, src, dst).returncode == 0
    if fmt == "qcow2":
        check_clean(dst)
