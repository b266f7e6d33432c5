"""A refcount block's bytes (formats/qcow2/refcount.py ``_encode``/
``_decode``) for every refcount width qcow2 allows: big-endian entries of 8,
16, 32 and 64 bits, and 1-, 2- and 4-bit entries packed from each byte's
least significant bits (the qcow2 spec's refcount_order). The whole-image
behaviour is held against qemu-img by the refcount growth, amend and
refcount-order tests; this pins the codec itself, down to the byte."""
from __future__ import annotations

import random
import struct
from types import SimpleNamespace

import pytest

from blkjobs.formats.qcow2.refcount import Refcounts


def _codec(bits: int) -> SimpleNamespace:
    return SimpleNamespace(bits=bits)


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_round_trip_at_every_width(bits):
    rnd = random.Random(bits)
    n = 8 * 4096 // bits            # a 4 KiB block's entries
    vals = [rnd.randrange(1 << bits) for _ in range(n)]
    vals[0], vals[-1] = (1 << bits) - 1, 0
    raw = Refcounts._encode(_codec(bits), vals)     # type: ignore[arg-type]
    assert len(raw) == 4096
    assert Refcounts._decode(_codec(bits), raw) == vals     # type: ignore[arg-type]


@pytest.mark.parametrize("bits,code", [(8, "B"), (16, "H"), (32, "I"), (64, "Q")])
def test_whole_bytes_are_big_endian(bits, code):
    vals = [1, 2, (1 << bits) - 1, 0, 0x80 if bits == 8 else 0x0102]
    assert Refcounts._encode(_codec(bits), vals) == struct.pack(f">{len(vals)}{code}", *vals)


def test_sub_byte_entries_fill_each_byte_from_its_low_bits():
    # refcount_order 0..2: entry i sits at bit (i % per) * width of byte i // per
    assert Refcounts._encode(_codec(1), [1, 0, 0, 0, 0, 0, 0, 1]) == b"\x81"
    assert Refcounts._encode(_codec(2), [1, 2, 3, 0]) == bytes([0b00111001])
    assert Refcounts._encode(_codec(4), [0xA, 0x5]) == b"\x5a"


@pytest.mark.parametrize("bits,code", [(16, "H"), (32, "I"), (64, "Q")])
def test_small_and_large_refcounts_encode_alike(bits, code):
    """Blocks whose refcounts all fit a byte (the usual case, encoded from
    the low bytes) and blocks with one larger value (packed entry by entry)
    give the same big-endian bytes as struct, and decode back."""
    n = 8 * 4096 // bits
    for vals in ([1] * 7 + [0] * (n - 7), [v % 256 for v in range(n)],
                 [1] * (n - 1) + [256], [0] * (n - 1) + [(1 << bits) - 1], [0] * n):
        raw = Refcounts._encode(_codec(bits), vals)     # type: ignore[arg-type]
        assert raw == struct.pack(f">{n}{code}", *vals)
        assert Refcounts._decode(_codec(bits), raw) == vals     # type: ignore[arg-type]
