"""PartlyDirty (a mirror's dirty set with sub-granule precision) against a
byte-level model: what a pass copies covers every byte written since the
last pass, never leaves the granules taken, and for partial writes is only
the written sub-blocks."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blkjobs.jobs.dirty import PartlyDirty
from blkjobs.native.bitmap import Bitmap

G = 64 << 10
SIZE = 16 * G - 1536          # a last granule that is partial (and odd vs sub)


def take_all(pd: PartlyDirty, limit: int = 4 * G) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    pos = 0
    while True:
        area = pd.bitmap.take_dirty_area(pos, limit)
        if area is None:
            return out
        pd.split(*area, out)
        pos = area[0] + area[1]
        if pos >= SIZE:
            pos = 0


op = st.tuples(st.sampled_from(["write", "whole", "pass"]),
               st.integers(0, SIZE - 1), st.integers(1, 3 * G))


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=60))
def test_passes_cover_exactly_what_was_written(ops):
    pd = PartlyDirty(Bitmap(SIZE, G), SIZE)
    written: set[int] = set()            # sub-block indexes written since the last pass
    whole: set[int] = set()              # granules marked whole since the last pass
    sub = pd.sub

    def check_pass():
        ranges = take_all(pd)
        covered = set()
        for s, n in ranges:
            assert 0 < n and s + n <= -(-SIZE // G) * G
            covered.update(range(s // sub, -(-(s + n) // sub)))
        need = set(written)
        for g in whole:
            need.update(range(g * G // sub, min((g + 1) * G, SIZE) // sub))
        assert need <= covered, sorted(need - covered)[:5]
        # nothing outside the granules that were dirty
        dirty_g = {i * sub // G for i in need} | whole
        assert {i * sub // G for i in covered} <= dirty_g
        # partly written granules copy only what was written
        for g in dirty_g - whole:
            got = {i for i in covered if i * sub // G == g}
            assert got == {i for i in written if i * sub // G == g}
        assert ranges == sorted(ranges)
        assert pd.partial == {} and pd.bitmap.count() == 0
        written.clear()
        whole.clear()

    for kind, off, ln in ops:
        ln = min(ln, SIZE - off)
        if kind == "pass":
            check_pass()
        elif kind == "write":
            pd.mark_written(off, ln)
            written.update(range(off // sub, -(-(off + ln) // sub)))
            if ln >= G or off // G != (off + ln - 1) // G:   # not inside one granule
                whole.update(range(off // G, (off + ln - 1) // G + 1))
        else:
            pd.mark_whole(off, ln)
            whole.update(range(off // G, (off + ln - 1) // G + 1))
        for g in list(pd.partial):     # entries only for set granules
            assert pd.bitmap.test(g * G)
    check_pass()


def test_partial_write_then_whole_marks_forget_the_mask():
    pd = PartlyDirty(Bitmap(SIZE, G), SIZE)
    pd.mark_written(G + 4096, 4096)
    assert pd.sub == 1024 and pd.partial == {1: 0b1111 << 4}   # sub-blocks 4..7
    pd.mark_written(G + 8192, 100)               # grows the same granule's mask: 8
    pd.mark_written(G + 20480, 1)                # and 20
    assert pd.partial == {1: 0b11111 << 4 | 1 << 20}
    assert take_all(pd) == [(G + 4096, 5 * 1024), (G + 20480, 1024)]
    pd.mark_written(G + 4096, 4096)
    pd.mark_whole(G, 1)                          # e.g. a failed copy given back
    assert pd.partial == {}
    assert take_all(pd) == [(G, G)]
    pd.mark_whole(0, 3 * G)                      # already whole: a partial write adds nothing
    pd.mark_written(G + 4096, 4096)
    assert pd.partial == {}
    assert take_all(pd) == [(0, 3 * G)]


def test_last_partial_granule_is_clipped_to_the_size():
    pd = PartlyDirty(Bitmap(SIZE, G), SIZE)
    pd.mark_written(SIZE - 100, 100)
    (s, n), = take_all(pd)
    assert s + n == SIZE and n <= pd.sub


@pytest.mark.parametrize("gran,sub", [(512, 512), (4096, 512), (G, 1024), (1 << 20, 16384)])
def test_sub_block_size(gran, sub):
    assert PartlyDirty(Bitmap(1 << 22, gran), 1 << 22).sub == sub


def test_many_scattered_granules_one_pass():
    rnd = random.Random(3)
    size = 4096 * G
    pd = PartlyDirty(Bitmap(size, G), size)
    offs = sorted({rnd.randrange(0, size // 4096) * 4096 for _ in range(2000)})
    for o in offs:
        pd.mark_written(o, 4096)
    out: list[tuple[int, int]] = []
    pos = 0
    while (area := pd.bitmap.take_dirty_area(pos, 64 << 20)) is not None:
        pd.split(*area, out)
        pos = area[0] + area[1]
        if pos >= size:
            break
    assert sum(n for _, n in out) == len(offs) * 4096   # 4 KiB each, not 64 KiB
    assert [b for s, n in out for b in range(s, s + n, 4096)] == offs
