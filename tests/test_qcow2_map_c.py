"""The qcow2 mapping in C (csrc/qcow2.c ``bj_qcow2_map``, used by
``map_host``/``map_for_read`` for standard L2 tables) gives exactly the
runs, and the errors, of the per-entry Python path it replaced: random L2
tables (well-formed entries and every kind the C loop leaves to Python:
compressed, reserved bits, unaligned, past the end of the file, the zero
flag of a v2 image) mapped over random ranges; and qemu-written images with
unusual entries between plain ones read and map as qemu-img says."""
from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blkjobs.errors import ImageError
from blkjobs.formats import open_image
from blkjobs.formats.qcow2.mapping import _Runs
from qemu_oracle import qemu_img, qemu_io, qemu_map, to_raw

CS = 65536
N = 64                       # entries of the table the examples use
COPIED, ZERO, COMPRESSED = 1 << 63, 1, 1 << 62


def _entry(kind: int, k: int) -> int:
    host = (1 + k % 4) * CS          # inside the file (which holds >= 5 clusters)
    return [
        0,                                  # unallocated
        ZERO,                               # zero
        host | COPIED,                      # data
        host | COPIED | ZERO,               # zero, preallocated
        host,                               # data, shared (no COPIED)
        COMPRESSED | (host + 512),          # compressed (1 sector)
        host | COPIED | 0x100,              # reserved bit
        (host + 512) | COPIED,              # unaligned
        (1 << 40) | COPIED,                 # past the end of the file
    ][kind]


def _reference(img, pos: int, end: int) -> list[list]:
    """The per-entry Python path (``_map_entry`` for every cluster)."""
    runs, cb = _Runs(), img.cb
    t = img._l2(img._l2_offset(0))
    for gc in range(pos >> cb, ((end - 1) >> cb) + 1):
        e = struct.unpack_from(">Q", t, gc * 8)[0]
        img._map_entry(runs, gc, e, 0, max(pos, gc << cb), min(end, (gc + 1) << cb))
    return runs.out


def _outcome(f):
    try:
        return f()
    except ImageError as e:
        return str(e)


@pytest.fixture(scope="module", params=["1.1", "0.10"])
def image(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("map") / "m.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"compat={request.param}", path, N * CS)
    qemu_io(path, f"write -P 7 0 {4 * CS}")
    img = open_image(str(path))
    yield img
    img.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(st.tuples(st.integers(0, 8), st.integers(0, 3)), min_size=N, max_size=N),
       contiguous=st.booleans(), a=st.integers(0, N * CS - 1), n=st.integers(1, N * CS))
def test_same_runs_and_errors_as_the_python_path(image, kinds, contiguous, a, n):
    img = image
    t = img._l2(img._l2_offset(0))
    saved = bytes(t)
    try:
        for i, (kind, k) in enumerate(kinds):
            struct.pack_into(">Q", t, i * 8, _entry(kind, i if contiguous else k))
        end = min(N * CS, a + n)
        want = _outcome(lambda: _reference(img, a, end))
        got = _outcome(lambda: [list(r) for r in img._map_runs(a, end - a).out])
        assert got == want
        if isinstance(want, list):      # kinds are Kind members, hosts None where none
            assert [type(r[2]).__name__ for r in got] == ["Kind"] * len(got)
    finally:
        t[:] = saved


def test_unusual_entries_between_plain_ones_match_qemu(tmp_path):
    """Compressed clusters, zero and preallocated zero clusters and holes
    in one table: what we read and map is what qemu-img reads and maps,
    over the whole image and over ranges starting inside clusters."""
    src = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", src, 32 * CS)
    qemu_io(src, f"write -c -P 2 {2 * CS} {CS}", f"write -c -P 3 {5 * CS} {CS}",
            f"write -c -P 5 {11 * CS} {CS}", f"write -P 1 0 {2 * CS}",
            f"write -P 1 {3 * CS} {2 * CS}", f"write -P 1 {6 * CS} {2 * CS}",
            f"write -z {6 * CS} {CS}", f"write -z -u {7 * CS} {CS}",
            f"write -P 4 {10 * CS} {CS}", f"write -P 4 {12 * CS} {CS}",
            f"write -z {20 * CS} {2 * CS}")
    expect = to_raw(src, tmp_path)
    with open_image(str(src)) as img:
        assert img.read(0, img.size) == expect
        for a in (1, CS + 100, 5 * CS - 1, 11 * CS + 4096):
            n = 3 * CS + 17
            assert img.read(a, n) == expect[a:a + n]
        got = [(m.start, m.length, int(m.kind)) for m in img.map_host(0, img.size)]
    assert (2 * CS, CS, 3) in got and (11 * CS, CS, 3) in got
    want = qemu_map(src)
    from blkjobs.graph import open_chain
    node = open_chain(str(src))
    try:
        status = node.block_status()
    finally:
        node.close_chain()
    for e in status:
        e.pop("compressed")
    assert status == want


def test_corrupt_entry_mid_table_keeps_its_error(tmp_path):
    """A reserved bit in an entry between plain ones: the ranges before and
    after it map, one that touches it fails with the entry's text."""
    src = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", src, 16 * CS)
    qemu_io(src, f"write -P 1 0 {6 * CS}")
    with open_image(str(src)) as img:
        l2 = img._l2_offset(0)
    with open(src, "r+b") as f:
        f.seek(l2 + 3 * 8)
        e = struct.unpack(">Q", f.read(8))[0]
        f.seek(l2 + 3 * 8)
        f.write(struct.pack(">Q", e | 0x100))
    with open_image(str(src)) as img:
        assert [m.kind for m in img.map_host(0, 3 * CS)] == [0]
        assert [m.kind for m in img.map_host(4 * CS, 2 * CS)] == [0]
        with pytest.raises(ImageError) as ei:
            img.map_host(CS, 4 * CS)
        assert str(ei.value) == (f"'{src}': L2 entry for guest offset 0x30000 is corrupt "
                                 f"(0x{e | 0x100:016x}): reserved bits set")


@pytest.fixture(scope="module", params=["1.1", "1.1+backing", "0.10"])
def writable(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("discard")
    path = d / "w.qcow2"
    opts = ["-o", f"compat={request.param.split('+')[0]}"]
    if request.param.endswith("backing"):
        qemu_img("create", "-f", "qcow2", d / "b.qcow2", N * CS)
        opts += ["-b", "b.qcow2", "-F", "qcow2"]
    qemu_img("create", "-f", "qcow2", *opts, path, N * CS)
    qemu_io(path, f"write -P 7 0 {4 * CS}")
    img = open_image(str(path), read_only=False)
    yield img
    img.l2dirty.clear()
    img._rc().pending.clear()
    img.close()


def _discard_outcome(img, f, t0: bytes):
    """(entries after, host clusters queued for freeing) or the error text."""
    rc = img._rc()
    t = img._l2(img._l2_offset(0))
    t[:] = t0
    rc.pending.clear()
    try:
        f()
        out = (bytes(img._l2(img._l2_offset(0))), list(rc.pending))
    except ImageError as e:
        out = str(e)
    rc.pending.clear()
    img.l2dirty.clear()
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(st.tuples(st.integers(0, 8), st.integers(0, 3)), min_size=N, max_size=N),
       contiguous=st.booleans(), a=st.integers(0, N * CS - 1), n=st.integers(1, N * CS))
def test_discard_same_as_one_entry_at_a_time(writable, kinds, contiguous, a, n):
    """discard's table-at-a-time path (the C decoder's runs, one slice
    written) leaves the entries and queues the frees of the per-entry path,
    or fails with its error text."""
    img = writable
    t = img._l2(img._l2_offset(0))
    saved = bytes(t)
    for i, (kind, k) in enumerate(kinds):
        struct.pack_into(">Q", t, i * 8, _entry(kind, i if contiguous else k))
    t0 = bytes(t)
    n = min(n, N * CS - a)
    backing = bool(img.backing_filename)
    use_zero = img.header.version >= 3 and backing

    def one_at_a_time():
        b0, b1 = img._full_clusters(a, n)
        for gc in range(b0 // CS, -(-b1 // CS)):
            img._discard_one(gc, backing, False, use_zero)

    try:
        want = _discard_outcome(img, one_at_a_time, t0)
        got = _discard_outcome(img, lambda: img.discard(a, n), t0)
        assert got == want
    finally:
        img._l2(img._l2_offset(0))[:] = saved
