"""What a convert into a new qcow2 image spends besides copying: with
``-t unsafe`` nothing is fsync'd (the new file's creation included, as
qemu-img's ``-t unsafe`` does after creating it), with ``-t writeback``
the target is; unencrypted images without internal snapshots import
neither the LUKS code (hashlib, uuid) nor the snapshot table's module, and
images without compressed clusters neither zlib nor threading (the read
pins' condition is made by the first drain that has pins to wait for). The
targets are qemu-img's bytes and ``qemu-img check`` clean."""
from __future__ import annotations

import os
import subprocess
import sys

from blkjobs.imageops.convert import ConvertOptions, convert
from qemu_oracle import check_clean, qemu_img


def _source(tmp_path):
    src = tmp_path / "a.raw"
    with open(src, "wb") as f:
        f.truncate(4 << 20)
        f.write(b"\1" * 65536 + bytes(65536) + b"\2" * 4096)
        f.seek(3 << 20)
        f.write(os.urandom(200_000))
    return src


def _syncs(monkeypatch):
    calls: list[str] = []
    for name in ("fsync", "fdatasync", "sync"):
        real = getattr(os, name)

        def spy(*a, _real=real, _name=name):
            calls.append(_name)
            return _real(*a)
        monkeypatch.setattr(os, name, spy)
    return calls


def test_unsafe_convert_to_new_qcow2_fsyncs_nothing(tmp_path, monkeypatch):
    src = _source(tmp_path)
    calls = _syncs(monkeypatch)
    for flush, name in ((False, "u.qcow2"), (True, "w.qcow2")):
        calls.clear()
        dst = tmp_path / name
        convert(str(src), str(dst), ConvertOptions(dst_fmt="qcow2", flush=flush))
        if flush:
            assert "fsync" in calls     # -t writeback: the target is made durable
        else:
            assert calls == []
        check_clean(dst)
        assert qemu_img("compare", "-f", "raw", "-F", "qcow2", src, dst).returncode == 0


PROBE = """
import sys
sys.argv = ["blkjobs"] + sys.argv[1:]
from blkjobs.cli.main import main
rc = main()
heavy = ("blkjobs.formats.luks", "blkjobs.formats.qcow2.crypt", "hashlib", "uuid",
         "blkjobs.formats.qcow2.snapshots", "threading", "zlib")
print(sorted(m for m in heavy if m in sys.modules), file=sys.stderr)
raise SystemExit(rc)
"""


def test_plain_qcow2_convert_imports_no_luks_nor_snapshots(tmp_path):
    """raw -> qcow2 and a qcow2 chain (no internal snapshots) -> qcow2: the
    LUKS code is imported only for encrypted images, the snapshot table's
    module only for images that have snapshots, zlib only for compressed
    clusters, threading not at all (~1 ms of start-up)."""
    src = _source(tmp_path)
    top = tmp_path / "top.qcow2"
    qemu_img("convert", "-O", "qcow2", src, tmp_path / "base.qcow2")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    for i, s in enumerate((src, top)):
        dst = tmp_path / f"b{i}.qcow2"
        p = subprocess.run([sys.executable, "-c", PROBE, "convert", "-t", "unsafe", "-O",
                            "qcow2", str(s), str(dst)], capture_output=True, text=True,
                           timeout=60)
        assert (p.returncode, p.stderr.strip()) == (0, "[]"), s
        check_clean(dst)
        assert qemu_img("compare", "-f", "raw", "-F", "qcow2", src, dst).returncode == 0
