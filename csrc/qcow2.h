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

/* Map guest bytes [pos, end) of the range that one standard L2 table maps
 * (its entry 0 maps guest offset table_guest) into coalesced runs, written
 * as 4 uint64 each: guest start, length, kind (BJ_MAP_*: the values of
 * formats.base.Kind), host offset of the run's first byte (0: none; an
 * unallocated run, a zero run without preallocated clusters). Runs merge
 * when of one kind and, if they have host offsets, contiguous in the file.
 * Entries the fast path does not handle (those bj_qcow2_l2_runs stops at)
 * stop the walk at their cluster; so does a full buffer (max runs).
 * Returns the number of runs, *stop_out the guest offset where the walk
 * stopped (end when it is done; pos with 0 runs: the entry of the cluster
 * at pos is the caller's), or -EINVAL. */
#define BJ_MAP_DATA 0
#define BJ_MAP_ZERO 1
#define BJ_MAP_UNALLOCATED 2
long bj_qcow2_map(const uint8_t *table, size_t table_len, uint64_t table_guest,
                  uint64_t pos, uint64_t end, unsigned cluster_bits, uint64_t host_limit,
                  int v3, uint64_t *out, size_t max, uint64_t *stop_out);
/* The segments of reads of guest ranges through one standard L2 table, as
 * the NBD export's data path takes them (nbdsrv.h: 4 words each, kind, fd,
 * host offset, length): DATA clusters as BJ_QSEG_DATA_PAD on fd (bytes past
 * the end of the file read as zeroes), ZERO clusters as BJ_QSEG_ZERO, and
 * UNALLOCATED ones as BJ_QSEG_ZERO when unalloc_zero (no backing node) --
 * neighbours of one kind merged (data while contiguous in the file).
 * table: the L2 table's table_len bytes (its entry 0 maps guest offset
 * table_guest), or NULL for a table not allocated (every entry 0: its
 * range is table_len / 8 clusters). reqs: 2 words per read (guest offset,
 * length). Each read's segments follow the last one's in segs (at most
 * max_segs in all) and counts[i] gets their number; 0 for a read that is
 * the caller's: empty or outside the table's range, an entry the fast path
 * does not take (those bj_qcow2_l2_runs stops at), an unallocated cluster
 * without unalloc_zero, or no room left in segs for it. Returns the number
 * of segments written, or -EINVAL. */
#define BJ_QSEG_DATA_PAD 1
#define BJ_QSEG_ZERO 2
long bj_qcow2_read_segs(const uint8_t *table, size_t table_len, uint64_t table_guest,
                        unsigned cluster_bits, uint64_t host_limit, int v3, int unalloc_zero,
                        uint64_t fd, const uint64_t *reqs, size_t nreq, uint64_t *segs,
                        size_t max_segs, uint64_t *counts);
/* cdef-end */

#endif
