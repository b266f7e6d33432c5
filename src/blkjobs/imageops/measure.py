"""``measure``: how large a new image would be (``qemu-img measure``).

The numbers are qemu-img 7.2's, computed the same way:

* raw: ``required`` = ``fully-allocated`` = the virtual size (a given size is
  rounded up to 512 bytes);
* qcow2: ``fully-allocated`` is the virtual size rounded up to the cluster
  size plus all metadata a fully allocated image needs (header, every L2
  table, the L1 table, and the refcount table and blocks covering all of it:
  QEMU's fixpoint). ``required`` counts the metadata of the fully allocated
  image plus the data clusters that will be written: none for a bare size,
  every cluster for ``preallocation=falloc|full`` or a backing file, else each
  target cluster that a run of data of the source (through its backing
  chain, zero and unallocated runs excluded) touches.
* ``bitmaps`` (qcow2 target of compat 1.1 measured from a qcow2 v3 source):
  the clusters the source's persistent bitmaps need (data, tables, directory).
"""
from __future__ import annotations

import os
import struct

from ..errors import UsageError
from ..units import option_items, parse_opt_size

L1E = 8
REFTABLE_ENTRY = 8
MAX_L1_BYTES = 32 << 20
_BOOL = {"on": True, "off": False, "true": True, "false": False, "yes": True, "no": False}
#: the creation options each target format knows (qemu-img's lists)
QCOW2_OPTS = ("size", "compat", "backing_file", "backing_fmt", "encryption", "cluster_size",
              "preallocation", "lazy_refcounts", "refcount_bits", "extended_l2",
              "compression_type", "data_file", "data_file_raw", "encrypt.format",
              "encrypt.key-secret", "encrypt.cipher-alg", "encrypt.cipher-mode",
              "encrypt.ivgen-alg", "encrypt.ivgen-hash-alg", "encrypt.hash-alg",
              "encrypt.iter-time")
RAW_OPTS = ("size", "preallocation")
PREALLOC = ("off", "metadata", "falloc", "full")


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """Bytes of refcount table and blocks that count ``clusters`` clusters
    and themselves (QEMU's qcow2_refcount_metadata_size fixpoint)."""
    from ..formats.qcow2.prealloc import refcount_blocks
    blocks = refcount_blocks(clusters, cluster_size, 1 << refcount_order)
    return (blocks + -(-blocks // (cluster_size // REFTABLE_ENTRY))) * cluster_size


def prealloc_size(total: int, cluster_size: int, refcount_order: int, extended_l2: bool) -> int:
    """qcow2_calc_prealloc_size: a fully allocated image's file size."""
    l2e = 16 if extended_l2 else 8
    aligned = _round_up(total, cluster_size)
    meta = cluster_size                                   # header
    nl2e = _round_up(aligned // cluster_size, cluster_size // l2e)
    meta += nl2e * l2e                                    # L2 tables
    nl1e = _round_up(nl2e * l2e // cluster_size, cluster_size // L1E)
    meta += nl1e * L1E                                    # L1 table
    meta += refcount_metadata_size((meta + aligned) // cluster_size, cluster_size,
                                   refcount_order)
    return meta + aligned


def parse_target_opts(texts: list[str] | None, fmt: str) -> dict:
    """``-o`` options of the target format, checked like qemu-img (its
    texts; each error one line or two, raised as UsageError)."""
    known = QCOW2_OPTS if fmt == "qcow2" else RAW_OPTS
    out: dict[str, str | bool | int] = {}
    for item in option_items(texts):        # ``,,``: a comma inside a value
        name, _, val = item.partition("=")
        if name not in known:
            raise UsageError(f"Invalid parameter '{name}'\n"
                             f"blkjobs: Invalid options for file format '{fmt}'")
        value: str | bool | int = val
        if name in ("extended_l2", "lazy_refcounts", "data_file_raw", "encryption"):
            if val.lower() not in ("on", "off"):
                raise UsageError(f"Parameter '{name}' expects 'on' or 'off'\n"
                                 f"blkjobs: Invalid options for file format '{fmt}'")
            value = val.lower() == "on"
        elif name == "encrypt.iter-time" and not _number(val):
            raise UsageError(f"Parameter '{name}' expects a number\n"
                             f"blkjobs: Invalid options for file format '{fmt}'")
        elif name in ("size", "cluster_size"):
            try:
                value = parse_opt_size(val, name)
            except UsageError as e:
                raise UsageError(f"{e}\nblkjobs: Invalid options for file format "
                                 f"'{fmt}'") from None
        out[name] = value
    return out


def _number(text: str) -> bool:
    """What QEMU's number options take (strtoull, base 0)."""
    try:
        int(text, 8 if text[:1] == "0" and text[1:2].isdigit() else 0)
    except ValueError:
        return False
    return not text.startswith("-")


def qcow2_params(opts: dict) -> tuple[int, bool, int, int, str]:
    """(cluster_size, extended_l2, version, refcount_order, preallocation)
    with qemu-img's checks and texts."""
    cs = opts.get("cluster_size", 65536)
    if cs < 512 or cs > (2 << 20) or cs & (cs - 1):
        raise UsageError("Cluster size must be a power of two between 512 and 2048k")
    ext = opts.get("extended_l2", False)
    if ext and cs < 16384:
        raise UsageError("Extended L2 entries are only supported with cluster sizes "
                         "of at least 16384 bytes")
    compat = opts.get("compat", "1.1")
    if compat in ("0.10", "v2"):
        version = 2
    elif compat in ("1.1", "v3"):
        version = 3
    else:
        raise UsageError(f"Invalid compatibility level: '{compat}'")
    try:
        rb = int(opts.get("refcount_bits", 16))
    except ValueError:
        raise UsageError("Refcount width must be a power of two and may not exceed 64 bits") \
            from None
    if rb < 1 or rb > 64 or rb & (rb - 1):
        raise UsageError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and rb != 16:
        raise UsageError("Different refcount widths than 16 bits require compatibility level "
                         "1.1 or above (use compat=1.1 or greater)")
    prealloc = opts.get("preallocation", "off")
    if prealloc not in PREALLOC:
        raise UsageError(f"invalid parameter value: {prealloc}")
    return cs, ext, version, rb.bit_length() - 1, prealloc


def luks_area(opts: dict, cluster_size: int) -> int:
    """The clusters of a LUKS header a qcow2 target with
    ``encrypt.format=luks`` holds (none for ``aes``, the legacy
    ``encryption=on``, or no encryption)."""
    if opts.get("encrypt.format") != "luks":
        return 0
    from ..formats.luks import parse_create_opts, payload_bytes
    o = parse_create_opts({k: v for k, v in opts.items() if k.startswith("encrypt.")},
                          "encrypt.")
    return _round_up(payload_bytes(o, "encrypt."), cluster_size)


def data_bytes(node, cluster_size: int) -> int:
    """Bytes of the target clusters that a data run of ``node``'s chain
    touches (qcow2_measure's walk over bdrv_block_status_above)."""
    size = node.size
    total = 0
    last_cluster = -1           # the last cluster counted
    pos = 0
    step = 1 << 30
    while pos < size:
        n = min(step, size - pos)
        for r in node.block_status(pos, n):
            if r["zero"] or not r["data"]:
                continue
            a = max(r["start"] // cluster_size, last_cluster + 1)
            b = -(-(r["start"] + r["length"]) // cluster_size)
            if b > a:
                total += (b - a) * cluster_size
                last_cluster = b - 1
        pos += n
    return total


def bitmaps_size(drv, cluster_size: int) -> int:
    """qcow2_get_persistent_dirty_bitmap_size over the bitmaps that a qcow2
    source's bitmap directory lists."""
    from ..formats.qcow2.header import AUTOCLEAR_BITMAPS, EXT_BITMAPS
    h = drv.header
    ext = h.ext(EXT_BITMAPS)
    total = dir_size = 0
    if ext is not None and len(ext) >= 24 and h.autoclear & AUTOCLEAR_BITMAPS:
        nb, _, dsize, doff = struct.unpack_from(">IIQQ", ext, 0)
        raw = os.pread(drv.fd, dsize, doff)
        pos = 0
        for _ in range(nb):
            if pos + 24 > len(raw):
                break
            _, _, _, _, gbits, name_size, extra = struct.unpack_from(">QIIBBHI", raw, pos)
            gran = 1 << gbits
            bmbytes = -(-(-(-drv.size // gran)) // 8)
            bmclusters = -(-bmbytes // cluster_size)
            total += bmclusters * cluster_size
            total += _round_up(bmclusters * 8, cluster_size)
            dir_size += _round_up(24 + name_size, 8)
            pos += _round_up(24 + extra + name_size, 8)
    return total + _round_up(dir_size, cluster_size)


def measure(out_fmt: str, opts: dict, size: int | None = None, node=None) -> dict:
    """The BlockMeasureInfo dict (``required``, ``fully-allocated`` and,
    where qemu-img has it, ``bitmaps``) for a new ``out_fmt`` image of
    ``size`` bytes or holding ``node``'s data."""
    if "size" in opts and size is None and node is None:
        size = opts["size"]
    if out_fmt == "raw":
        req = _round_up(node.size if node is not None else size or 0, 512)
        return {"required": req, "fully-allocated": req}
    cs, ext, version, order, prealloc = qcow2_params(opts)
    l2e = 16 if ext else 8
    vsize = _round_up(size or 0, cs)
    if -(-(vsize // cs) // (cs // l2e)) * L1E > MAX_L1_BYTES:
        raise UsageError("The image size is too large (try using a larger cluster size)")
    required = 0
    if node is not None:
        vsize = _round_up(node.size, cs)        # (whole sectors: a multiple of 512)
        required = vsize if opts.get("backing_file") else data_bytes(node, cs)
    if prealloc in ("full", "falloc"):
        required = vsize
    full = prealloc_size(vsize, cs, order, ext) + luks_area(opts, cs)
    out = {"required": full - vsize + required, "fully-allocated": full}
    src = node.driver if node is not None else None
    if version >= 3 and src is not None and src.format_name == "qcow2" \
            and src.header.version >= 3:
        out["bitmaps"] = bitmaps_size(src, cs)
    return out
