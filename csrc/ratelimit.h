#ifndef BJ_RATELIMIT_H
#define BJ_RATELIMIT_H
#include <stdint.h>
#include <stddef.h>

/* cdef-begin */
struct bj_bucket;

/* A token bucket of `rate` bytes/s (0 = unlimited) holding at most
 * rate*burst_s bytes, full at creation (time now_ns). With burst_s = 0 and
 * requests of at most bj_bucket_max_request(), ANY 1 s window, the first
 * one included, is granted at most rate * (1 + 1/128) bytes (ratelimit.c).
 * Returns 0 or -errno. */
int bj_bucket_new(struct bj_bucket **out, uint64_t rate, double burst_s, uint64_t now_ns);
void bj_bucket_free(struct bj_bucket *b);
/* Change the rate (and keep the burst in seconds) at time now_ns. */
int bj_bucket_set_rate(struct bj_bucket *b, uint64_t rate, uint64_t now_ns);
uint64_t bj_bucket_rate(const struct bj_bucket *b);
/* The largest request the caller should issue at once so that the achieved
 * rate stays within 1% of the set rate over any 1 s window (requests larger
 * than this are split by the caller). Unlimited: UINT64_MAX. */
uint64_t bj_bucket_max_request(const struct bj_bucket *b);
/* Take n bytes at time now_ns (may go into debt) and return how many ns the
 * caller must wait before issuing the I/O (0 = go now). Thread-safe. */
uint64_t bj_bucket_take(struct bj_bucket *b, uint64_t n, uint64_t now_ns);
/* Tokens available at now_ns (negative = debt), for tests and status. */
double bj_bucket_tokens(struct bj_bucket *b, uint64_t now_ns);
/* Monotonic clock in ns (CLOCK_MONOTONIC). */
uint64_t bj_now_ns(void);
/* cdef-end */

#endif
