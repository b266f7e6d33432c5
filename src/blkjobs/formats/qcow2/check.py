"""Consistency check and repair, judged like ``qemu-img check``.

Walks every structure that occupies the file (header, active L1/L2 and data,
snapshot table and snapshot L1/L2/data, refcount table and blocks, bitmap
directory/tables/data), counts the references of every host cluster, and
compares them with the stored refcounts (docs/qcow2.md §10). Leaks: stored >
references; corruptions: stored < references, malformed entries, COPIED
flags disagreeing with refcount 1.

``repair='leaks'`` lowers leaked refcounts; ``repair='all'`` also raises too
low refcounts (allocating a missing refcount block if needed) and fixes
COPIED flags. After a repair the image is checked again and the result is
that of the re-check plus ``leaks-fixed`` / ``corruptions-fixed`` (what
``qemu-img check -r`` reports).
"""
from __future__ import annotations

import itertools
import os
import struct
from collections import Counter

from ...errors import ImageError
from .header import AUTOCLEAR_BITMAPS, EXT_BITMAPS, read_bitmap_directory

L1_RESERVED = 0x7F000000000001FF
OFFSET_MASK = 0x00FFFFFFFFFFFE00
STD_RESERVED = 0x3F000000000001FE
COPIED = 1 << 63
COMPRESSED = 1 << 62


class CheckResult(dict):
    """The ``qemu-img check --output json`` object; ``messages`` holds the
    per-cluster lines qemu-img prints on stderr."""

    messages: list


def check(img, repair: str | None = None) -> CheckResult:
    if repair not in (None, "leaks", "all"):
        raise ValueError(f"repair must be None, 'leaks' or 'all', not {repair!r}")
    if repair and img.read_only:
        raise ImageError(f"'{img.filename}': repair needs the image opened read/write")
    if not img.read_only:
        img.flush()
    res = _check(img, repair)
    if repair and (res.fixed_leaks or res.fixed_corruptions):
        img.flush()
        again = _check(img, None)
        out = again.result
        if res.fixed_leaks:
            out["leaks-fixed"] = res.fixed_leaks
        if res.fixed_corruptions:
            out["corruptions-fixed"] = res.fixed_corruptions
        out.messages = res.result.messages + again.result.messages
        return out
    return res.result


class _Walk:
    pass


def _check(img, repair):
    fd, cs, cb = img.fd, img.cluster_size, img.cb
    h = img.header
    file_size = os.fstat(fd).st_size
    nfile = -(-file_size // cs)
    refs: Counter = Counter()
    msgs: list = []
    corrupt = 0
    check_errors = 0
    allocated = fragmented = compressed = 0
    esz = 16 if img.extended else 8
    l2e = img.l2e
    copied_checks = []     # (kind, where, entry, host_cluster)

    def ref_range(off, nbytes):
        """Count a reference to [off, off+nbytes). Like qemu-img, a region
        ending a cluster or more past the end of the file is a corruption
        and is not counted (so hostile offsets cannot grow ``refs``)."""
        nonlocal corrupt
        if nbytes <= 0:
            return
        if off + nbytes - file_size >= cs:
            msgs.append("ERROR: counting reference for region exceeding the end of the file "
                        f"by one cluster or more: offset 0x{off:x} size 0x{nbytes:x}")
            corrupt += 1
            return
        for c in range(off >> cb, ((off + nbytes - 1) >> cb) + 1):
            refs[c] += 1

    def pread(off, n):
        if off < 0 or n < 0 or off + n > file_size:
            return None
        d = os.pread(fd, n, off)
        return d if len(d) == n else None

    def walk_l1(l1_off, l1_size, active):
        nonlocal corrupt, allocated, fragmented, compressed
        ref_range(l1_off, l1_size * 8)
        raw = pread(l1_off, l1_size * 8)
        if raw is None:
            msgs.append(f"ERROR L1 table at 0x{l1_off:x} beyond the end of the file")
            corrupt += 1
            return
        l1 = struct.unpack(f">{l1_size}Q", raw)
        nxt = 0
        for i, e in enumerate(l1):
            off = e & OFFSET_MASK
            if e & L1_RESERVED:
                msgs.append(f"ERROR L1 entry {i} has reserved bits set: 0x{e:x}")
                corrupt += 1
                continue
            if not off:
                continue
            if off % cs:
                msgs.append(f"ERROR l2_offset={off:x}: Table is not cluster aligned; "
                            "L1 entry corrupted")
                corrupt += 1
                continue
            ref_range(off, cs)
            if active:
                copied_checks.append(("L2", i, e, off >> cb, None))
            if active and img.l2cache.get(off) is not None:
                t = bytes(img.l2cache[off])
            else:
                t = pread(off, cs)
            if t is None:
                msgs.append(f"ERROR L2 table at 0x{off:x} beyond the end of the file")
                corrupt += 1
                continue
            vals = struct.unpack(f">{cs // 8}Q", t)
            for j in range(l2e):
                le = vals[j * esz // 8]
                bm = vals[j * 2 + 1] if img.extended else 0
                if le == 0 and bm == 0:
                    continue
                if le & COMPRESSED:
                    if le & COPIED:
                        msgs.append(f"ERROR: coffset=0x{le & img._coff_mask:x}: copied flag "
                                    "must never be set for compressed clusters")
                        corrupt += 1
                    if bm:
                        msgs.append("ERROR compressed cluster with a subcluster bitmap")
                        corrupt += 1
                    coff = le & img._coff_mask
                    nsec = (le >> (62 - img._csec_bits)) & ((1 << img._csec_bits) - 1)
                    ref_range(coff, (nsec + 1) * 512 - (coff & 511))
                    if active:
                        allocated += 1
                        compressed += 1
                        fragmented += 1
                    continue
                if le & STD_RESERVED or (img.extended and le & 1):
                    msgs.append(f"ERROR L2 entry has reserved bits set: 0x{le:x}")
                    corrupt += 1
                    continue
                if img.extended and (bm & 0xFFFFFFFF) & (bm >> 32):
                    msgs.append(f"ERROR subcluster both allocated and zero: bitmap 0x{bm:x}")
                    corrupt += 1
                hoff = le & OFFSET_MASK
                if img.extended and (bm & 0xFFFFFFFF) and not hoff:
                    msgs.append("ERROR unallocated cluster with allocated subclusters")
                    corrupt += 1
                if not hoff:
                    continue
                if hoff % cs:
                    msgs.append(f"ERROR offset={hoff:x}: Data cluster is not properly aligned; "
                                "L2 entry corrupted.")
                    corrupt += 1
                    continue
                ref_range(hoff, cs)
                if active:
                    allocated += 1
                    if nxt and hoff != nxt:
                        fragmented += 1
                    nxt = hoff + cs
                    copied_checks.append(("data", (off, j), le, hoff >> cb, None))

    # header
    refs[0] += 1
    # active L1 (in memory when open read/write: use that)
    if not img.read_only:
        img.flush()
    walk_l1(h.l1_table_offset, h.l1_size, True)
    # snapshots
    if h.nb_snapshots:
        pos = h.snapshots_offset
        for _ in range(h.nb_snapshots):
            hd = pread(pos, 40)
            if hd is None:
                msgs.append("ERROR snapshot table beyond the end of the file")
                corrupt += 1
                break
            s_l1, s_l1n, idl, nml, _, _, _, _, extra = struct.unpack(">QIHHIIQII", hd)
            if s_l1 % cs or s_l1n * 8 > (32 << 20):
                msgs.append(f"ERROR snapshot L1 table at 0x{s_l1:x} is invalid")
                corrupt += 1
            else:
                walk_l1(s_l1, s_l1n, False)
            ln = 40 + extra + idl + nml
            pos += ln + (-ln % 8)
        ref_range(h.snapshots_offset, pos - h.snapshots_offset)
    # refcount structures
    rc = img._rc()
    ref_range(h.refcount_table_offset, h.refcount_table_clusters * cs)
    for t, e in enumerate(rc.table):
        if not e:
            continue
        off = e & 0xFFFFFFFFFFFFFE00
        if e & 0x1FF or off % cs:
            msgs.append(f"ERROR refcount block {t} is not cluster aligned; refcount table corrupted")
            corrupt += 1
            continue
        if off >= file_size and t not in rc.blocks:
            msgs.append(f"ERROR refcount block {t} is outside image")
            corrupt += 1
            continue
        ref_range(off, cs)
    # bitmaps: the directory and its entries were validated (and bounded) at
    # open; each table is at most BME_MAX_PHYS_SIZE / cluster_size entries
    bext = h.ext(EXT_BITMAPS)
    if bext is not None and h.autoclear & AUTOCLEAR_BITMAPS:
        _, _, dsize, doff = struct.unpack(">IIQQ", bext)
        ref_range(doff, dsize)
        for bm in read_bitmap_directory(fd, h, file_size, img.filename):
            ref_range(bm.table_offset, bm.table_size * 8)
            tab = pread(bm.table_offset, bm.table_size * 8)
            if tab is None:
                continue
            for i, (be,) in enumerate(struct.iter_unpack(">Q", tab)):
                if be & 0xFF000000000001FE or (be & OFFSET_MASK and (be & 1 or
                                                                   (be & OFFSET_MASK) % cs)):
                    msgs.append(f"ERROR bitmap table entry {i} of bitmap '{bm.name}' "
                                f"is corrupt: 0x{be:x}")
                    corrupt += 1
                elif be & OFFSET_MASK:
                    ref_range(be & OFFSET_MASK, cs)

    # compare
    leaks = 0
    fixed_leaks = fixed_corr = 0
    hi = max([nfile] + [c + 1 for c in refs])
    end_cluster = 0
    bad_rc_blocks = set()

    def stored(c):
        try:
            return rc.get(c)
        except ImageError:
            bad_rc_blocks.add(c // rc.rbe)
            return 0

    extra = sorted(c for c in refs if c >= nfile)
    for c in itertools.chain(range(nfile), extra):
        s = stored(c)
        r = refs.get(c, 0)
        if s or r:
            end_cluster = max(end_cluster, c + 1)
        if s == r:
            continue
        if s > r:
            leaks += 1
            msgs.append(f"{'Repairing' if repair else 'Leaked'} cluster {c} refcount={s} reference={r}")
            if repair:
                rc._set(c, r)
                fixed_leaks += 1
        else:
            corrupt += 1
            msgs.append(f"{'Repairing' if repair == 'all' else 'ERROR'} cluster {c} "
                        f"refcount={s} reference={r}")
            if repair == "all":
                rc._ensure_block(c)
                rc._set(c, r)
                fixed_corr += 1
    del hi
    # COPIED flags (against the stored refcount, after any repair above)
    for kind, where, e, c, _ in copied_checks:
        want = stored(c) == 1
        if bool(e & COPIED) == want:
            continue
        corrupt += 1
        if kind == "L2":
            msgs.append(f"ERROR OFLAG_COPIED L2 cluster: l1_index={where} l1_entry={e:x} "
                        f"refcount={stored(c)}")
            if repair == "all":
                img.l1[where] = (e | COPIED) if want else (e & ~COPIED)
                img.l1_dirty = True
                fixed_corr += 1
        else:
            msgs.append(f"ERROR OFLAG_COPIED data cluster: l2_entry={e:x} refcount={stored(c)}")
            if repair == "all":
                l2off, j = where
                t = img._l2(l2off)
                ne = (e | COPIED) if want else (e & ~COPIED)
                struct.pack_into(">Q", t, j * esz, ne)
                img.l2dirty.add(l2off)
                fixed_corr += 1
    out = CheckResult()
    out.messages = msgs
    out["filename"] = img.filename
    out["format"] = "qcow2"
    out["check-errors"] = check_errors
    out["image-end-offset"] = end_cluster * cs
    if corrupt:
        out["corruptions"] = corrupt
    if leaks:
        out["leaks"] = leaks
    out["total-clusters"] = -(-h.size // cs)
    if allocated:
        out["allocated-clusters"] = allocated
    if fragmented:
        out["fragmented-clusters"] = fragmented
    if compressed:
        out["compressed-clusters"] = compressed
    w = _Walk()
    w.result, w.fixed_leaks, w.fixed_corruptions = out, fixed_leaks, fixed_corr
    return w
