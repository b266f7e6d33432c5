"""Images blkjobs writes, checked by qemu-img against a byte model.

Every cluster size the issue names (512 B, 4 KiB, 64 KiB, 2 MiB), extended
L2, with and without a backing file: after a hypothesis-chosen sequence of
writes, zero writes and discards, ``qemu-img check`` is clean (no leaks, no
corruptions) and the image reads back (qemu-img convert -O raw) as the model.
"""
from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from blkjobs.formats import create_image, open_image
from blkjobs.graph import Perm, open_chain
from qemu_oracle import check_clean, qemu_io, to_raw

CONFIGS = [  # (cluster_size, extended_l2 or "v2", image size)
    (512, False, 256 << 10),
    (4096, "v2", 1 << 20),
    (4096, False, 1 << 20),
    (65536, False, 2 << 20),
    (2 << 20, False, 6 << 20),
    (16384, True, 1 << 20),
    (65536, True, 2 << 20),
]


def op_strategy(size):
    off = st.integers(0, size - 1)
    return st.lists(st.tuples(st.sampled_from(["write", "zero", "zero_keep", "discard"]),
                              off, st.integers(1, size // 3), st.integers(0, 255)),
                    min_size=1, max_size=12)


def _opts(cs, ext):
    if ext == "v2":
        return {"cluster_size": cs, "compat": "0.10"}
    return {"cluster_size": cs, "extended_l2": ext}


def _apply(node_or_img, model, ops, cs, below, size):
    """below: what a discarded cluster reads as (None = zeroes)."""
    for op, off, n, seed in ops:
        n = min(n, size - off)
        if op == "write":
            data = random.Random(seed).randbytes(n)
            node_or_img.write(off, data)
            model[off:off + n] = data
        elif op in ("zero", "zero_keep"):
            node_or_img.write_zeroes(off, n, may_unmap=(op == "zero"))
            model[off:off + n] = bytes(n)
        else:
            node_or_img.discard(off, n)
            a = -(-off // cs) * cs
            b = off + n if off + n == size else (off + n) // cs * cs
            if a < b:      # whole clusters: zeroes (v3), or the backing file (v2)
                model[a:b] = bytes(b - a) if below is None else below[a:b]


@pytest.mark.parametrize("cs,ext,size", CONFIGS, ids=lambda v: str(v))
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_model_no_backing(tmp_path_factory, cs, ext, size, data):
    tmp = tmp_path_factory.mktemp("m")
    ops = data.draw(op_strategy(size))
    path = tmp / "img.qcow2"
    create_image(str(path), "qcow2", size, **_opts(cs, ext))
    model = bytearray(size)
    with open_image(str(path), read_only=False) as img:
        _apply(img, model, ops, cs, None, size)
        assert img.read(0, size) == model
    check_clean(path)
    assert to_raw(path, tmp) == model


@pytest.mark.parametrize("cs,ext,size", CONFIGS, ids=lambda v: str(v))
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_model_with_backing(tmp_path_factory, cs, ext, size, data):
    tmp = tmp_path_factory.mktemp("b")
    ops = data.draw(op_strategy(size))
    base = tmp / "base.qcow2"
    create_image(str(base), "qcow2", size, cluster_size=65536)
    pattern = random.Random(7).randbytes(size)
    with open_image(str(base), read_only=False) as b:
        b.write(0, pattern)
        b.discard(size // 2, size // 4)       # a hole in the base too
    model = bytearray(pattern)
    a0 = -(-(size // 2) // 65536) * 65536
    b0 = (size // 2 + size // 4) // 65536 * 65536
    model[a0:b0] = bytes(b0 - a0)
    top = tmp / "top.qcow2"
    create_image(str(top), "qcow2", size, **_opts(cs, ext),
                 backing_file="base.qcow2", backing_format="qcow2")
    below = bytes(model) if ext == "v2" else None
    node = open_chain(str(top), read_only=False)
    try:
        with node.take("test", Perm.WRITE | Perm.CONSISTENT_READ, Perm.CONSISTENT_READ):
            _apply(node, model, ops, cs, below, size)
            assert node.read(0, size) == model
    finally:
        node.close_chain()
    check_clean(top)
    check_clean(base)
    assert to_raw(top, tmp) == model


def test_table_growth_and_many_clusters(tmp_path):
    """512 B clusters: several refcount blocks and a refcount table that
    must be moved to a larger copy."""
    size = 12 << 20
    path = tmp_path / "g.qcow2"
    create_image(str(path), "qcow2", size, cluster_size=512)
    data = random.Random(3).randbytes(size)
    with open_image(str(path), read_only=False) as img:
        for off in range(0, size, 1 << 20):
            img.write(off, data[off:off + (1 << 20)])
    check_clean(path)
    assert to_raw(path, tmp_path) == data


def test_qemu_io_then_blkjobs_then_qemu(tmp_path):
    """Mixed writers: qemu-io writes, we overwrite parts, qemu reads back."""
    path = tmp_path / "x.qcow2"
    create_image(str(path), "qcow2", 1 << 20, cluster_size=4096)
    qemu_io(path, "write -P 0xaa 0 64k", "write -z 64k 64k", "write -c -P 0x11 256k 4k")
    model = bytearray(1 << 20)
    model[0:65536] = b"\xaa" * 65536
    model[262144:266240] = b"\x11" * 4096
    with open_image(str(path), read_only=False) as img:
        img.write(1000, b"\x55" * 3000)
        img.write(262144 + 100, b"\x66" * 10)        # into the compressed cluster
        img.write_zeroes(70000, 1000)
        model[1000:4000] = b"\x55" * 3000
        model[262244:262254] = b"\x66" * 10
        model[70000:71000] = bytes(1000)
    check_clean(path)
    assert to_raw(path, tmp_path) == model
