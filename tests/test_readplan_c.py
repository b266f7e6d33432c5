"""The NBD export's qcow2 reads mapped in C (csrc/qcow2.c
``bj_qcow2_read_segs`` behind ``Qcow2.read_segments`` and
``graph.readplan.plan_batch``): the segments are those the Python path
(``map_for_read`` -> ``plan_segments``) gives, merged as the C session
merges them; every read whose range holds anything the C mapper does not
take -- compressed, reserved bits, unaligned, past the end of the file,
the zero flag of a v2 image, an unallocated cluster over a backing node, a
read across two L2 tables -- is left to that Python path whole, which
reads, classifies and diagnoses it as before; nothing stays pinned or
tracked after the reads end."""
from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blkjobs import Engine
from blkjobs.formats.base import Kind
from blkjobs.graph import readplan
from blkjobs.native.qcow2 import Segments
from qemu_oracle import qemu_img, qemu_io

from test_qcow2_map_c import CS, N, _entry, image  # noqa: F401  (the same tables and image fixture)

DATA_PAD, SZERO = readplan.SEG_DATA_PAD, readplan.SEG_ZERO


def _merged(segs) -> list[tuple[int, int, int, int]]:
    """Segments as the C session sends them (csrc/nbdsrv.c ``push``):
    neighbouring zeroes one, data contiguous in one file one."""
    out: list[list[int]] = []
    for kind, fd, host, n in segs:
        if n == 0:
            continue
        if out and out[-1][0] == kind and (kind == SZERO or (
                out[-1][1] == fd and out[-1][2] + out[-1][3] == host)):
            out[-1][3] += n
        else:
            out.append([kind, fd if kind != SZERO else 0, host if kind != SZERO else 0, n])
    return [tuple(s) for s in out]      # type: ignore[misc]


def _python_segments(img, a: int, n: int, unalloc_zero: bool):
    """The Python path's segments of one read of a lone image."""
    segs = []
    for _start, k, kind, host in img.map_for_read(a, n):
        if kind == Kind.DATA:
            segs.append((DATA_PAD, img.data_fd, host, k))
        else:
            assert kind == Kind.ZERO or (kind == Kind.UNALLOCATED and unalloc_zero)
            segs.append((SZERO, 0, 0, k))
    return _merged(segs)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(st.tuples(st.integers(0, 8), st.integers(0, 3)), min_size=N, max_size=N),
       contiguous=st.booleans(), unalloc_zero=st.booleans(),
       reads=st.lists(st.tuples(st.integers(0, N * CS - 1), st.integers(1, N * CS)),
                      min_size=1, max_size=6))
def test_c_segments_are_the_python_paths(image, kinds, contiguous, unalloc_zero, reads):
    img = image
    t = img._l2(img._l2_offset(0))
    saved = bytes(t)
    v2 = img.header.version < 3
    try:
        for i, (kind, k) in enumerate(kinds):
            struct.pack_into(">Q", t, i * 8, _entry(kind, i if contiguous else k))
        reqs = [(a, min(n, N * CS - a)) for a, n in reads]
        got = img.read_segments(reqs, unalloc_zero)
        assert got is not None and len(got) == len(reqs)
        for (a, n), g in zip(reqs, got, strict=True):
            touched = {kinds[gc][0] for gc in range(a // CS, (a + n - 1) // CS + 1)}
            unusual = (touched & {5, 6, 7, 8} or (v2 and touched & {1, 3})
                       or (not unalloc_zero and 0 in touched))
            if unusual:
                assert g is None, (a, n, touched)
                continue
            assert isinstance(g, Segments)
            assert sum(s[3] for s in g) == n
            assert list(g) == _python_segments(img, a, n, unalloc_zero)
    finally:
        t[:] = saved


def _engine_node(path: str, fmt: str = "qcow2"):
    eng = Engine()
    node = eng.open(path, fmt, node_name="d", read_only=True)
    with eng.io:
        fe = eng.io.attach(node, writable=False)
    return eng, node, fe


def _python_batch(img, reqs):
    """The same reads through the Python path alone (plan_segments)."""
    out = [None] * len(reqs)
    readplan._plan_groups(img, reqs, [], out)
    return out


def test_plan_batch_maps_plain_reads_in_c_and_leaves_the_rest(tmp_path):
    """A qcow2 overlay (data, zero clusters, a compressed cluster) over a
    shorter raw base: reads of allocated clusters only are mapped in C,
    those touching an unallocated cluster (the base's) or the compressed
    one take the Python path; the segments of each are the Python path's;
    once ended, nothing is pinned or tracked."""
    base, top = str(tmp_path / "b.raw"), str(tmp_path / "t.qcow2")
    qemu_img("create", "-f", "raw", base, "3M")
    qemu_io(base, "write -P 0x11 0 3M", fmt="raw")
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "raw", top, "4M")
    qemu_io(top, "write -P 0x22 0 1M", "write -z 1M 256k", "write -c -P 0x33 2M 64k",
            "write -P 0x44 3M 512k")
    eng, node, fe = _engine_node(top)
    try:
        reqs = [(0, 256 << 10), (100, 1 << 20), (1 << 20, 256 << 10), (2 << 20, 64 << 10),
                (1200 << 10, 200 << 10), (3 << 20, 512 << 10), (3 << 20, 1 << 20),
                (4096, 4096)]
        planned = eng.io.guest_read_segments(fe, reqs)
        img = node
        while img.is_filter:
            img = img._child()
        pins, reading = img.driver.read_pins, img.io_state.reading
        try:
            how = [None if p is None else "C" if isinstance(p[0], Segments) else "Python"
                   for p in planned]
            # (the compressed cluster: read by a Python worker, not planned)
            assert how == ["C", "C", "C", None, "Python", "C", "Python", "C"]
            with eng.io:
                want = _python_batch(img, reqs)
            for w in want:
                if w is not None:
                    w[1][0].done()
            for p, w in zip(planned, want, strict=True):
                assert (p is None) == (w is None)
                if p is not None:
                    assert _merged(p[0]) == _merged(w[0])
            assert pins._live and reading.count == len(reqs) - 1
        finally:
            eng.io.guest_read_end([p[1] for p in planned if p is not None])
        assert not pins._live and reading.count == 0
    finally:
        eng.close()


def test_reads_of_an_unallocated_table_and_across_tables(tmp_path):
    """A lone image of 1 GiB, 64 KiB clusters (two L2 tables): a read in
    the second table, which is not allocated, is zeroes from C; one
    across the tables' boundary is the Python path's, with the same
    segments."""
    top = str(tmp_path / "t.qcow2")
    qemu_img("create", "-f", "qcow2", top, "1G")
    qemu_io(top, f"write -P 0x22 {(512 << 20) - CS} {CS}")
    eng, node, fe = _engine_node(top)
    try:
        reqs = [((512 << 20) + CS, 1 << 20), ((512 << 20) - CS, 2 * CS), (0, 1 << 20)]
        planned = eng.io.guest_read_segments(fe, reqs)
        try:
            assert [isinstance(p[0], Segments) for p in planned] == [True, False, True]
            assert list(planned[0][0]) == [(SZERO, 0, 0, 1 << 20)]
            assert list(planned[2][0]) == [(SZERO, 0, 0, 1 << 20)]
            segs = _merged(planned[1][0])
            assert [(k, n) for k, _, _, n in segs] == [(DATA_PAD, CS), (SZERO, CS)]
        finally:
            eng.io.guest_read_end([p[1] for p in planned])
    finally:
        eng.close()
