/* Tests of the latency histogram of csrc/ioloop.c: the bucket arithmetic
 * (every value lands in the bucket whose bounds hold it, buckets are
 * contiguous and at most 1/64 of their values wide, all of uint64 fits),
 * and a real loop of 2 threads on a temporary file, whose merged histogram
 * counts exactly the requests it did. */
#include "check.h"
#include "ioloop.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

static void check_value(uint64_t v)
{
    uint32_t i = bj_lat_bucket(v);
    CHECK(i < BJ_LAT_BUCKETS);
    uint64_t lo = bj_lat_bucket_low(i), hi = bj_lat_bucket_low(i + 1);
    CHECK(lo <= v);
    CHECK(i + 1 == BJ_LAT_BUCKETS || v < hi);
    if (i + 1 < BJ_LAT_BUCKETS)
        CHECK((hi - lo) * 64 <= (lo > 64 ? lo : 64)); /* relative width <= 1/64 */
}

static void test_buckets(void)
{
    for (uint64_t v = 0; v < 1u << 20; v++)
        check_value(v);
    for (int k = 20; k < 64; k++)
        for (int d = -3; d <= 3; d++)
            check_value((1ull << k) + (uint64_t)(int64_t)d);
    check_value(UINT64_MAX);
    CHECK_EQ(bj_lat_bucket(UINT64_MAX), BJ_LAT_BUCKETS - 1);
    CHECK_EQ(bj_lat_bucket(63), 63);
    CHECK_EQ(bj_lat_bucket(64), 64);
    CHECK_EQ(bj_lat_bucket(128), 128);   /* [128, 130): width 2 from here */
    CHECK_EQ(bj_lat_bucket(129), 128);
    CHECK_EQ(bj_lat_bucket(130), 129);
    CHECK_EQ(bj_lat_bucket_low(129), 130);
    /* bounds strictly increase: no empty or overlapping bucket */
    for (uint32_t i = 0; i + 1 < BJ_LAT_BUCKETS; i++)
        CHECK(bj_lat_bucket_low(i) < bj_lat_bucket_low(i + 1));
    CHECK(bj_lat_bucket_low(BJ_LAT_BUCKETS) == UINT64_MAX);
}

static void test_loop_counts_every_request(void)
{
    char path[] = "/tmp/bj-test-latency.XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    unlink(path);
    CHECK_EQ(ftruncate(fd, 1 << 20), 0);
    struct bj_ioloop_opts o = {.fd = fd, .write = 1, .random = 1, .threads = 2,
                               .bs = 4096, .size = 1 << 20, .bytes = 3 << 20,
                               .fsync_end = 0, .seed = 7};
    struct bj_ioloop *b = NULL;
    CHECK_EQ(bj_ioloop_new(&b, &o), 0);
    uint64_t *counts = calloc(BJ_LAT_BUCKETS, sizeof(*counts));
    CHECK(counts != NULL);
    CHECK_EQ(bj_ioloop_get_latency(b, counts), -EBUSY); /* not started */
    int rc;
    while ((rc = bj_ioloop_run(b, 1000)) == 2)
        ;
    CHECK_EQ(rc, 0);
    struct bj_ioloop_result r;
    bj_ioloop_get_result(b, &r);
    CHECK_EQ(r.ops, 768);
    CHECK_EQ(bj_ioloop_get_latency(b, counts), 0);
    uint64_t n = 0, sum_low = 0;
    for (uint32_t i = 0; i < BJ_LAT_BUCKETS; i++) {
        n += counts[i];
        sum_low += counts[i] * bj_lat_bucket_low(i);
    }
    CHECK_EQ(n, r.ops);
    /* every request took some time, and all of them less than the loop */
    CHECK(sum_low <= r.elapsed_ns * 2);
    CHECK_EQ(bj_ioloop_get_latency(NULL, counts), -EINVAL);
    free(counts);
    bj_ioloop_free(b);
    close(fd);
}

int main(void)
{
    test_buckets();
    test_loop_counts_every_request();
    puts("test_latency: ok");
    return 0;
}
