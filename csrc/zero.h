#ifndef BJ_ZERO_H
#define BJ_ZERO_H
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* cdef-begin */
/* 1 if buf[0..len) is all zero bytes, else 0. Any len, any alignment. */
int bj_is_zero(const void *buf, size_t len);

/* Length of the run of blocks of `block` bytes at the start of buf[0..len)
 * that are all zero (want_zero=1) or each contain a non-zero byte
 * (want_zero=0). The last block may be short. block == 0 means len. */
size_t bj_zero_run(const void *buf, size_t len, size_t block, int want_zero);

/* Make [offset, offset+length) of fd read as zeroes: punch a hole, else
 * FALLOC_FL_ZERO_RANGE, else write zeroes. may_unmap=0 skips the punch.
 * Returns 0 or -errno. z is a struct bj_zeroer (below, C only). */
struct bj_zeroer;
int bj_zero_range(struct bj_zeroer *z, int fd, uint64_t offset, uint64_t length, int may_unmap);
/* cdef-end */

/* The zeroing ladder's memory: what a file system has refused is remembered
 * here so it is never asked again. One per open target (no globals), shared
 * by the copy engine's workers: the flags are atomic (they only ever go
 * 0 -> 1, and nothing else is published with them: relaxed order).
 * fallocate: the call used for the first two rungs, fallocate(2) when NULL;
 * tests put a function here that refuses a rung. */
struct bj_zeroer {
    atomic_int no_punch;      /* FALLOC_FL_PUNCH_HOLE refused */
    atomic_int no_zero_range; /* FALLOC_FL_ZERO_RANGE refused */
    int (*fallocate)(int fd, int mode, off_t offset, off_t len);
};
/* Clear flags, the real fallocate. */
void bj_zeroer_init(struct bj_zeroer *z);

/* bj_zero_range, with the last rung (written zeroes) paced: before each
 * piece of at most `piece` bytes (0 = 1 MiB; never more than 1 MiB) it calls
 * pace(ctx, n) with the piece's size n; non-zero stops it, and the call
 * returns -ECANCELED with the range partly zeroed. The copy engine passes
 * its rate limiter and cancel here, so a large zero request on a file system
 * that zeroes by writing is throttled and cancellable like data. The
 * fallocate rungs are single metadata calls: never paced. */
int bj_zero_range_paced(struct bj_zeroer *z, int fd, uint64_t offset, uint64_t length,
                        int may_unmap, uint64_t piece, int (*pace)(void *ctx, uint64_t n),
                        void *ctx);

#endif
