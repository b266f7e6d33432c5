"""qemu-img / qemu-io as the oracle for the qcow2 and graph tests."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest


def _tool(name):
    path = shutil.which(name)
    if not path:
        pytest.fail(f"{name} is not installed (Debian qemu-utils): the oracle is required")
    return path


def qemu_img(*args, check=True):
    p = subprocess.run([_tool("qemu-img"), *map(str, args)], capture_output=True, text=True,
                       timeout=120)
    if check and p.returncode != 0:
        raise AssertionError(f"qemu-img {' '.join(map(str, args))}: {p.stderr}")
    return p


def qemu_io(path, *cmds, fmt="qcow2"):
    args = [_tool("qemu-io"), "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    p = subprocess.run(args + [str(path)], capture_output=True, text=True, timeout=120)
    if p.returncode != 0 or "error" in p.stdout.lower() or "failed" in p.stdout.lower():
        raise AssertionError(f"qemu-io {cmds}: {p.stdout} {p.stderr}")
    return p


def check_clean(path):
    """qemu-img check: no corruptions, no leaks; returns the JSON result."""
    p = qemu_img("check", "--output", "json", path, check=False)
    assert p.returncode == 0, f"qemu-img check {path}: rc={p.returncode}\n{p.stdout}\n{p.stderr}"
    res = json.loads(p.stdout)
    assert not res.get("corruptions") and not res.get("leaks"), res
    return res


def to_raw(path, tmp_path, fmt="qcow2") -> bytes:
    out = tmp_path / "oracle.raw"
    qemu_img("convert", "-f", fmt, "-O", "raw", path, out)
    return out.read_bytes()


def qemu_map(path):
    return json.loads(qemu_img("map", "--output", "json", path).stdout)


def qemu_info(path):
    return json.loads(qemu_img("info", "--output", "json", path).stdout)


def qemu_dirty(path, name) -> list[tuple[int, int]]:
    """The dirty extents of persistent bitmap ``name`` of a qcow2 image as
    QEMU reads them (qemu-nbd -B, nbdinfo --map=qemu:dirty-bitmap:NAME).
    Shared (force-share=on, qemu-img's -U): the engine may hold the image
    read-write, which refuses readers wanting a stable view, as QEMU does."""
    opts = f"driver=qcow2,force-share=on,read-only=on,file.driver=file,file.filename={path}"
    p = subprocess.run([_tool("nbdinfo"), f"--map=qemu:dirty-bitmap:{name}", "--json", "--",
                        "[", _tool("qemu-nbd"), "-r", "--image-opts", "-B", name, opts,
                        "]"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return [(e["offset"], e["length"]) for e in json.loads(p.stdout) if e["type"] & 1]
