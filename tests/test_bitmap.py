"""Tests of blkjobs.native.bitmap: a hypothesis state machine against a pure
Python model, the exact qcow2 bit order, errors, and writer threads racing
a job that resets what it finds."""
from __future__ import annotations

import random
import threading

import pytest
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant,
                                 rule)

from blkjobs.errors import UsageError
from blkjobs.native.bitmap import Bitmap


# -- the model: one bool per granule ------------------------------------------

class Model:
    def __init__(self, size: int, gran: int):
        self.size, self.gran = size, gran
        self.g = [False] * self.granules(size)

    def granules(self, size: int) -> int:
        return -(-size // self.gran)

    def set(self, off: int, length: int) -> int:
        if not length:
            return 0
        n = 0
        for i in range(off // self.gran, (off + length - 1) // self.gran + 1):
            n += not self.g[i]
            self.g[i] = True
        return n

    def reset(self, off: int, length: int) -> int:
        if not length:
            return 0
        n = 0
        for i in range(off // self.gran, self.granules(off + length)):
            n += self.g[i]
            self.g[i] = False
        return n

    def test(self, off: int) -> bool:
        return self.g[off // self.gran]

    def count(self) -> int:
        return sum(min(self.gran, self.size - i * self.gran)
                   for i, d in enumerate(self.g) if d)

    def next(self, off: int, want: bool):
        if off >= self.size:
            return None
        for i in range(off // self.gran, len(self.g)):
            if self.g[i] == want:
                return max(off, i * self.gran)
        return None

    def area(self, off: int, max_len: int):
        s = self.next(off, True)
        if s is None:
            return None
        i = s // self.gran
        while i < len(self.g) and self.g[i]:
            i += 1
        end = min(i * self.gran, self.size, s + max_len)
        return (s, end - s)

    def resize(self, size: int) -> None:
        n = self.granules(size)
        self.g = self.g[:n] + [False] * (n - len(self.g))
        self.size = size

    def to_bytes(self, first: int = 0, n: int | None = None) -> bytes:
        bits = self.g[first:] if n is None else self.g[first:first + n]
        out = bytearray((len(bits) + 7) // 8)
        for i, d in enumerate(bits):
            if d:
                out[i // 8] |= 1 << (i % 8)
        return bytes(out)


GRANS = [512, 1024, 4096, 65536]


@st.composite
def geometry(draw):
    gran = draw(st.sampled_from(GRANS))
    # Mostly small disks, sometimes past one summary word (4096 granules).
    n = draw(st.one_of(st.integers(0, 130), st.integers(4000, 9000)))
    size = 0 if n == 0 else (n - 1) * gran + draw(st.integers(1, gran))
    return size, gran


class BitmapMachine(RuleBasedStateMachine):
    @initialize(geo=geometry())
    def init(self, geo):
        self.bm = Bitmap(*geo)
        self.m = Model(*geo)

    def _range(self, data):
        size = self.m.size
        off = data.draw(st.integers(0, size))
        length = data.draw(st.one_of(st.integers(0, min(size - off, 3 * self.m.gran)),
                                     st.integers(0, size - off)))
        return off, length

    def _aligned(self, data):
        g = self.m.gran
        ng = len(self.m.g)
        a = data.draw(st.integers(0, ng))
        b = data.draw(st.integers(a, ng))
        start = a * g if a < ng else self.m.size
        end = min(b * g, self.m.size)
        return start, max(end - start, 0)

    @rule(data=st.data())
    def set(self, data):
        off, length = self._range(data)
        assert self.bm.set(off, length) == self.m.set(off, length)

    @rule(data=st.data())
    def reset(self, data):
        off, length = self._aligned(data)
        assert self.bm.reset(off, length) == self.m.reset(off, length)

    @rule(data=st.data())
    def reset_unaligned(self, data):
        off, length = self._range(data)
        g, end = self.m.gran, off + length
        assume(length and (off % g or (end % g and end != self.m.size)))
        with pytest.raises(UsageError, match="must start on a multiple"):
            self.bm.reset(off, length)

    @rule(data=st.data())
    def beyond_end(self, data):
        off = data.draw(st.integers(0, self.m.size + 10))
        length = data.draw(st.integers(max(self.m.size - off + 1, 0), self.m.size + 2**20))
        with pytest.raises(UsageError, match="beyond the end"):
            self.bm.set(off, length)

    @rule(data=st.data())
    def queries(self, data):
        off = data.draw(st.integers(0, self.m.size))
        if off < self.m.size:
            assert self.bm.test(off) is self.m.test(off)
        else:
            with pytest.raises(UsageError):
                self.bm.test(off)
        assert self.bm.next_dirty(off) == self.m.next(off, True)
        assert self.bm.next_clean(off) == self.m.next(off, False)
        max_len = data.draw(st.integers(1, self.m.size + 1))
        assert self.bm.next_dirty_area(off, max_len) == self.m.area(off, max_len)
        assert self.bm.next_dirty_area(off) == self.m.area(off, 2**64)

    @rule(data=st.data())
    def take(self, data):
        g = self.m.gran
        off = min(data.draw(st.integers(0, len(self.m.g))) * g, self.m.size)
        max_len = data.draw(st.integers(g, 40 * g))
        want = self.m.area(off, max_len // g * g)
        assert self.bm.take_dirty_area(off, max_len) == want
        if want:
            self.m.reset(*want)

    @rule(data=st.data(), merge=st.booleans())
    def combine(self, data, merge):
        other, om = Bitmap(self.m.size, self.m.gran), Model(self.m.size, self.m.gran)
        for _ in range(data.draw(st.integers(0, 4))):
            off, length = self._range(data)
            other.set(off, length)
            om.set(off, length)
        new = [a or b for a, b in zip(self.m.g, om.g, strict=True)] if merge else \
              [a and not b for a, b in zip(self.m.g, om.g, strict=True)]
        changed = sum(a != b for a, b in zip(new, self.m.g, strict=True))
        fn = self.bm.merge if merge else self.bm.subtract
        assert fn(other) == changed
        self.m.g = new
        assert other.count() == om.count()  # src untouched

    @rule(data=st.data())
    def resize(self, data):
        g = self.m.gran
        n = data.draw(st.integers(0, 9000 if len(self.m.g) > 200 else 200))
        size = 0 if n == 0 else (n - 1) * g + data.draw(st.integers(1, g))
        self.bm.resize(size)
        self.m.resize(size)
        assert self.bm.size == size

    @rule(clear=st.booleans())
    def clear_or_set_all(self, clear):
        if clear:
            self.bm.clear()
            self.m.g = [False] * len(self.m.g)
        else:
            self.bm.set_all()
            self.m.g = [True] * len(self.m.g)

    @rule()
    def copy_is_a_snapshot(self):
        c = self.bm.copy()
        assert c.to_bytes() == self.m.to_bytes()
        if self.m.size:
            c.set_all()
            c.reset(0, self.m.size)
        assert self.bm.to_bytes() == self.m.to_bytes()
        assert c.count() == 0

    @rule(data=st.data())
    def serialize(self, data):
        g, ng = self.m.gran, len(self.m.g)
        whole = self.bm.to_bytes()
        assert whole == self.m.to_bytes()
        assert Bitmap.from_bytes(whole, self.m.size, g).to_bytes() == whole
        # A part: starts on a byte of the stream, ends on one or at size.
        a = data.draw(st.integers(0, ng // 8)) * 8
        b = data.draw(st.integers(a, ng))
        b = b if b == ng else b // 8 * 8
        off = min(a * g, self.m.size)
        length = min(b * g, self.m.size) - off
        part = self.bm.to_bytes(off, length)
        assert part == self.m.to_bytes(a, b - a)
        # Load a random part into the model and the bitmap.
        new = bytes(data.draw(st.binary(min_size=len(part), max_size=len(part))))
        assert self.bm.load_bytes(new, off, length) == len(new)
        for i in range(a, b):
            self.m.g[i] = bool(new[(i - a) // 8] >> ((i - a) % 8) & 1)

    @invariant()
    def counts(self):
        assert self.bm.count() == self.m.count()
        assert self.bm.dirty_granules() == sum(self.m.g)
        assert 0 <= self.bm.count() <= self.bm.size


BitmapMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestBitmapModel = pytest.mark.slow(BitmapMachine.TestCase)      # 5-8 s in CI


# -- exact examples ----------------------------------------------------------

def test_qcow2_bit_order():
    # Granules 0, 9, 10, 17, 23 of 24: byte k bit j is granule 8k+j, LSB first.
    bm = Bitmap(24 * 4096, 4096)
    for i in (0, 9, 10, 17, 23):
        bm.set(i * 4096 + 100, 1)
    assert bm.to_bytes() == b"\x01\x06\x82"
    assert bm.to_bytes(8 * 4096, 8 * 4096) == b"\x06"
    back = Bitmap.from_bytes(b"\x01\x06\x82", 24 * 4096, 4096)
    assert list(back) == [(0, 4096), (9 * 4096, 2 * 4096), (17 * 4096, 4096),
                          (23 * 4096, 4096)]


def test_partial_last_granule_and_padding():
    bm = Bitmap(10000, 1024)  # 10 granules, the last 784 bytes
    assert bm.set(1000, 100) == 2
    assert bm.set(9500, 1) == 1
    assert bm.count() == 1024 + 1024 + 784
    assert bm.to_bytes() == b"\x03\x02"
    assert list(bm) == [(0, 2048), (9216, 784)]
    assert bm.next_dirty(1500) == 1500 and bm.next_dirty(2048) == 9216
    assert bm.next_dirty(10000) is None
    assert bm.next_clean(9216) is None
    # Padding bits past granule 9 are ignored on load and written as 0.
    bm.load_bytes(b"\xff\xff")
    assert bm.dirty_granules() == 10 and bm.to_bytes() == b"\xff\x03"
    assert bm.count() == 10000
    bm.resize(10240)  # the dirty partial granule grows with the disk
    assert bm.count() == 10240


def test_areas_bounded_and_live():
    bm = Bitmap(1 << 20, 512)
    bm.set(0, 10 * 512)
    assert list(bm.areas(max_len=4 * 512)) == [(0, 2048), (2048, 2048), (4096, 1024)]
    it = iter(bm)
    assert next(it) == (0, 5120)
    bm.set(1 << 19, 1)  # marked ahead of the iterator: seen by it
    assert next(it) == (1 << 19, 512)
    assert list(it) == []


def test_copy_and_serialize_into_no_copies():
    bm = Bitmap(64 * 1024 * 512, 512)
    bm.set_all()
    buf = bytearray(bm.serialized_size() + 3)
    assert bm.serialize_into(memoryview(buf)[1:]) == 64 * 1024 // 8
    assert buf[0] == 0 and buf[1:-2] == b"\xff" * (64 * 1024 // 8) and buf[-2:] == b"\0\0"
    snap = bm.copy()
    bm.clear()
    assert snap.count() == 64 * 1024 * 512 and bm.count() == 0


@pytest.mark.parametrize("call, match", [
    (lambda: Bitmap(4096, 1000), "power of two"),
    (lambda: Bitmap(4096, 256), "power of two"),
    (lambda: Bitmap(4096, 2**32), "power of two"),
    (lambda: Bitmap(-1, 512), "must be >= 0"),
    (lambda: Bitmap(2**62 + 1, 512), "at most"),
    (lambda: Bitmap(4096, 512.0), "must be an integer"),
    (lambda: Bitmap(4096, 512).set(4000, 100), "beyond the end"),
    (lambda: Bitmap(4096, 512).set(-1, 1), "must be >= 0"),
    (lambda: Bitmap(4096, 512).set(0, 2**64), "too large"),
    (lambda: Bitmap(4096, 512).set(True, 1), "must be an integer"),
    (lambda: Bitmap(4096, 512).reset(1, 511), "must start on a multiple of 512"),
    (lambda: Bitmap(4096, 512).test(4096), "not below size"),
    (lambda: Bitmap(4096, 512).next_dirty(4097), "beyond size"),
    (lambda: Bitmap(4096, 512).next_dirty_area(0, 0), "max_len must be > 0"),
    (lambda: Bitmap(4096, 512).take_dirty_area(0, 100), "smaller than the granularity"),
    (lambda: Bitmap(4096, 512).take_dirty_area(10, 512), "must be a multiple of 512"),
    (lambda: Bitmap(4096, 512).take_dirty_areas(10, 512, 4), "must be a multiple of 512"),
    (lambda: Bitmap(4096, 512).merge(Bitmap(4096, 1024)), "bitmaps differ"),
    (lambda: Bitmap(4096, 512).subtract(Bitmap(4608, 512)), "bitmaps differ"),
    (lambda: Bitmap(4096, 512).merge(b"x"), "expected a Bitmap"),
    (lambda: Bitmap(8192, 512).to_bytes(512), "multiple of 4096"),
    (lambda: Bitmap(8192, 512).load_bytes(b"\0"), "got 1 bytes"),
    (lambda: Bitmap(8192, 512).load_bytes("ab"), "bytes-like"),
    (lambda: Bitmap(8192, 512).serialize_into(bytearray(1)), "too small"),
    (lambda: Bitmap(8192, 512).serialize_into(b"ab"), "writable"),
    (lambda: Bitmap(8192, 512).resize(-5), "must be >= 0"),
])
def test_usage_errors(call, match):
    with pytest.raises(UsageError, match=match):
        call()


def test_usage_error_is_value_error_like():
    # UsageError is our ValueError: it must not be an OSError subclass.
    with pytest.raises(UsageError) as ei:
        Bitmap(100, 512).set(50, 51)
    assert not isinstance(ei.value, OSError)
    assert "[50, 101)" in str(ei.value)


def test_results_are_plain_python():
    bm = Bitmap(10000, 512)
    bm.set(0, 1)
    for v in (bm.count(), bm.next_dirty(0), bm.size, bm.granularity):
        assert type(v) is int
    assert type(bm.test(0)) is bool
    area = bm.next_dirty_area(0)
    assert type(area) is tuple and all(type(x) is int for x in area)
    assert type(bm.to_bytes()) is bytearray


# -- threads -----------------------------------------------------------------

@pytest.mark.parametrize("mode", ["take", "iterate-reset"])
def test_writers_race_a_job(mode):
    """Writers mark disjoint granules, each exactly once, while a job takes
    or iterates-and-resets areas: every granule is found exactly once and
    nothing is lost or counted twice."""
    gran, nwriters, per = 512, 4, 3000
    bm = Bitmap(nwriters * per * gran, gran)
    seen = bytearray(nwriters * per)
    done = threading.Event()
    left = [nwriters]
    lock = threading.Lock()

    def writer(wid):
        order = list(range(per))
        random.Random(wid).shuffle(order)
        for j in order:
            g = j * nwriters + wid
            assert bm.set(g * gran + 7, 2) == 1
        with lock:
            left[0] -= 1
            if not left[0]:
                done.set()

    def take_pass():
        found, off = 0, 0
        if mode == "take":
            while (a := bm.take_dirty_area(off, 16 * gran)) is not None:
                found += record(*a)
                off = a[0] + a[1]
        else:
            for a in bm.areas(max_len=16 * gran):
                assert bm.reset(*a) == a[1] // gran
                found += record(*a)
        return found

    def record(start, length):
        for i in range(start // gran, (start + length) // gran):
            assert not seen[i], f"granule {i} found twice"
            seen[i] = 1
        return length // gran

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(nwriters)]
    for t in threads:
        t.start()
    taken = passes = 0
    while True:
        finished_before = done.is_set()
        n = take_pass()
        taken += n
        passes += 1
        if finished_before and n == 0:
            break
    for t in threads:
        t.join()
    assert taken == nwriters * per
    assert bm.count() == 0 and all(seen)
    assert passes >= 2


def test_threads_hammer_counts_exact():
    """Writers set overlapping ranges while another thread merges and copies:
    the final bitmap is exactly the union of everything written."""
    gran, size = 1024, 4096 * 1024 + 333
    bm = Bitmap(size, gran)
    ranges = [[(r.randrange(size), r.randrange(1, 50000)) for _ in range(2000)]
              for r in (random.Random(s) for s in range(4))]
    stop = threading.Event()

    def writer(rs):
        for off, ln in rs:
            bm.set(off, min(ln, size - off))

    def reader():
        while not stop.is_set():
            c = bm.copy()
            assert c.count() <= size
            bm.merge(c)  # a no-op that takes both locks
            list(bm.areas())

    model = Model(size, gran)
    for rs in ranges:
        for off, ln in rs:
            model.set(off, min(ln, size - off))
    ts = [threading.Thread(target=writer, args=(rs,)) for rs in ranges]
    rt = threading.Thread(target=reader)
    rt.start()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    stop.set()
    rt.join()
    assert bm.to_bytes() == model.to_bytes()
    assert bm.count() == model.count()


@pytest.mark.parametrize("offset, max_bytes, max_areas", [
    (0, 2**40, 10**6), (0, 37 * 4096, 10**6), (64 * 4096, 2**40, 25), (0, 2**40, 1),
    (1000 * 4096, 2**40, 10**6), (0, 4095, 10)])
def test_take_dirty_areas_is_take_dirty_area_repeated(offset, max_bytes, max_areas):
    """take_dirty_areas (a job's claim of scattered clusters in one call)
    takes what take_dirty_area called again from the end of each area, with
    what is left of the byte budget, would take, and leaves the same bitmap."""
    import random
    rnd = random.Random(11)
    a, b = Bitmap(1024 * 4096, 4096), Bitmap(1024 * 4096, 4096)
    for _ in range(300):
        s, n = rnd.randrange(1024) * 4096, rnd.randrange(1, 4) * 4096
        a.set(s, min(n, a.size - s))
        b.set(s, min(n, b.size - s))
    want: list[tuple[int, int]] = []
    off, left = offset, max_bytes
    while left >= 4096 and len(want) < max_areas:
        area = b.take_dirty_area(off, left)
        if area is None:
            break
        want.append(area)
        left -= area[1]
        off = area[0] + area[1]
    assert a.take_dirty_areas(offset, max_bytes, max_areas) == want
    assert list(a.areas()) == list(b.areas())
