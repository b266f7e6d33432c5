"""Dirty bitmap (C, csrc/bitmap.c): which granules of a disk were written.

All offsets and lengths are in bytes of the disk. A granule is
``granularity`` bytes (a power of two, 512 B .. 2 GiB); when ``size`` is not a
multiple of it, the last granule is partial and ends at ``size``.

Rules (the C header csrc/bitmap.h says the same):

* Ranges past ``size`` are rejected (:class:`UsageError`), never clipped.
* :meth:`Bitmap.set` rounds out: every granule the range touches becomes
  dirty. :meth:`Bitmap.reset` does not round: the range must start on a
  granule boundary and end on one or at ``size``.
* :meth:`Bitmap.count` is in bytes: dirty granules x granularity, except that
  a dirty partial last granule counts only its bytes below ``size``; so it
  never exceeds ``size``. :meth:`Bitmap.dirty_granules` is the granule count.
* Every method is atomic and thread-safe (one mutex per bitmap, the GIL is
  released during the C call): writer threads may :meth:`set` while a job
  iterates. Iteration is live: dirt added behind the iterator is seen on
  the next pass. A job that copies what it finds should use
  :meth:`take_dirty_area`, which finds and resets in one step.
* Serialization uses the on-disk order of qcow2 persistent bitmaps: byte k,
  bit j (least significant first) is granule 8k+j.
"""
from __future__ import annotations

import errno
import operator
from collections.abc import Iterator

from ..errors import UsageError
from ._lib import ensure, ffi, lib

_U64_MAX = 2**64 - 1
MIN_GRANULARITY = int(lib.BJ_BITMAP_MIN_GRANULARITY)
MAX_GRANULARITY = int(lib.BJ_BITMAP_MAX_GRANULARITY)
MAX_SIZE = int(lib.BJ_BITMAP_MAX_SIZE)


def _int(name: str, value) -> int:
    """A non-negative integer that fits in uint64_t, or UsageError."""
    if isinstance(value, bool):
        raise UsageError(f"invalid {name} {value!r}: must be an integer")
    try:
        v = operator.index(value)
    except TypeError:
        raise UsageError(f"invalid {name} {value!r}: must be an integer") from None
    if v < 0:
        raise UsageError(f"invalid {name} {v}: must be >= 0")
    if v > _U64_MAX:
        raise UsageError(f"invalid {name} {v}: too large")
    return v


class Bitmap:
    """A dirty bitmap of a ``size``-byte disk with ``granularity``-byte granules."""

    __slots__ = ("_b", "_gran", "__weakref__")

    def __init__(self, size: int, granularity: int = 65536):
        size = _int("size", size)
        granularity = _int("granularity", granularity)
        if (granularity < MIN_GRANULARITY or granularity > MAX_GRANULARITY
                or granularity & (granularity - 1)):
            raise UsageError(
                f"invalid granularity {granularity}: must be a power of two from "
                f"{MIN_GRANULARITY} to {MAX_GRANULARITY}")
        if size > MAX_SIZE:
            raise UsageError(f"invalid size {size}: at most {MAX_SIZE}")
        p = ffi.new("struct bj_bitmap **")
        ensure(lib.bj_bitmap_new(p, size, granularity), "dirty bitmap")
        self._b = ffi.gc(p[0], lib.bj_bitmap_free)
        self._gran = granularity

    @classmethod
    def _adopt(cls, ptr, granularity: int) -> Bitmap:
        self = cls.__new__(cls)
        self._b = ffi.gc(ptr, lib.bj_bitmap_free)
        self._gran = granularity
        return self

    # -- properties ---------------------------------------------------------

    @property
    def size(self) -> int:
        """Disk size in bytes (changes only with :meth:`resize`)."""
        return int(lib.bj_bitmap_size(self._b))

    @property
    def granularity(self) -> int:
        return self._gran

    def __repr__(self) -> str:
        return (f"<Bitmap size={self.size} granularity={self._gran} "
                f"dirty={self.count()}>")

    # -- errors -------------------------------------------------------------

    def _check(self, rc: int, what: str, explain) -> int:
        """ensure(), but -EINVAL becomes a UsageError with explain()'s text."""
        if rc == -errno.EINVAL:
            raise UsageError(f"{what}: {explain()}")
        return ensure(rc, what)

    def _range_text(self, offset: int, length: int, align: int = 0) -> str:
        size = self.size
        if offset > size or length > size - offset:
            return (f"range [{offset}, {offset + length}) is beyond the end of "
                    f"the bitmap (size {size})")
        if align:
            return (f"range [{offset}, {offset + length}) must start on a multiple "
                    f"of {align} and end on one (either may be size {size})")
        return "invalid arguments"

    def _length(self, offset: int, length) -> int:
        """length=None means up to the end of the disk."""
        if length is None:
            return max(self.size - offset, 0)
        return _int("length", length)

    # -- marking ------------------------------------------------------------

    def set(self, offset: int, length: int) -> int:
        """Mark [offset, offset+length) dirty, rounding out to granules.
        Returns the number of granules that became dirty."""
        offset, length = _int("offset", offset), _int("length", length)
        return self._check(lib.bj_bitmap_set(self._b, offset, length), "set",
                           lambda: self._range_text(offset, length))

    def reset(self, offset: int, length: int) -> int:
        """Mark [offset, offset+length) clean; the range must be granule
        aligned (its end may be ``size``). Returns granules that became clean."""
        offset, length = _int("offset", offset), _int("length", length)
        return self._check(lib.bj_bitmap_reset(self._b, offset, length), "reset",
                           lambda: self._range_text(offset, length, self._gran))

    def clear(self) -> None:
        """Mark everything clean."""
        ensure(lib.bj_bitmap_clear(self._b), "clear")

    def set_all(self) -> None:
        """Mark everything dirty."""
        ensure(lib.bj_bitmap_set_all(self._b), "set_all")

    def resize(self, size: int) -> None:
        """Change the disk size: new granules are clean, cut ones are dropped
        (a dirty partial last granule stays dirty when it grows)."""
        size = _int("size", size)
        if size > MAX_SIZE:
            raise UsageError(f"invalid size {size}: at most {MAX_SIZE}")
        ensure(lib.bj_bitmap_resize(self._b, size), "resize")

    # -- queries ------------------------------------------------------------

    def test(self, offset: int) -> bool:
        """Is the granule holding byte ``offset`` (< size) dirty?"""
        offset = _int("offset", offset)
        rc = self._check(lib.bj_bitmap_test(self._b, offset), "test",
                         lambda: f"offset {offset} is not below size {self.size}")
        return bool(rc)

    def count(self) -> int:
        """Dirty bytes (a dirty partial last granule counts up to ``size``)."""
        return ensure(lib.bj_bitmap_dirty_bytes(self._b), "count")

    def dirty_granules(self) -> int:
        return ensure(lib.bj_bitmap_count(self._b), "count")

    def _next(self, fn, offset: int, what: str) -> int | None:
        offset = _int("offset", offset)
        rc = fn(self._b, offset)
        if rc == -errno.ENOENT:
            return None
        return self._check(rc, what,
                           lambda: f"offset {offset} is beyond size {self.size}")

    def next_dirty(self, offset: int = 0) -> int | None:
        """First dirty byte at or after ``offset`` (``offset`` itself when its
        granule is dirty), or None."""
        return self._next(lib.bj_bitmap_next_dirty, offset, "next_dirty")

    def next_clean(self, offset: int = 0) -> int | None:
        """First clean byte at or after ``offset``, or None."""
        return self._next(lib.bj_bitmap_next_clean, offset, "next_clean")

    def _area(self, fn, offset: int, max_len, what: str, explain) -> tuple[int, int] | None:
        offset = _int("offset", offset)
        max_len = _U64_MAX if max_len is None else _int("max_len", max_len)
        out = ffi.new("uint64_t[2]")
        rc = self._check(fn(self._b, offset, max_len, out, out + 1), what,
                         lambda: explain(offset, max_len))
        return (int(out[0]), int(out[1])) if rc else None

    def next_dirty_area(self, offset: int = 0,
                        max_len: int | None = None) -> tuple[int, int] | None:
        """``(start, length)`` of the first run of dirty granules at or after
        ``offset``: start = next_dirty(offset), length at most ``max_len``
        (None: unbounded) and never past size. None when all clean. With a
        granule-aligned offset and max_len, the area can be passed to reset."""
        def explain(off, ml):
            if ml == 0:
                return "max_len must be > 0"
            return f"offset {off} is beyond size {self.size}"
        return self._area(lib.bj_bitmap_next_dirty_area, offset, max_len,
                          "next_dirty_area", explain)

    def take_dirty_area(self, offset: int = 0,
                        max_len: int | None = None) -> tuple[int, int] | None:
        """next_dirty_area() and reset() of it as one atomic step. ``offset``
        must be granule aligned (or size); ``max_len`` is rounded down to
        granules and must be >= granularity."""
        def explain(off, ml):
            if ml < self._gran:
                return f"max_len {ml} is smaller than the granularity {self._gran}"
            return (f"offset {off} must be a multiple of {self._gran} "
                    f"and at most size {self.size}")
        return self._area(lib.bj_bitmap_take_dirty_area, offset, max_len,
                          "take_dirty_area", explain)

    def take_dirty_areas(self, offset: int, max_bytes: int,
                         max_areas: int) -> list[tuple[int, int]]:
        """take_dirty_area() repeatedly from ``offset`` on (each from where
        the last one ended, with what is left of ``max_bytes`` as its
        max_len): up to ``max_areas`` areas, until less than a granule is
        left or nothing is dirty up to the end (no wrap). A job claiming a
        thousand scattered clusters: one call, not a thousand."""
        areas: list[tuple[int, int]] = []
        left = _int("max_bytes", max_bytes)
        out = ffi.new("uint64_t[2]")
        b, fn, gran = self._b, lib.bj_bitmap_take_dirty_area, self._gran
        off = _int("offset", offset)
        while left >= gran and len(areas) < max_areas:
            rc = fn(b, off, left, out, out + 1)
            if rc <= 0:
                if rc:
                    self._check(rc, "take_dirty_area", lambda o=off: (
                        f"offset {o} must be a multiple of {gran} "
                        f"and at most size {self.size}"))
                break
            s, n = int(out[0]), int(out[1])
            areas.append((s, n))
            left -= n
            off = s + n
        return areas

    def areas(self, offset: int = 0, max_len: int | None = None
              ) -> Iterator[tuple[int, int]]:
        """Iterate over dirty areas ``(start, length)`` from ``offset`` to the
        end, without changing the bitmap. Live: each step looks again."""
        while True:
            area = self.next_dirty_area(offset, max_len)
            if area is None:
                return
            yield area
            offset = area[0] + area[1]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return self.areas()

    # -- two bitmaps ----------------------------------------------------------

    def _pair(self, fn, other: Bitmap, what: str) -> int:
        if not isinstance(other, Bitmap):
            raise UsageError(f"{what}: expected a Bitmap, got {type(other).__name__}")
        return self._check(
            fn(self._b, other._b), what,
            lambda: (f"bitmaps differ: size {self.size}/granularity {self._gran} "
                     f"vs size {other.size}/granularity {other._gran}"))

    def merge(self, other: Bitmap) -> int:
        """self |= other (same size and granularity). Returns granules changed."""
        return self._pair(lib.bj_bitmap_merge, other, "merge")

    def subtract(self, other: Bitmap) -> int:
        """self &= ~other (same size and granularity). Returns granules changed."""
        return self._pair(lib.bj_bitmap_subtract, other, "subtract")

    def copy(self) -> Bitmap:
        """An independent snapshot, taken atomically."""
        p = ffi.new("struct bj_bitmap **")
        ensure(lib.bj_bitmap_copy(p, self._b), "copy")
        return Bitmap._adopt(p[0], self._gran)

    __copy__ = copy

    # -- serialization (qcow2 bit order) ------------------------------------

    def _ser_text(self, offset: int, length: int) -> str:
        return self._range_text(offset, length, 8 * self._gran)

    def serialized_size(self, offset: int = 0, length: int | None = None) -> int:
        """Bytes that [offset, offset+length) takes serialized: ceil(granules/8).
        offset must be a multiple of 8*granularity, the end one too or size."""
        offset = _int("offset", offset)
        length = self._length(offset, length)
        return self._check(lib.bj_bitmap_serialized_size(self._b, offset, length),
                           "serialized_size", lambda: self._ser_text(offset, length))

    def serialize_into(self, buf, offset: int = 0, length: int | None = None) -> int:
        """Write the range's bits into the writable buffer ``buf`` (no copy);
        return the number of bytes written."""
        offset = _int("offset", offset)
        length = self._length(offset, length)
        try:
            cbuf = ffi.from_buffer(buf, require_writable=True)
        except (TypeError, BufferError) as exc:
            raise UsageError(f"serialize_into: need a writable buffer: {exc}") from None
        rc = lib.bj_bitmap_serialize(self._b, offset, length, cbuf, len(cbuf))
        if rc == -errno.ENOBUFS:
            raise UsageError(f"serialize_into: buffer of {len(cbuf)} bytes is too small "
                             f"(need {self.serialized_size(offset, length)})")
        return self._check(rc, "serialize", lambda: self._ser_text(offset, length))

    def to_bytes(self, offset: int = 0, length: int | None = None) -> bytearray:
        """The range's bits in qcow2 order, as a new bytearray (filled in
        place by C, not copied again)."""
        buf = bytearray(self.serialized_size(offset, length))
        if buf:
            self.serialize_into(buf, offset, length)
        return buf

    def load_bytes(self, data, offset: int = 0, length: int | None = None) -> int:
        """Replace the bits of [offset, offset+length) (default: to the end)
        with ``data`` in qcow2 order; ``data`` must be exactly the range's
        serialized size (padding bits after the last granule are ignored)."""
        offset = _int("offset", offset)
        length = self._length(offset, length)
        try:
            cbuf = ffi.from_buffer(data)
        except TypeError as exc:
            raise UsageError(f"load_bytes: need a bytes-like object: {exc}") from None
        need = self.serialized_size(offset, length)
        if len(cbuf) != need:
            raise UsageError(f"load_bytes: got {len(cbuf)} bytes, the range "
                             f"[{offset}, {offset + length}) takes {need}")
        return self._check(lib.bj_bitmap_deserialize(self._b, offset, length, cbuf, len(cbuf)),
                           "deserialize", lambda: self._ser_text(offset, length))

    @classmethod
    def from_bytes(cls, data, size: int, granularity: int = 65536) -> Bitmap:
        """A new bitmap of ``size``/``granularity`` holding ``data`` (qcow2 order,
        exactly ceil(granules/8) bytes)."""
        bm = cls(size, granularity)
        bm.load_bytes(data)
        return bm
