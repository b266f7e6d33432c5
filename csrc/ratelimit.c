/* ratelimit.c: a token bucket in bytes per second.
 *
 *            rate (bytes/s) flows in
 *                   |
 *             +-----v-----+  capacity = rate * burst_s (0: no burst)
 *             |  tokens   |  (full at creation)
 *             +-----+-----+
 *                   |  take(n): tokens -= n, may go negative (debt);
 *                   v  the caller waits -tokens/rate before the I/O
 *
 * Unlike QEMU's fixed 100 ms slices (where one large request can overshoot a
 * whole slice), a caller waits exactly until its bytes have been earned.
 * The bound: a request issues once the tokens, counting its take and every
 * take before it, are back at 0 or more, and the tokens never exceed the
 * capacity. So the bytes issued in any window of length W are at most
 * capacity + rate * W + one request (the request issued first in the window
 * was earned partly before it), whatever the callers do: several threads,
 * pauses, idle time. With no burst (burst_s = 0, the default of every user
 * in blkjobs) and requests split to bj_bucket_max_request() (rate / 128
 * rounded down to 512 B, at least 4 KiB), every 1 s window -- the first one
 * too, and the one after an idle spell -- holds at most rate * (1 + 1/128),
 * within 1% of the rate, at any rate of 512 KiB/s or more (below it, one
 * 4 KiB request is more than 1% of a second's worth). A burst of B seconds
 * lets a window hold rate * (1 + B) more after idling: a deliberate choice.
 *
 * Time is passed in (now_ns), never read here except by bj_now_ns(), so tests
 * run on a virtual clock. A mutex makes take() safe from worker threads.
 * The rate is also atomic: bj_bucket_rate() and bj_bucket_max_request() read
 * it without the mutex (the copy engine asks them under its own lock, while
 * bj_bucket_set_rate() may be changing it from another thread). Relaxed
 * order: the rate is one value that publishes nothing else; the tokens and
 * the clock stay under the mutex.
 * Cost: O(1) per call, a few floating-point operations under a mutex.
 */
#include "ratelimit.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

struct bj_bucket {
    pthread_mutex_t lock;
    _Atomic uint64_t rate; /* bytes/s, 0 = unlimited; written under lock */
    double burst_s;
    double tokens;      /* may be negative: debt */
    uint64_t last_ns;   /* time of the last refill */
};

static uint64_t rate_of(const struct bj_bucket *b)
{
    return atomic_load_explicit(&b->rate, memory_order_relaxed);
}

static uint64_t max_request(uint64_t rate)
{
    if (rate == 0)
        return UINT64_MAX;
    uint64_t m = (rate / 128) & ~(uint64_t)511;
    return m < 4096 ? 4096 : m;
}

static double capacity(const struct bj_bucket *b)
{
    return (double)rate_of(b) * b->burst_s;
}

static void refill(struct bj_bucket *b, uint64_t now_ns)
{
    if (now_ns > b->last_ns) {
        b->tokens += (double)(now_ns - b->last_ns) * 1e-9 * (double)rate_of(b);
        double cap = capacity(b);
        if (b->tokens > cap)
            b->tokens = cap;
        b->last_ns = now_ns;
    }
    /* A clock that goes backwards (virtual clocks in tests) is ignored. */
}

int bj_bucket_new(struct bj_bucket **out, uint64_t rate, double burst_s, uint64_t now_ns)
{
    if (!out || !(burst_s >= 0.0) || isinf(burst_s))
        return -EINVAL;
    struct bj_bucket *b = calloc(1, sizeof(*b));
    if (!b)
        return -ENOMEM;
    int rc = pthread_mutex_init(&b->lock, NULL);
    if (rc) {
        free(b);
        return -rc;
    }
    atomic_init(&b->rate, rate);
    b->burst_s = burst_s;
    b->last_ns = now_ns;
    b->tokens = capacity(b);
    *out = b;
    return 0;
}

void bj_bucket_free(struct bj_bucket *b)
{
    if (!b)
        return;
    pthread_mutex_destroy(&b->lock);
    free(b);
}

int bj_bucket_set_rate(struct bj_bucket *b, uint64_t rate, uint64_t now_ns)
{
    if (!b)
        return -EINVAL;
    pthread_mutex_lock(&b->lock);
    refill(b, now_ns);
    atomic_store_explicit(&b->rate, rate, memory_order_relaxed);
    double cap = capacity(b);
    if (b->tokens > cap)
        b->tokens = cap;
    if (rate == 0 && b->tokens < 0)
        b->tokens = 0;          /* unlimited: forgive the debt */
    pthread_mutex_unlock(&b->lock);
    return 0;
}

uint64_t bj_bucket_rate(const struct bj_bucket *b)
{
    return b ? rate_of(b) : 0;
}

uint64_t bj_bucket_max_request(const struct bj_bucket *b)
{
    return max_request(b ? rate_of(b) : 0);
}

uint64_t bj_bucket_take(struct bj_bucket *b, uint64_t n, uint64_t now_ns)
{
    if (!b)
        return 0;
    pthread_mutex_lock(&b->lock);
    uint64_t wait = 0, rate = rate_of(b);
    if (rate != 0) {
        refill(b, now_ns);
        b->tokens -= (double)n;
        if (b->tokens < 0)
            wait = (uint64_t)ceil(-b->tokens / (double)rate * 1e9);
    }
    pthread_mutex_unlock(&b->lock);
    return wait;
}

double bj_bucket_tokens(struct bj_bucket *b, uint64_t now_ns)
{
    if (!b)
        return 0;
    pthread_mutex_lock(&b->lock);
    if (rate_of(b))
        refill(b, now_ns);
    double t = b->tokens;
    pthread_mutex_unlock(&b->lock);
    return t;
}

uint64_t bj_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}
