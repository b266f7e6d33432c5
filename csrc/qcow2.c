/* qcow2.c: the qcow2 metadata hot loop — turning L2 tables into runs.
 *
 * Mapping a 4 GiB image with 64 KiB clusters walks 65536 L2 entries per
 * layer; in Python that costs ~1 us an entry, about the time the whole copy
 * takes. Here each 8-byte big-endian entry is decoded and classified
 * (unallocated / zero / data) and consecutive entries of one kind are merged
 * into a run (data only while the host clusters are contiguous), so Python
 * handles a few runs instead of every entry.
 *
 * Only the common, well-formed case is decoded: anything unusual (compressed
 * clusters, reserved bits, an unaligned or out-of-file host offset, the zero
 * flag in a version 2 image) stops the walk at that entry, and the caller's
 * full Python path validates and reports it. So this loop never has to
 * produce an error message, and a corrupt image gets exactly the same
 * diagnostics as before.
 *
 * Cost: one pass over n entries, no allocation. Worked example (64 KiB
 * clusters): entries [0x8000000000050000, 0x8000000000060000, 0, 1] give
 * runs {first 0, count 2, DATA, host 0x50000}, {2, 1, UNALLOCATED},
 * {3, 1, ZERO, host 0}.
 */
#include "qcow2.h"

#include <errno.h>

#define L2_OFFSET_MASK 0x00FFFFFFFFFFFE00ull
#define L2_RESERVED 0x3F000000000001FEull
#define L2_COMPRESSED (1ull << 62)
#define L2_ZERO 1ull

static uint64_t be64(const uint8_t *p)
{
    return ((uint64_t)p[0] << 56) | ((uint64_t)p[1] << 48) | ((uint64_t)p[2] << 40) |
           ((uint64_t)p[3] << 32) | ((uint64_t)p[4] << 24) | ((uint64_t)p[5] << 16) |
           ((uint64_t)p[6] << 8) | (uint64_t)p[7];
}

/* One standard L2 entry: its BJ_L2_* kind and host offset, or -1 where the
 * caller's Python path takes over (compressed, reserved bits, an unaligned
 * or out-of-file host offset, the zero flag in a version 2 image). */
static int l2_entry(uint64_t e, uint64_t cs, uint64_t host_limit, int v3, uint64_t *host_out)
{
    uint64_t host = e & L2_OFFSET_MASK;
    if ((e & (L2_COMPRESSED | L2_RESERVED)) || (host & (cs - 1)) ||
        (host && (host >= host_limit || cs > host_limit - host)))
        return -1;
    *host_out = host;
    if (e & L2_ZERO)
        return v3 ? BJ_L2_ZERO : -1;
    return host ? BJ_L2_DATA : BJ_L2_UNALLOCATED;
}

long bj_qcow2_l2_runs(const uint8_t *table, size_t table_len, size_t first, size_t n,
                      unsigned cluster_bits, uint64_t host_limit, int v3,
                      struct bj_l2run *out, size_t max, size_t *stop_out)
{
    if (!table || !out || !stop_out || cluster_bits < 9 || cluster_bits > 30 ||
        first > table_len / 8 || n > table_len / 8 - first)
        return -EINVAL;
    uint64_t cs = 1ull << cluster_bits;
    size_t nr = 0;
    *stop_out = first;
    for (size_t i = first; i < first + n; i++) {
        uint64_t host = 0;
        int k = l2_entry(be64(table + 8 * i), cs, host_limit, v3, &host);
        if (k < 0)
            break;
        uint32_t kind = (uint32_t)k;
        if (nr > 0) {
            struct bj_l2run *p = &out[nr - 1];
            int same = p->kind == kind &&
                       (kind == BJ_L2_UNALLOCATED ||
                        (kind == BJ_L2_DATA && p->host + p->count * cs == host) ||
                        (kind == BJ_L2_ZERO && p->host == 0 && host == 0));
            if (same) {
                p->count++;
                *stop_out = i + 1;
                continue;
            }
        }
        if (nr == max)
            return -ENOBUFS;
        out[nr].first = i;
        out[nr].count = 1;
        out[nr].host = host;
        out[nr].kind = kind;
        nr++;
        *stop_out = i + 1;
    }
    return (long)nr;
}

/* bj_qcow2_map: the whole of a guest range's mapping through one L2 table,
 * in guest bytes (a read's or a copy's runs), so that Python handles one
 * call and a flat array per table instead of a call per entry or per run.
 * Worked example (64 KiB clusters, table_guest 0): entries
 * [0x8000000000050000, 0x8000000000060000, 0, 1] and [pos, end) =
 * [0x8000, 0x38000) give (0x8000, 0x18000, DATA, 0x58000),
 * (0x20000, 0x10000, UNALLOCATED, 0), (0x30000, 0x8000, ZERO, 0). */
long bj_qcow2_map(const uint8_t *table, size_t table_len, uint64_t table_guest,
                  uint64_t pos, uint64_t end, unsigned cluster_bits, uint64_t host_limit,
                  int v3, uint64_t *out, size_t max, uint64_t *stop_out)
{
    if (!table || !out || !stop_out || cluster_bits < 9 || cluster_bits > 30 ||
        table_len % 8 || pos > end || pos < table_guest)
        return -EINVAL;
    uint64_t cs = 1ull << cluster_bits;
    uint64_t nent = table_len / 8;
    /* [pos, end) inside the table's range (no overflow: nent << bits < 2^58) */
    if (nent > (UINT64_MAX >> cluster_bits) || table_guest > UINT64_MAX - (nent << cluster_bits) ||
        end > table_guest + (nent << cluster_bits))
        return -EINVAL;
    size_t nr = 0;
    *stop_out = pos;
    while (pos < end) {
        uint64_t i = (pos - table_guest) >> cluster_bits;
        uint64_t cstart = table_guest + (i << cluster_bits);
        uint64_t cend = cstart + cs < end ? cstart + cs : end;
        static const uint64_t map_kind[] = {[BJ_L2_UNALLOCATED] = BJ_MAP_UNALLOCATED,
                                            [BJ_L2_ZERO] = BJ_MAP_ZERO,
                                            [BJ_L2_DATA] = BJ_MAP_DATA};
        uint64_t host = 0;
        int k = l2_entry(be64(table + 8 * i), cs, host_limit, v3, &host);
        if (k < 0)
            break;
        uint64_t kind = map_kind[k];
        uint64_t h = host ? host + (pos - cstart) : 0;
        uint64_t n = cend - pos;
        uint64_t *p = nr ? out + 4 * (nr - 1) : NULL;
        if (p && p[2] == kind && p[0] + p[1] == pos &&
            ((h == 0 && p[3] == 0) || (h != 0 && p[3] != 0 && p[3] + p[1] == h))) {
            p[1] += n;
        } else {
            if (nr == max)
                break;
            p = out + 4 * nr++;
            p[0] = pos;
            p[1] = n;
            p[2] = kind;
            p[3] = h;
        }
        pos = cend;
        *stop_out = pos;
    }
    return (long)nr;
}

/* bj_qcow2_read_segs: what the NBD export's reads of a qcow2 image without
 * anything unusual cost in Python was a run at a time (the mapping, the
 * segments, cutting a group of reads apart, a flat list for the session);
 * here each read's segments are written straight into the array the session
 * takes. A read whose range holds anything else is left whole to the
 * caller (counts 0), whose Python path classifies and diagnoses it as
 * before. Worked example (64 KiB clusters, table_guest 0, fd 7, unalloc_zero):
 * entries [0x8000000000050000, 0, 1, 0x8000000000070000], the reads
 * (0x8000, 0x20000) and (0x30000, 0x10000) give counts [2, 1] and the
 * segments (DATA_PAD, 7, 0x58000, 0x8000), (ZERO, 0, 0, 0x18000),
 * (DATA_PAD, 7, 0x70000, 0x10000). */
long bj_qcow2_read_segs(const uint8_t *table, size_t table_len, uint64_t table_guest,
                        unsigned cluster_bits, uint64_t host_limit, int v3, int unalloc_zero,
                        uint64_t fd, const uint64_t *reqs, size_t nreq, uint64_t *segs,
                        size_t max_segs, uint64_t *counts)
{
    if ((nreq && (!reqs || !counts)) || (max_segs && !segs) || cluster_bits < 9 ||
        cluster_bits > 30 || table_len % 8)
        return -EINVAL;
    uint64_t cs = 1ull << cluster_bits;
    uint64_t nent = table_len / 8;
    if (nent > (UINT64_MAX >> cluster_bits) || table_guest > UINT64_MAX - (nent << cluster_bits))
        return -EINVAL;
    uint64_t table_end = table_guest + (nent << cluster_bits);
    size_t used = 0;
    for (size_t r = 0; r < nreq; r++) {
        uint64_t pos = reqs[2 * r], len = reqs[2 * r + 1];
        size_t first = used;
        int ok = len && pos >= table_guest && pos <= table_end && len <= table_end - pos;
        uint64_t end = ok ? pos + len : pos;
        while (ok && pos < end) {
            uint64_t i = (pos - table_guest) >> cluster_bits;
            uint64_t cstart = table_guest + (i << cluster_bits);
            uint64_t cend = cstart + cs < end ? cstart + cs : end;
            uint64_t host = 0;
            int k = table ? l2_entry(be64(table + 8 * i), cs, host_limit, v3, &host)
                          : BJ_L2_UNALLOCATED;
            if (k < 0 || (k == BJ_L2_UNALLOCATED && !unalloc_zero)) {
                ok = 0;
                break;
            }
            uint64_t kind = k == BJ_L2_DATA ? BJ_QSEG_DATA_PAD : BJ_QSEG_ZERO;
            uint64_t h = k == BJ_L2_DATA ? host + (pos - cstart) : 0;
            uint64_t n = cend - pos;
            uint64_t *p = used > first ? segs + 4 * (used - 1) : NULL;
            if (p && p[0] == kind && (kind == BJ_QSEG_ZERO || p[2] + p[3] == h)) {
                p[3] += n;
            } else if (used == max_segs) {
                ok = 0;
                break;
            } else {
                p = segs + 4 * used++;
                p[0] = kind;
                p[1] = kind == BJ_QSEG_ZERO ? 0 : fd;
                p[2] = h;
                p[3] = n;
            }
            pos = cend;
        }
        if (!ok)
            used = first;
        counts[r] = used - first;
    }
    return (long)used;
}
