#ifndef BJ_IOLOOP_H
#define BJ_IOLOOP_H
#include <stdint.h>
#include <stddef.h>

/* cdef-begin */
/* One measured I/O loop over [0, size) of an open file (see ioloop.c).
 * The caller opens fd (O_DIRECT or not) and lays the file out beforehand;
 * with O_DIRECT, bs must suit the device's logical block size (buffers are
 * 4 KiB aligned). */
struct bj_ioloop_opts {
    int fd;
    uint32_t write;        /* 0 = pread, 1 = pwrite */
    uint32_t random;       /* 0 = sequential (each thread streams its own 1/threads
                              of the region), 1 = random bs-aligned offsets */
    uint32_t threads;      /* worker threads 1..256, one request in flight each */
    uint64_t bs;           /* bytes per request, 512 B .. 1 GiB */
    uint64_t size;         /* region [0, size); at least bs (the tail < bs is unused) */
    uint64_t bytes;        /* byte budget: stop after this many bytes (0 = size) */
    uint64_t runtime_ns;   /* time budget (0 = none): stop when it is over; with a
                              time budget the byte budget is unlimited unless set
                              and the sequential stream wraps at the end of the region */
    uint32_t fsync_end;    /* write: fsync(fd) after the last request, timed */
    uint64_t seed;         /* random offsets and the written pattern */
};

struct bj_ioloop_result {
    uint64_t bytes;        /* bytes whose requests completed */
    uint64_t ops;          /* requests completed */
    uint64_t elapsed_ns;   /* start .. last completion (+ fsync); so far if running */
    uint64_t fsync_ns;     /* time in the final fsync */
    int error;             /* first error, -errno, or 0 */
    uint64_t error_offset; /* offset of the failing request */
    int finished;          /* 1 once every worker stopped (and fsync ran) */
};

struct bj_ioloop;
/* Validate opts, start the workers and let them allocate and touch their
 * buffers; no I/O happens until the first bj_ioloop_run(). */
int bj_ioloop_new(struct bj_ioloop **out, const struct bj_ioloop_opts *opts);
/* Start the clock and the I/O on the first call; wait until the loop is
 * finished (returns 0), or timeout_ms elapsed (returns 2: call again), or
 * it failed / was cancelled (returns -errno, after every worker stopped).
 * Call with the GIL released (cffi does). */
int bj_ioloop_run(struct bj_ioloop *b, uint32_t timeout_ms);
/* Ask the workers to stop after their current request (thread-safe). */
void bj_ioloop_cancel(struct bj_ioloop *b);
void bj_ioloop_get_result(struct bj_ioloop *b, struct bj_ioloop_result *r);
/* Cancel, join the workers and free everything but the request buffers,
 * which the next loop of the same bs takes (ioloop.c: why). */
void bj_ioloop_free(struct bj_ioloop *b);
/* Free the buffers kept by bj_ioloop_free() (thread-safe; a loop still
 * alive keeps its own). */
void bj_ioloop_release_buffers(void);

/* Per-request latency (issue .. completion of one pread/pwrite, ns) in a
 * log-linear histogram: values below 64 ns have a bucket each; above, every
 * power-of-two range [2^k, 2^(k+1)) is cut into 64 equal buckets, so a
 * bucket is at most 1/64 (1.6%) of its values wide. Covers all of uint64. */
#define BJ_LAT_SUB_BITS 6
#define BJ_LAT_BUCKETS 3776   /* 64 + 64 * (64 - 6) */
/* The bucket of a latency of ns nanoseconds. */
uint32_t bj_lat_bucket(uint64_t ns);
/* The smallest value of bucket idx (< BJ_LAT_BUCKETS); the bucket holds
 * [bj_lat_bucket_low(idx), bj_lat_bucket_low(idx + 1)). */
uint64_t bj_lat_bucket_low(uint32_t idx);
/* The workers' histograms summed into counts[BJ_LAT_BUCKETS] (overwritten).
 * Returns 0, or -EBUSY while the loop has not finished. */
int bj_ioloop_get_latency(struct bj_ioloop *b, uint64_t *counts);
/* cdef-end */

#endif
