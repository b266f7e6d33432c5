#ifndef BJ_QCOW2_H
#define BJ_QCOW2_H
#include <stddef.h>
#include <stdint.h>

/* cdef-begin */
/* One run of standard (non-extended) L2 entries of the same kind. */
#define BJ_L2_UNALLOCATED 0
#define BJ_L2_ZERO 1
#define BJ_L2_DATA 2
struct bj_l2run {
    uint64_t first;   /* index of the first entry of the run */
    uint64_t count;   /* entries in the run */
    uint64_t host;    /* DATA: host offset of the first cluster (contiguous
                         for the whole run); ZERO: host offset of the first
                         preallocated zero cluster, 0 if none (not coalesced) */
    uint32_t kind;    /* BJ_L2_* */
};

/* Decode the big-endian standard L2 entries table[first .. first+n) into
 * coalesced runs. Entries the fast path does not handle — compressed,
 * reserved bits, unaligned or beyond host_limit, the zero flag in a v2
 * image — stop the walk: *stop_out gets that entry's index and the caller
 * handles it (and the rest) itself; otherwise *stop_out = first + n.
 * Returns the number of runs written (at most max), or -EINVAL/-ENOBUFS
 * (max too small: *stop_out tells where to resume). */
long bj_qcow2_l2_runs(const uint8_t *table, size_t table_len, size_t first, size_t n,
                      unsigned cluster_bits, uint64_t host_limit, int v3,
                      struct bj_l2run *out, size_t max, size_t *stop_out);
/* cdef-end */

#endif
