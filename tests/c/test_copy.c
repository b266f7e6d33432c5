/* The copy engine, extents walk, zeroing ladder and token bucket, run under
 * ASan/UBSan: odd sizes, sparse sources, bad arguments, cancel, errors. */
#include "check.h"
#include "copy.h"
#include "extents.h"
#include "ratelimit.h"
#include "zero.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char dir[] = "/tmp/bjctestXXXXXX";

static int mkfile(const char *name, uint64_t size)
{
    char p[256];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    int fd = open(p, O_RDWR | O_CREAT | O_TRUNC, 0600);
    CHECK(fd >= 0);
    CHECK(ftruncate(fd, (off_t)size) == 0);
    return fd;
}

static void fill(int fd, uint64_t off, uint64_t len, unsigned char seed)
{
    unsigned char buf[4096];
    while (len) {
        size_t n = len < sizeof buf ? len : sizeof buf;
        for (size_t i = 0; i < n; i++)
            buf[i] = (unsigned char)(seed + i * 7 + (off >> 12));
        CHECK(pwrite(fd, buf, n, (off_t)off) == (ssize_t)n);
        off += n;
        len -= n;
    }
}

static int same(int a, int b, uint64_t size)
{
    static unsigned char x[65536], y[65536];
    for (uint64_t off = 0; off < size; off += sizeof x) {
        size_t n = size - off < sizeof x ? size - off : sizeof x;
        if (pread(a, x, n, (off_t)off) != (ssize_t)n || pread(b, y, n, (off_t)off) != (ssize_t)n)
            return 0;
        if (memcmp(x, y, n))
            return 0;
    }
    return 1;
}

static void copy_all(int s, int d, uint64_t size, uint32_t kind, uint64_t req, uint64_t zb,
                     int tz, uint32_t threads)
{
    struct bj_copy *c;
    struct bj_copy_opts o = { .src_fd = s, .dst_fd = d, .threads = threads, .request_size = req,
                              .zero_block = zb, .target_is_zero = tz, .may_unmap = 1,
                              .allow_copy_range = 1 };
    CHECK_EQ(bj_copy_new(&c, &o), 0);
    struct bj_range r = { 0, 0, size, kind, -1 };
    CHECK_EQ(bj_copy_add(c, &r, 1), 0);
    int rc;
    while ((rc = bj_copy_run(c, 50, 0)) == 2)
        ;
    CHECK_EQ(rc, 0);
    struct bj_copy_status st;
    bj_copy_get_status(c, &st);
    CHECK_EQ(st.done, size);
    CHECK_EQ(st.data_bytes + st.zero_bytes, size);
    bj_copy_free(c);
}

static void test_odd_sizes(void)
{
    uint64_t sizes[] = { 0, 1, 511, 512, 4095, 4097, 65537, 3 * 1048576 + 17 };
    uint32_t kinds[] = { BJ_RANGE_COPY, BJ_RANGE_COPY_SPARSE };
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++)
        for (size_t k = 0; k < 2; k++)
            for (uint64_t zb = 0; zb <= 4096; zb += 4096) {
                int s = mkfile("s", sizes[i]), d = mkfile("d", sizes[i]);
                fill(s, 0, sizes[i], (unsigned char)i);
                if (sizes[i] > 8192) /* a zero block in the middle */
                    CHECK(pwrite(s, (char[4096]){ 0 }, 4096, 4096) == 4096);
                copy_all(s, d, sizes[i], kinds[k], 65536, zb, 1, 3);
                CHECK(same(s, d, sizes[i]));
                close(s);
                close(d);
            }
}

static void test_sparse_and_existing_target(void)
{
    uint64_t size = 64ull << 20;
    int s = mkfile("s", size), d = mkfile("d", size);
    fill(s, 5 << 20, 3 << 20, 1);
    fill(s, size - 4096 - 13, 4096 + 13, 2);
    fill(d, 0, size, 9); /* garbage that must become zeroes */
    copy_all(s, d, size, BJ_RANGE_COPY_SPARSE, 1 << 20, 4096, 0, 4);
    CHECK(same(s, d, size));
    close(s);
    close(d);
}

static void test_extents(void)
{
    uint64_t size = 10ull << 20;
    int fd = mkfile("e", size);
    fill(fd, 1 << 20, 1 << 20, 3);
    struct bj_extent ex[8];
    size_t n;
    uint64_t next;
    CHECK_EQ(bj_extents(fd, 0, size, ex, 8, &n, &next), 0);
    CHECK_EQ(n, 3);
    CHECK_EQ(ex[0].flags, 0);
    CHECK_EQ(ex[1].offset, 1 << 20);
    CHECK_EQ(ex[1].length, 1 << 20);
    CHECK_EQ(ex[1].flags, BJ_EXTENT_DATA);
    CHECK_EQ(ex[2].offset + ex[2].length, size);
    CHECK_EQ(next, size);
    /* one slot: resumes where it stopped */
    CHECK_EQ(bj_extents(fd, 0, size, ex, 1, &n, &next), 0);
    CHECK_EQ(n, 1);
    CHECK_EQ(next, 1 << 20);
    /* past EOF reads as a hole */
    CHECK_EQ(bj_extents(fd, size - 10, 100, ex, 8, &n, &next), 0);
    CHECK_EQ(ex[n - 1].offset + ex[n - 1].length, size + 90);
    CHECK_EQ(bj_extents(fd, 0, 1, NULL, 8, &n, &next), -EINVAL);
    CHECK_EQ(bj_extents(-1, 0, 1, ex, 8, &n, &next), -EBADF);
    CHECK_EQ(bj_extents(fd, UINT64_MAX, 2, ex, 8, &n, &next), -EINVAL);
    close(fd);
}

static void test_zero(void)
{
    unsigned char b[100] = { 0 };
    CHECK(bj_is_zero(b, 0));
    CHECK(bj_is_zero(b + 1, 99));
    b[99] = 1;
    CHECK(!bj_is_zero(b, 100));
    CHECK(bj_is_zero(b, 99));
    CHECK_EQ(bj_zero_run(b, 100, 33, 1), 99);
    CHECK_EQ(bj_zero_run(b, 100, 50, 1), 50);
    CHECK_EQ(bj_zero_run(b, 100, 0, 0), 100);
    int fd = mkfile("z", 1 << 20);
    fill(fd, 0, 1 << 20, 5);
    struct bj_zeroer z;
    bj_zeroer_init(&z);
    CHECK_EQ(bj_zero_range(&z, fd, 4096, 8192 + 3, 1), 0);
    unsigned char r[8195];
    CHECK(pread(fd, r, sizeof r, 4096) == (ssize_t)sizeof r);
    CHECK(bj_is_zero(r, sizeof r));
    CHECK_EQ(bj_zero_range(&z, fd, 0, 0, 1), 0);
    CHECK_EQ(bj_zero_range(NULL, fd, 0, 1, 1), -EINVAL);
    CHECK_EQ(bj_zero_range(&z, -1, 0, 1, 0) < 0, 1);
    close(fd);
}

static void test_bucket(void)
{
    struct bj_bucket *b;
    CHECK_EQ(bj_bucket_new(&b, 1000000, 1.0, 0), 0);
    CHECK_EQ(bj_bucket_take(b, 1000000, 0), 0);      /* the burst */
    CHECK_EQ(bj_bucket_take(b, 500000, 0), 500000000); /* 0.5 s of debt */
    CHECK_EQ(bj_bucket_take(b, 0, 500000000), 0);
    CHECK_EQ(bj_bucket_set_rate(b, 0, 600000000), 0);
    CHECK_EQ(bj_bucket_take(b, 1u << 30, 600000000), 0); /* unlimited */
    CHECK_EQ(bj_bucket_max_request(b), UINT64_MAX);
    CHECK_EQ(bj_bucket_new(&b, 1, -1.0, 0), -EINVAL);
    bj_bucket_free(b);
    bj_bucket_free(NULL);
}

static void test_bad_args_and_cancel(void)
{
    struct bj_copy *c;
    struct bj_copy_opts o = { .src_fd = -1, .dst_fd = -1, .threads = 1, .request_size = 4096 };
    CHECK_EQ(bj_copy_new(&c, &o), -EINVAL);
    o.dst_fd = 0;
    o.threads = 0;
    CHECK_EQ(bj_copy_new(&c, &o), -EINVAL);
    o.threads = 2;
    o.request_size = 100;
    CHECK_EQ(bj_copy_new(&c, &o), -EINVAL);

    uint64_t size = 32ull << 20;
    int s = mkfile("s", size), d = mkfile("d", size);
    fill(s, 0, size, 4);
    struct bj_bucket *b;
    CHECK_EQ(bj_bucket_new(&b, 4 << 20, 0.0, bj_now_ns()), 0); /* 4 MiB/s: slow */
    struct bj_copy_opts o2 = { .src_fd = s, .dst_fd = d, .threads = 2, .request_size = 1 << 20,
                               .zero_block = 4096, .bucket = b };
    CHECK_EQ(bj_copy_new(&c, &o2), 0);
    struct bj_range r = { 0, 0, size, BJ_RANGE_COPY, -1 };
    CHECK_EQ(bj_copy_add(c, &r, 1), 0);
    struct bj_range bad = { 0, 0, 1, 7, -1 };
    CHECK_EQ(bj_copy_add(c, &bad, 1), -EINVAL);
    CHECK_EQ(bj_copy_run(c, 100, 0), 2);
    bj_copy_cancel(c);
    CHECK_EQ(bj_copy_run(c, 100, 0), -ECANCELED);
    struct bj_copy_status st;
    bj_copy_get_status(c, &st);
    CHECK(st.done < size);
    CHECK_EQ(st.in_flight, 0);
    bj_copy_free(c);
    bj_bucket_free(b);

    /* a read error names the source side and offset */
    int wo = open("/dev/null", O_WRONLY);
    struct bj_copy_opts o3 = { .src_fd = wo, .dst_fd = d, .threads = 1, .request_size = 4096 };
    CHECK_EQ(bj_copy_new(&c, &o3), 0);
    struct bj_range r3 = { 8192, 0, 4096, BJ_RANGE_COPY, -1 };
    CHECK_EQ(bj_copy_add(c, &r3, 1), 0);
    CHECK_EQ(bj_copy_run(c, 1000, 0), -EBADF);
    bj_copy_get_status(c, &st);
    CHECK_EQ(st.error_side, BJ_SIDE_SOURCE);
    CHECK_EQ(st.error_offset, 8192);
    bj_copy_free(c);
    close(wo);
    close(s);
    close(d);
}

int main(void)
{
    CHECK(mkdtemp(dir) != NULL);
    test_odd_sizes();
    test_sparse_and_existing_target();
    test_extents();
    test_zero();
    test_bucket();
    test_bad_args_and_cancel();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    CHECK(system(cmd) == 0);
    printf("test_copy: ok\n");
    return 0;
}
