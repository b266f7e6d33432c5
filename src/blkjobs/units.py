"""Sizes and rates in qemu-img's spelling -- 512, 4k, 4K, 1M, 1.5G, 1T, 512b,
0x1000 -- and sizes shown to people. Below every layer (like :mod:`.errors`):
the command line, image operations, formats and ``blkjobs bench`` all use it;
and :func:`sector_size`, a size in QEMU's whole sectors.

The one grammar is QEMU's ``qemu_strtosz`` (what ``qemu-img create IMG SIZE``
accepts, compared with qemu-img 7.2 in tests/test_units.py): a decimal number
with an optional suffix b/B (bytes), k/K, M, G, T, P or E (binary: k = 1024);
leading white space and a ``+`` are allowed, nothing after the suffix (no
``10GB``, ``10KiB``, ``1 k``); a fraction only with a multiplier (``1.5k``,
``1.k``; ``1.5`` and ``1.5b`` are refused, ``1.0`` is 1) and no exponent
(``1.5e3`` is refused; ``1.5e`` is 1.5 EiB), rounded half up to whole bytes;
or hexadecimal ``0x1f`` without a fraction (a suffix on hex is deprecated in
QEMU: accepted, with its warning logged). Values past 2**64 - 1 are out of
range.
"""
from __future__ import annotations

from .errors import UsageError

INT64_MAX = (1 << 63) - 1
_U64_MAX = (1 << 64) - 1
SECTOR = 512


def sector_size(size: int) -> int:
    """``size`` rounded up to whole 512-byte sectors: a file's length as
    QEMU's block layer gives it (``bdrv_getlength``; ``qemu-img info`` of a
    raw file of 65537 bytes shows 66048), and the size qemu-img gives an
    image it creates."""
    return -(-size // SECTOR) * SECTOR
_MUL = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50,
        "e": 1 << 60}
_WS = " \t\n\v\f\r"                                   # C isspace()
# Patterns compiled on first use (re's cache), and re imported then: every
# command imports this module, few parse more than a plain number (start-up)
_DEC = f"[{_WS}]*[+-]?[0-9]+"                            # strtoull(s, 10)
_HEX = f"[{_WS}]*[+-]?(?:0[xX](?=[0-9a-fA-F]))?[0-9a-fA-F]+"    # strtoull(s, 16)
_FRACTION = r"\.[0-9]+([eE][+-]?[0-9]+)?"                 # what strtod takes from ".5..."


def _fraction(text: str, pos: int) -> tuple[int, int]:
    """After the integer part: (the fraction as 64-bit fixed point, the
    position after it), as QEMU reads it with strtod (a '.' without digits
    is skipped; an exponent is refused)."""
    import re
    m = re.compile(_FRACTION).match(text, pos)
    if m is None:
        return 0, pos + 1
    if m.group(1):
        raise ValueError(text)
    # (uint64_t)(fraction * 0x1p64), wrapping as QEMU's does when the
    # fraction rounds to 1.0 (".99999999999999999999")
    return int(float(m.group()) * 2.0 ** 64) & _U64_MAX, m.end()


def strtosz(text: str) -> int:
    """The value of ``text`` in qemu-img's size grammar (see the module).
    Raises ValueError when it is not a size, OverflowError when it is one
    above 2**64 - 1."""
    # plain digits with at most a suffix (``4k``, the defaults): read without re
    suffix = text[-1:].lower() if text[-1:].isalpha() else ""
    digits = text[:len(text) - len(suffix)]
    if digits.isdigit() and digits.isascii() and (not suffix or suffix in _MUL):
        val = int(digits)
        if val > _U64_MAX:      # strtoull's ERANGE: a range error if nothing follows
            raise (ValueError if suffix else OverflowError)(text)
        val *= _MUL[suffix] if suffix else 1
        if val > _U64_MAX:
            raise OverflowError(text)
        return val
    import re
    m = re.match(_DEC, text)
    if m is None or "-" in m.group():
        raise ValueError(text)
    val, pos, valf, is_hex = int(m.group()), m.end(), 0, False
    if val == 0 and text[pos:pos + 1] in ("x", "X"):
        m = re.match(_HEX, text)
        assert m is not None
        val, pos, is_hex = int(m.group(), 16), m.end(), True
        if text[pos:pos + 1] == "." and val <= _U64_MAX:
            raise ValueError(text)
    if val > _U64_MAX:          # strtoull's ERANGE: a range error if nothing follows
        raise (OverflowError if pos == len(text) else ValueError)(text)
    if text[pos:pos + 1] == "." and not is_hex:
        valf, pos = _fraction(text, pos)
    mul = _MUL.get(text[pos:pos + 1].lower()) if pos < len(text) else None
    if mul is not None:
        pos += 1
        if is_hex:
            import logging      # (not at start-up: milliseconds of every command)
            logging.getLogger(__name__).warning(
                "Using a multiplier suffix on hex numbers is deprecated: %s", text)
    if pos != len(text):
        raise ValueError(text)
    if mul is None or mul == 1:
        if valf:                # a fraction needs a multiplier
            raise ValueError(text)
        return val
    low = valf * mul                                    # 64.64 x 64.0 fixed point
    val = val * mul + (low >> 64) + ((low >> 63) & 1)   # rounded half up
    if val > _U64_MAX:
        raise OverflowError(text)
    return val


def size_syntax_error(what: str) -> UsageError:
    """qemu-img's refusal of a value that is not a size (two lines, as
    qemu-img prints them)."""
    return UsageError(f"Invalid {what} specified. You may use k, M, G, T, P or E suffixes for\n"
                      "blkjobs: kilobytes, megabytes, gigabytes, terabytes, petabytes and "
                      "exabytes.")


def parse_size(text: str, what: str = "size", minimum: int = 0,
               maximum: int = INT64_MAX) -> int:
    """A size argument, refused as qemu-img refuses it (``cvtnum``):
    ``Invalid WHAT specified. You may use k, M, G, T, P or E suffixes for``
    (with a second line) or ``Invalid WHAT specified. Must be between MIN and
    MAX.``"""
    try:
        value = strtosz(str(text))
    except ValueError:
        raise size_syntax_error(what) from None
    except OverflowError:
        value = _U64_MAX + 1
    if not minimum <= value <= maximum:
        raise UsageError(f"Invalid {what} specified. Must be between {minimum} and {maximum}.")
    return value


def parse_opt_size(text: str, name: str) -> int:
    """A size given as an option value (``-o cluster_size=64k``, resize's
    size), refused as QEMU's option parser refuses it."""
    try:
        return strtosz(str(text))
    except ValueError:
        raise UsageError(f"Parameter '{name}' expects a non-negative number below 2^64\n"
                         "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, "
                         "tera-, peta-\nand exabytes, respectively.") from None
    except OverflowError:
        raise UsageError(f"Value '{text}' is out of range for parameter '{name}'") from None


def human(n: float, binary: bool = True) -> str:
    """1536 -> '1.5 KiB' (qemu-img style)."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"] if binary else ["B", "kB", "MB", "GB", "TB", "PB"]
    base = 1024.0 if binary else 1000.0
    x = float(n)
    for u in units:
        if abs(x) < base or u == units[-1]:
            if u == "B":
                return f"{int(x)} B"
            return f"{x:.3g} {u}"
        x /= base
    return f"{n} B"


# qemu-img's ``-o`` option lists (create, convert, amend, measure): items
# split at a comma, ``,,`` a comma inside an item; several ``-o`` are joined
# with a comma (each one checked first, so the join cannot fuse two items).

def valid_option_list(text: str) -> bool:
    """qemu-img's check of one ``-o`` argument: not empty, not starting
    with a comma, not ending in an odd number of commas."""
    if not text or text[0] == ",":
        return False
    return (len(text) - len(text.rstrip(","))) % 2 == 0


def split_option_list(text: str) -> list[str]:
    """``a=1,b=x,,y`` -> ``['a=1', 'b=x,y']`` (QEMU's get_opt_value; empty
    items kept)."""
    items: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(text[i])
        i += 1
    items.append("".join(cur))
    return items


def option_items(texts: list[str] | str | None) -> list[str]:
    """The non-empty items of one or several ``-o`` arguments."""
    if isinstance(texts, str):
        texts = [texts]
    return [item for text in texts or [] for item in split_option_list(text) if item]


def has_help_option(texts: list[str] | str | None) -> bool:
    """Whether an item is ``help`` or ``?`` (``x,,help`` is the one item ``x,help``)."""
    return any(item in ("help", "?") for item in option_items(texts))
