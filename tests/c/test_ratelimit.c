/* Tests of csrc/ratelimit.c, the token bucket, on a virtual clock (every
 * call takes the time): the arithmetic of its opening comment, the 1% bound
 * over any 1 s window when callers split to bj_bucket_max_request(), rate
 * changes, a clock going backwards, bad arguments, and threads taking and
 * changing the rate at once (for the TSan build). */
#include "check.h"
#include "ratelimit.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>

#define S 1000000000ull /* ns per second */

static struct bj_bucket *mk(uint64_t rate, double burst, uint64_t now)
{
    struct bj_bucket *b = NULL;
    CHECK_EQ(bj_bucket_new(&b, rate, burst, now), 0);
    CHECK(b != NULL);
    return b;
}

static void test_arithmetic(void)
{
    struct bj_bucket *b = mk(1000000, 1.0, 5 * S); /* 1 MB/s, 1 s of burst */
    CHECK_EQ(bj_bucket_rate(b), 1000000);
    CHECK(bj_bucket_tokens(b, 5 * S) == 1000000.0);       /* full at creation */
    CHECK_EQ(bj_bucket_take(b, 1000000, 5 * S), 0);        /* the burst: go now */
    CHECK_EQ(bj_bucket_take(b, 500000, 5 * S), S / 2);     /* 0.5 s of debt */
    CHECK(bj_bucket_tokens(b, 5 * S) == -500000.0);
    CHECK(bj_bucket_tokens(b, 5 * S + S / 4) == -250000.0); /* refills at the rate */
    CHECK_EQ(bj_bucket_take(b, 0, 5 * S + S / 2), 0);      /* debt paid */
    CHECK(bj_bucket_tokens(b, 100 * S) == 1000000.0);      /* capped at capacity */
    /* the wait is rounded up to a whole ns: 1 byte at 3 B/s is 333333333.3 ns */
    struct bj_bucket *c = mk(3, 0.0, 0);
    CHECK(bj_bucket_tokens(c, 0) == 0.0); /* no burst: starts empty */
    CHECK_EQ(bj_bucket_take(c, 1, 0), 333333334);
    bj_bucket_free(c);
    bj_bucket_free(b);
}

static void test_clock_backwards(void)
{
    struct bj_bucket *b = mk(10000, 1.0, 10 * S);
    CHECK_EQ(bj_bucket_take(b, 20000, 10 * S), S); /* 10000 B of debt: 1 s */
    /* an earlier time changes nothing: no refill, the same debt */
    CHECK(bj_bucket_tokens(b, 3 * S) == -10000.0);
    CHECK_EQ(bj_bucket_take(b, 0, 3 * S), S);
    CHECK(bj_bucket_tokens(b, 10 * S + S / 2) == -5000.0);
    bj_bucket_free(b);
}

static void test_set_rate(void)
{
    struct bj_bucket *b = mk(1000000, 2.0, 0); /* capacity 2 MB */
    CHECK_EQ(bj_bucket_take(b, 2500000, 0), S / 2); /* 0.5 MB of debt */
    /* the time up to now refills at the old rate, then the new one counts */
    CHECK_EQ(bj_bucket_set_rate(b, 100000, S / 4), 0); /* debt 250000 left */
    CHECK(bj_bucket_tokens(b, S / 4) == -250000.0);
    CHECK_EQ(bj_bucket_take(b, 0, S / 4), 5 * S / 2); /* 250000 B at 100 kB/s */
    CHECK_EQ(bj_bucket_rate(b), 100000);
    /* a lower rate shrinks the capacity (burst stays 2 s): full tokens are cut */
    CHECK(bj_bucket_tokens(b, 100 * S) == 200000.0);
    CHECK_EQ(bj_bucket_set_rate(b, 10000, 100 * S), 0);
    CHECK(bj_bucket_tokens(b, 100 * S) == 20000.0);
    /* unlimited: the debt is forgiven, nothing waits, tokens do not move */
    CHECK_EQ(bj_bucket_take(b, 1000000, 100 * S), 98 * S);
    CHECK_EQ(bj_bucket_set_rate(b, 0, 100 * S), 0);
    CHECK(bj_bucket_tokens(b, 100 * S) == 0.0);
    CHECK_EQ(bj_bucket_take(b, 1ull << 40, 100 * S), 0);
    CHECK(bj_bucket_tokens(b, 200 * S) == 0.0);
    CHECK_EQ(bj_bucket_max_request(b), UINT64_MAX);
    /* limited again: it refills from 0 */
    CHECK_EQ(bj_bucket_set_rate(b, 1000, 200 * S), 0);
    CHECK(bj_bucket_tokens(b, 201 * S) == 1000.0);
    bj_bucket_free(b);
}

static void test_max_request(void)
{
    struct { uint64_t rate, want; } cases[] = {
        { 0, UINT64_MAX },
        { 1, 4096 },                        /* at least 4 KiB */
        { 128 * 4096 - 1, 4096 },
        { 128 * 4608, 4608 },               /* rate/128, a multiple of 512 */
        { 128 * 4608 + 127 * 128, 4608 },
        { 128 * 5000, 4608 },               /* rounded down to 512 */
        { 100 << 20, (100 << 20) / 128 },
        { UINT64_MAX, (UINT64_MAX / 128) & ~(uint64_t)511 },
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        struct bj_bucket *b = mk(cases[i].rate, 1.0, 0);
        CHECK(bj_bucket_max_request(b) == cases[i].want);
        bj_bucket_free(b);
    }
}

/* One caller issuing max_request-sized I/O as fast as the bucket lets it,
 * on the virtual clock: after the initial burst, every 1 s window holds
 * within 1% of rate bytes. */
static void test_one_percent(void)
{
    uint64_t rates[] = { 4096, 1000000, 10ull << 20, 300ull << 20 };
    for (size_t k = 0; k < sizeof rates / sizeof *rates; k++) {
        uint64_t rate = rates[k];
        struct bj_bucket *b = mk(rate, 0.5, 0);
        uint64_t req = bj_bucket_max_request(b), now = 0;
        enum { N = 6000 };
        static uint64_t at[N];
        size_t n = 0;
        while (n < N && now < 10 * S) {
            now += bj_bucket_take(b, req, now); /* wait as told, then issue */
            at[n++] = now;
        }
        /* windows [at[i], at[i] + 1 s) starting after the burst is spent */
        size_t checked = 0, j = 0;
        for (size_t i = 0; i < n; i++) {
            if (at[i] < S || at[i] + S > now)
                continue;
            while (j < n && at[j] < at[i] + S)
                j++;
            double bytes = (double)(j - i) * (double)req;
            CHECK(bytes <= 1.01 * (double)rate);
            CHECK(bytes >= 0.99 * (double)rate);
            checked++;
        }
        CHECK(checked > 0);
        bj_bucket_free(b);
    }
}

/* The honest limit: with no burst, EVERY 1 s window holds at most 1% over
 * the rate -- the first second, the second after an idle spell, with several
 * takers of random sizes (up to max_request) each busy a random time with its
 * I/O. Simulated on the virtual clock: each taker takes when it is free, waits
 * as told, issues, then is busy; now and then all of them idle 2 s (a sparse
 * stretch of the image). The heaviest window starts at an issue time. */
struct issue { uint64_t at, n; };
static uint64_t lcg(uint64_t *s)
{
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return *s >> 33;
}

static double worst_window(const struct issue *is, size_t n)
{
    double worst = 0, sum = 0;
    size_t j = 0;
    for (size_t i = 0; i < n; i++) { /* windows [is[i].at, is[i].at + 1 s) */
        while (j < n && is[j].at < is[i].at + S)
            sum += (double)is[j++].n;
        if (sum > worst)
            worst = sum;
        sum -= (double)is[i].n;
    }
    return worst;
}

static void test_every_window(void)
{
    uint64_t rates[] = { 4096, 512 << 10, 1000000, 200ull << 20, 1ull << 30 };
    enum { TK = 4, N = 20000 };
    static struct issue is[N];
    for (size_t k = 0; k < sizeof rates / sizeof *rates; k++) {
        uint64_t rate = rates[k], seed = 42 + k;
        struct bj_bucket *b = mk(rate, 0.0, 7 * S);
        uint64_t req = bj_bucket_max_request(b), free_at[TK];
        for (int t = 0; t < TK; t++)
            free_at[t] = 7 * S;
        size_t n = 0;
        while (n < N) {
            int t = 0; /* the taker free first takes next */
            for (int u = 1; u < TK; u++)
                if (free_at[u] < free_at[t])
                    t = u;
            uint64_t now = free_at[t], len = 512 + lcg(&seed) % (req - 511);
            uint64_t at = now + bj_bucket_take(b, len, now);
            is[n].at = at;
            is[n++].n = len;
            free_at[t] = at + lcg(&seed) % (req * S / rate / 2 + 1); /* its I/O */
            if (n % 3000 == 0) /* everybody idles 2 s */
                for (int u = 0; u < TK; u++)
                    free_at[u] = at + 2 * S;
        }
        /* sorted by issue time (the takes come in time order, waits grow) */
        for (size_t i = 1; i < n; i++)
            CHECK(is[i].at >= is[i - 1].at);
        double worst = worst_window(is, n);
        CHECK(worst <= (double)rate + (double)req); /* the bound of ratelimit.c */
        if (rate >= 512 << 10) /* a 4 KiB request is <= 1/128 s of it */
            CHECK(worst <= 1.01 * (double)rate);
        CHECK(worst >= 0.98 * (double)rate);        /* and the rate is used */
        /* the first second from creation */
        double first = 0;
        for (size_t i = 0; i < n && is[i].at < 8 * S; i++)
            first += (double)is[i].n;
        CHECK(first <= (double)rate + (double)req);
        if (rate >= 512 << 10)
            CHECK(first <= 1.01 * (double)rate);
        bj_bucket_free(b);
    }
    /* a burst of B s is what it says: after idling, one window carries
     * rate * (1 + B), not more */
    struct bj_bucket *b = mk(1000000, 2.0, 0);
    uint64_t now = 0, got = 0, req = bj_bucket_max_request(b);
    while (now < S) {
        uint64_t at = now + bj_bucket_take(b, req, now);
        if (at >= S)
            break;
        got += req;
        now = at;
    }
    CHECK(got <= 3000000 && got >= 2990000);
    bj_bucket_free(b);
}

static void test_bad_args(void)
{
    struct bj_bucket *b = (struct bj_bucket *)&b; /* must stay untouched */
    CHECK_EQ(bj_bucket_new(NULL, 1, 1.0, 0), -EINVAL);
    CHECK_EQ(bj_bucket_new(&b, 1, -1.0, 0), -EINVAL);
    CHECK_EQ(bj_bucket_new(&b, 1, NAN, 0), -EINVAL);
    CHECK_EQ(bj_bucket_new(&b, 1, INFINITY, 0), -EINVAL);
    CHECK(b == (struct bj_bucket *)&b);
    CHECK_EQ(bj_bucket_set_rate(NULL, 1, 0), -EINVAL);
    CHECK_EQ(bj_bucket_rate(NULL), 0);
    CHECK(bj_bucket_max_request(NULL) == UINT64_MAX);
    CHECK_EQ(bj_bucket_take(NULL, 1, 0), 0);
    CHECK(bj_bucket_tokens(NULL, 0) == 0.0);
    bj_bucket_free(NULL);
    /* a huge rate and burst do not overflow into nonsense */
    b = mk(UINT64_MAX, 1e6, 0);
    CHECK_EQ(bj_bucket_take(b, UINT64_MAX, 0), 0);
    bj_bucket_free(b);
    CHECK(bj_now_ns() > 0);
}

/* Takers and a rate changer at once: every byte taken is accounted. */
#define TAKERS 4
#define TAKES 2000
static void *taker(void *arg)
{
    struct bj_bucket *b = arg;
    for (int i = 0; i < TAKES; i++) {
        (void)bj_bucket_take(b, 100, 0);
        CHECK(bj_bucket_max_request(b) >= 4096);
        CHECK(bj_bucket_rate(b) >= 1000000);
    }
    return NULL;
}

static void *changer(void *arg)
{
    struct bj_bucket *b = arg;
    for (int i = 0; i < TAKES; i++)
        CHECK_EQ(bj_bucket_set_rate(b, 1000000 + (uint64_t)(i % 7) * 1000000, 0), 0);
    return NULL;
}

static void test_threads(void)
{
    struct bj_bucket *b = mk(1000000, 1.0, 0); /* time stands still at 0 */
    pthread_t th[TAKERS + 1];
    for (int i = 0; i < TAKERS; i++)
        CHECK_EQ(pthread_create(&th[i], NULL, taker, b), 0);
    CHECK_EQ(pthread_create(&th[TAKERS], NULL, changer, b), 0);
    for (int i = 0; i <= TAKERS; i++)
        CHECK_EQ(pthread_join(th[i], NULL), 0);
    /* no refill at a standing clock; rate changes only cap at capacity
     * (>= 1 MB), which the debt never reaches */
    CHECK(bj_bucket_tokens(b, 0) == 1000000.0 - (double)TAKERS * TAKES * 100);
    bj_bucket_free(b);
}

int main(void)
{
    test_arithmetic();
    test_clock_backwards();
    test_set_rate();
    test_max_request();
    test_one_percent();
    test_every_window();
    test_bad_args();
    test_threads();
    printf("test_ratelimit: ok\n");
    return 0;
}
