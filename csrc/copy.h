#ifndef BJ_COPY_H
#define BJ_COPY_H
#include <stdint.h>
#include <stddef.h>
#include "zero.h"
#include "ratelimit.h"

/* cdef-begin */
/* A work item: copy len bytes from src_off in the source to dst_off in the
 * target (BJ_RANGE_COPY), or make [dst_off, dst_off+len) of the target read
 * as zeroes (BJ_RANGE_ZERO). BJ_RANGE_COPY_SPARSE also probes the source
 * for holes (SEEK_DATA/SEEK_HOLE, per work range) and treats them as zero. */
#define BJ_RANGE_COPY 0
#define BJ_RANGE_ZERO 1
#define BJ_RANGE_COPY_SPARSE 2
struct bj_range {
    uint64_t src_off;
    uint64_t dst_off;
    uint64_t len;
    uint32_t kind;
    int32_t src_fd;   /* source file of this item; -1 = the engine's src_fd
                         (lets one copy read the layers of a backing chain) */
};

struct bj_copy_opts {
    int src_fd;               /* default source (items may name their own) */
    int dst_fd;
    uint32_t threads;         /* worker threads, >= 1 */
    uint64_t request_size;    /* bytes per request, >= 512 */
    uint64_t max_in_flight;   /* bound on buffered bytes (threads * request) */
    uint64_t zero_block;      /* zero detection granularity; 0 = no detection */
    int target_is_zero;       /* target already reads as zero: skip zero writes */
    int may_unmap;            /* zeroes may become holes in the target */
    int allow_copy_range;     /* copy_file_range when no detection is needed */
    int write_behind;         /* start writeback of each written request at once
                                 (sync_file_range), so a final fsync has little
                                 left to do: durable copies overlap disk I/O */
    int prealloc;             /* a buffered target reading as zero: the
                                 target ranges of copy items are allocated
                                 (fallocate KEEP_SIZE) as they are queued,
                                 and zero runs found in their data are
                                 punched out again; ext4's buffered writes
                                 then skip the delayed allocation of each
                                 block (the serial part of a copy).
                                 Once those punches reach 1/32 of the bytes
                                 allocated ahead, the rest is allocated
                                 after the scan instead, without its zero
                                 runs (copy.c: late allocation) */
    struct bj_bucket *bucket; /* rate limiter or NULL */
};

/* Which side failed: */
#define BJ_SIDE_NONE 0
#define BJ_SIDE_SOURCE 1
#define BJ_SIDE_TARGET 2
struct bj_copy_status {
    uint64_t done;          /* bytes whose writes (or skips) have completed */
    uint64_t queued;        /* bytes ever queued */
    uint64_t data_bytes;    /* bytes written as data */
    uint64_t zero_bytes;    /* bytes zeroed / skipped as zero */
    int error;              /* first error, -errno, or 0 */
    int error_side;         /* BJ_SIDE_* */
    uint64_t error_offset;  /* offset in the failing file */
    uint32_t in_flight;     /* requests being processed right now */
    uint32_t throttled;     /* of which: waiting in the rate limiter */
    uint64_t requests;      /* requests completed (adjacent items merge into one) */
};

struct bj_copy;
int bj_copy_new(struct bj_copy **out, const struct bj_copy_opts *opts);
void bj_copy_free(struct bj_copy *c);
/* Queue n items (copied into the engine). An item that continues the
 * queue's last one in both files (same kind, same source file) is merged
 * into it, so it may be copied by the same request. With prealloc, the
 * target ranges of the copy items are allocated first (adjacent ones in
 * one call, runs of 256 KiB or more; a refusal is ignored: the writes
 * allocate as before). */
int bj_copy_add(struct bj_copy *c, const struct bj_range *r, size_t n);
/* Let the workers run and wait until every queued byte is done (returns 0),
 * fewer than low_water queued bytes are left unclaimed while work is still
 * in flight (returns 1: queue more and call again), timeout_ms elapsed
 * (returns 2), or an error / cancel (returns -errno, after draining; see
 * bj_copy_get_status). After 1 or 2 the workers keep going: call
 * bj_copy_drain() to stop them. Call with the GIL released (cffi does). */
int bj_copy_run(struct bj_copy *c, uint32_t timeout_ms, uint64_t low_water);
/* Stop claiming new requests and wait until nothing is in flight (used to
 * pause: between bj_copy_drain() and the next bj_copy_run() no I/O happens). */
void bj_copy_drain(struct bj_copy *c);
/* Ask the workers to stop between requests (thread-safe; any thread).
 * The next bj_copy_run() returns -ECANCELED. */
void bj_copy_cancel(struct bj_copy *c);
void bj_copy_get_status(struct bj_copy *c, struct bj_copy_status *st);
/* cdef-end */

/* Tests only: the zeroer's fallocate hook (zero.h), before the first run. */
void bj_copy_test_fallocate(struct bj_copy *c, int (*fn)(int fd, int mode, off_t offset, off_t len));
/* Tests only: fn is called by a worker after it mapped a request's source
 * range (the mapped read path), before it reads the mapping. */
void bj_copy_test_after_map(struct bj_copy *c, void (*fn)(int fd, uint64_t off, uint64_t len));

#endif
