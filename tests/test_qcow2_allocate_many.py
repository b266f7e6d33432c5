"""Qcow2.allocate_many: scattered cluster-aligned ranges allocated in one
call (an incremental backup's changed clusters). Every kind of old entry is
handled as allocate() handles it (reused in place, or a new cluster), the new
clusters are taken as one contiguous run, and the result is what qemu-img
reads once the runs are written and the metadata flushed -- or, undone, what
it read before. qemu-img (convert, map, check) is the oracle."""
from __future__ import annotations

import os

import pytest

from blkjobs.errors import UsageError
from blkjobs.formats import open_image
from qemu_oracle import check_clean, qemu_map, to_raw
from test_qcow2_undo_allocate import CS, SIZE, make

#: cluster 0 unallocated (reads the base), 1 a zero cluster, 2 zero with its
#: host kept, 3-4 partly written (extended: subclusters), 5 plain data, 9,
#: 10-11, 40 and the last one unallocated
RANGES = [(0, CS), (CS, CS), (2 * CS, 3 * CS), (5 * CS, CS), (9 * CS, CS),
          (10 * CS, 2 * CS), (40 * CS, CS), (SIZE - CS, CS)]


def _hosts_before(top) -> dict[int, int]:
    """The host cluster of every guest cluster of top that has one (for
    some of its subclusters at least)."""
    return {g: r["offset"] + g - r["start"] for r in qemu_map(top)
            if r["depth"] == 0 and "offset" in r
            for g in range(r["start"] - r["start"] % CS, r["start"] + r["length"], CS)}


@pytest.mark.parametrize("extended", [False, True])
def test_allocate_many_writes_land_where_qemu_reads_them(tmp_path, extended):
    top = make(tmp_path, extended)
    before = to_raw(top, tmp_path)
    old = _hosts_before(top)
    assert 5 * CS in old
    with open_image(str(top), read_only=False) as img:
        end0 = img.alloc_end
        undo: list = []
        runs = img.allocate_many(RANGES, undo)
        # the runs cover the ranges exactly, in guest order
        covered = [(r.start, r.length) for r in runs]
        assert sum(n for _, n in covered) == sum(n for _, n in RANGES)
        assert [s for s, _ in covered] == sorted(s for s, _ in covered)
        hosts = {g: r.host_offset + g - r.start for r in runs
                 for g in range(r.start, r.start + r.length, CS)}
        # clusters with a host of their own are reused in place (data, a
        # zero cluster that kept its host); every other one got a new
        # cluster, all of them in one run at the end of the file
        assert {g: hosts[g] for g in hosts if g in old} == \
            {g: h for g, h in old.items() if g in hosts}
        fresh = [hosts[g] for g in sorted(hosts) if g not in old]
        assert len(fresh) >= 6
        assert fresh == list(range(end0, end0 + len(fresh) * CS, CS))
        for g, h in hosts.items():
            os.pwrite(img.fd, bytes([0x80 + g // CS % 100]) * CS, h)
        img.release_allocated(undo)     # the data landed: the entries may go to disk
        img.flush()
    check_clean(top)
    want = bytearray(before)
    for s, n in RANGES:
        for g in range(s, s + n, CS):
            want[g:g + CS] = bytes([0x80 + g // CS % 100]) * CS
    assert to_raw(top, tmp_path) == bytes(want)


@pytest.mark.parametrize("extended", [False, True])
def test_allocate_many_undone_reads_as_before(tmp_path, extended):
    top = make(tmp_path, extended)
    before = to_raw(top, tmp_path)
    with open_image(str(top), read_only=False) as img:
        undo: list = []
        runs = img.allocate_many(RANGES, undo)
        # a copy that stopped half-way: garbage in the clusters whose content
        # the allocation made undefined (data reused in place is overwritten
        # with what it holds: not recorded; nor, in cluster 3, the bytes it
        # held itself: the rest of a cluster is filled with the guest view)
        changed = {g for s, n, _, _ in undo for g in range(s, s + n, CS)}
        assert changed >= {0, CS, 9 * CS, 10 * CS, 11 * CS, 40 * CS, SIZE - CS}
        assert 5 * CS not in changed
        for r in runs:
            for g in range(r.start, r.start + r.length, CS):
                if g in changed:
                    os.pwrite(img.fd, b"\xee" * (CS // 2), r.host_offset + g - r.start)
                if g == 3 * CS:
                    os.pwrite(img.fd, b"\x63" * 4096, r.host_offset + g - r.start + 4096)
        img.undo_allocate(undo)
        img.flush()
    check_clean(top)
    assert to_raw(top, tmp_path) == before


@pytest.mark.parametrize("ranges, msg", [
    ([(2 * CS, CS), (CS, CS)], f"allocate: range {CS}+{CS} is not after the previous one"),
    ([(CS, 2 * CS), (2 * CS, CS)], f"allocate: range {2 * CS}+{CS} is not after the previous one"),
    ([(CS, CS), (3 * CS + 512, CS)], f"allocate: range {3 * CS + 512}+{CS} is not cluster aligned"),
])
def test_allocate_many_refuses_bad_ranges_before_changing_anything(tmp_path, ranges, msg):
    top = make(tmp_path, False)
    before = to_raw(top, tmp_path)
    with open_image(str(top), read_only=False) as img:
        end0 = img.alloc_end
        with pytest.raises(UsageError) as e:
            img.allocate_many(ranges, [])
        assert str(e.value) == msg
        assert img.alloc_end == end0
    check_clean(top)
    assert to_raw(top, tmp_path) == before
