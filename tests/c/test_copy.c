/* The copy engine: odd sizes, sparse sources (mapped per work range outside
 * the claim lock), claim order, pause and resume, bad arguments, cancel,
 * errors. The extents walk, the zeroing ladder and the token bucket have
 * their own tests (test_extents.c, test_zero.c, test_ratelimit.c). */
#include "check.h"
#include "copy.h"
#include "ratelimit.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <signal.h>
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

/* A sparse source larger than a work range (128 MiB) with more extents per
 * work range than one mapping batch (64): mapped in several batches and
 * ranges, by whichever workers claim them, possibly ahead of the copying. */
static void test_fragmented_sparse(void)
{
    uint64_t size = 136ull << 20, step = 256 << 10;
    int s = mkfile("s", size), d = mkfile("d", size);
    for (uint64_t off = 0; off < size; off += step)
        fill(s, off + (off / step % 3) * 4096, 4096 + off / step % 5, (unsigned char)(off >> 18));
    fill(d, 0, 1 << 20, 9);
    fill(d, size - (1 << 20), 1 << 20, 9);
    for (uint32_t threads = 1; threads <= 4; threads += 3) {
        copy_all(s, d, size, BJ_RANGE_COPY_SPARSE, 1 << 20, 4096, 0, threads);
        CHECK(same(s, d, size));
    }
    close(s);
    close(d);
}

/* One worker claims strictly in queue order, mapped sparse items included:
 * a later item over the same target bytes wins. */
static void test_order_one_worker(void)
{
    uint64_t size = 8ull << 20;
    int s = mkfile("s", size), d = mkfile("d", size);
    fill(s, 1 << 20, 2 << 20, 3);
    fill(s, 6 << 20, 4096, 4);
    for (int zero_last = 0; zero_last <= 1; zero_last++) {
        fill(d, 0, size, 7);
        struct bj_copy *c;
        struct bj_copy_opts o = { .src_fd = s, .dst_fd = d, .threads = 1,
                                  .request_size = 65536, .zero_block = 4096, .may_unmap = 1 };
        CHECK_EQ(bj_copy_new(&c, &o), 0);
        struct bj_range sp = { 0, 0, size, BJ_RANGE_COPY_SPARSE, -1 };
        struct bj_range z = { 0, 1 << 20, 1 << 20, BJ_RANGE_ZERO, -1 };
        struct bj_range r[2] = { zero_last ? sp : z, zero_last ? z : sp };
        CHECK_EQ(bj_copy_add(c, r, 2), 0);
        int rc;
        while ((rc = bj_copy_run(c, 100, 0)) == 2)
            ;
        CHECK_EQ(rc, 0);
        struct bj_copy_status st;
        bj_copy_get_status(c, &st);
        CHECK_EQ(st.done, size + (1 << 20));
        bj_copy_free(c);
        static unsigned char want[1 << 20], got[1 << 20];
        if (zero_last)
            memset(want, 0, sizeof want);
        else
            CHECK(pread(s, want, sizeof want, 1 << 20) == (ssize_t)sizeof want);
        CHECK(pread(d, got, sizeof got, 1 << 20) == (ssize_t)sizeof got);
        CHECK(memcmp(want, got, sizeof want) == 0);
        CHECK(same(s, d, 1 << 20)); /* the rest is the source's */
    }
    close(s);
    close(d);
}

/* Mapping fails (a pipe cannot seek): the error names the source and the
 * offset of the range being mapped; nothing is left in flight. */
static void test_mapping_error(void)
{
    int p[2];
    CHECK(pipe(p) == 0);
    int d = mkfile("d", 1 << 20);
    struct bj_copy *c;
    struct bj_copy_opts o = { .src_fd = p[0], .dst_fd = d, .threads = 2, .request_size = 4096,
                              .zero_block = 4096 };
    CHECK_EQ(bj_copy_new(&c, &o), 0);
    struct bj_range r = { 12288, 0, 1 << 20, BJ_RANGE_COPY_SPARSE, -1 };
    CHECK_EQ(bj_copy_add(c, &r, 1), 0);
    CHECK_EQ(bj_copy_run(c, 5000, 0), -ESPIPE);
    struct bj_copy_status st;
    bj_copy_get_status(c, &st);
    CHECK_EQ(st.error, -ESPIPE);
    CHECK_EQ(st.error_side, BJ_SIDE_SOURCE);
    CHECK_EQ(st.error_offset, 12288);
    CHECK_EQ(st.in_flight, 0);
    CHECK_EQ(st.done, 0);
    bj_copy_free(c);
    close(p[0]);
    close(p[1]);
    close(d);
}

/* Drain (pause) in the middle of a sparse copy, then finish it. */
static void test_drain_resume_sparse(void)
{
    uint64_t size = 40ull << 20;
    int s = mkfile("s", size), d = mkfile("d", size);
    for (uint64_t off = 0; off < size; off += 1 << 20)
        fill(s, off, 8192, (unsigned char)(off >> 20));
    struct bj_bucket *b;
    CHECK_EQ(bj_bucket_new(&b, 256 << 10, 0.0, bj_now_ns()), 0); /* data: > 1 s */
    struct bj_copy *c;
    struct bj_copy_opts o = { .src_fd = s, .dst_fd = d, .threads = 3, .request_size = 4096,
                              .zero_block = 4096, .may_unmap = 1, .bucket = b };
    CHECK_EQ(bj_copy_new(&c, &o), 0);
    struct bj_range r = { 0, 0, size, BJ_RANGE_COPY_SPARSE, -1 };
    CHECK_EQ(bj_copy_add(c, &r, 1), 0);
    struct bj_copy_status st1, st2;
    do {
        CHECK_EQ(bj_copy_run(c, 10, 0), 2);
        bj_copy_get_status(c, &st1);
    } while (st1.done == 0);
    bj_copy_drain(c);
    bj_copy_get_status(c, &st1);
    CHECK_EQ(st1.in_flight, 0);
    CHECK(st1.done < size);
    bj_copy_get_status(c, &st2);
    CHECK_EQ(st2.done, st1.done); /* paused: nothing moves */
    CHECK_EQ(bj_bucket_set_rate(b, 0, bj_now_ns()), 0);
    int rc;
    while ((rc = bj_copy_run(c, 100, 0)) == 2)
        ;
    CHECK_EQ(rc, 0);
    bj_copy_get_status(c, &st2);
    CHECK_EQ(st2.done, size);
    CHECK_EQ(st2.data_bytes + st2.zero_bytes, size);
    bj_copy_free(c);
    bj_bucket_free(b);
    CHECK(same(s, d, size));
    close(s);
    close(d);
}

/* The zeroer's fallocate hook: every rung refused, so zeroing the target
 * means writing zeroes (a file system without fallocate). */
static int no_fallocate(int fd, int mode, off_t off, off_t len)
{
    errno = EOPNOTSUPP;
    return -1;
}

static int reads_zero(int fd, uint64_t off, uint64_t len)
{
    static unsigned char buf[65536];
    while (len) {
        size_t n = len < sizeof buf ? len : sizeof buf;
        CHECK(pread(fd, buf, n, (off_t)off) == (ssize_t)n);
        for (size_t i = 0; i < n; i++)
            if (buf[i])
                return 0;
        off += n;
        len -= n;
    }
    return 1;
}

/* A large zero request falling back to written zeroes is rate-limited and
 * cancellable between pieces; what it wrote counts as done (pause / resume,
 * cancel), and once the fallback is known zero requests are cut like data. */
static void test_zero_fallback_paced(void)
{
    /* cancel: 1 GiB of zeroes at 4 MiB/s, cancelled while it writes */
    uint64_t size = 1ull << 30, rate = 4 << 20;
    int d = mkfile("z", size);
    fill(d, 0, 1 << 20, 3);
    struct bj_bucket *b;
    CHECK_EQ(bj_bucket_new(&b, rate, 0.0, bj_now_ns()), 0);
    struct bj_copy *c;
    struct bj_copy_opts o = { .src_fd = -1, .dst_fd = d, .threads = 2, .request_size = 1 << 20,
                              .zero_block = 4096, .may_unmap = 1, .bucket = b };
    CHECK_EQ(bj_copy_new(&c, &o), 0);
    bj_copy_test_fallocate(c, no_fallocate);
    struct bj_range r = { 0, 0, size, BJ_RANGE_ZERO, -1 };
    CHECK_EQ(bj_copy_add(c, &r, 1), 0);
    uint64_t t0 = bj_now_ns();
    while (!reads_zero(d, 0, 4096)) /* the first piece is written */
        CHECK_EQ(bj_copy_run(c, 10, 0), 2);
    bj_copy_cancel(c);
    CHECK_EQ(bj_copy_run(c, 1000, 0), -ECANCELED);
    double secs = (double)(bj_now_ns() - t0) * 1e-9;
    struct bj_copy_status st;
    bj_copy_get_status(c, &st);
    CHECK_EQ(st.in_flight, 0);
    CHECK(st.done > 0);                       /* the pieces written count */
    CHECK_EQ(st.done % bj_bucket_max_request(b), 0);
    CHECK(st.done == st.zero_bytes);
    CHECK((double)st.done <= (double)rate * secs + (double)bj_bucket_max_request(b));
    CHECK(reads_zero(d, 0, st.done));
    struct stat sb;
    CHECK(fstat(d, &sb) == 0);
    CHECK((uint64_t)sb.st_blocks * 512 < (64ull << 20)); /* not 1 GiB written */
    bj_copy_free(c);

    /* drain part-way, then resume unlimited: the done part is not redone
     * and the rest is handed back, then finished */
    size = 16 << 20;
    CHECK(ftruncate(d, 0) == 0);
    CHECK(ftruncate(d, (off_t)size) == 0);
    fill(d, 0, size, 5);
    CHECK_EQ(bj_bucket_set_rate(b, 2 << 20, bj_now_ns()), 0);
    CHECK_EQ(bj_copy_new(&c, &o), 0);
    bj_copy_test_fallocate(c, no_fallocate);
    r.len = size;
    CHECK_EQ(bj_copy_add(c, &r, 1), 0);
    while (!reads_zero(d, 0, 4096))
        CHECK_EQ(bj_copy_run(c, 10, 0), 2);
    bj_copy_drain(c);
    bj_copy_get_status(c, &st);
    CHECK_EQ(st.in_flight, 0);
    CHECK(st.done > 0 && st.done < size);
    CHECK(reads_zero(d, 0, st.done));
    CHECK(!reads_zero(d, size - 4096, 4096)); /* the end is still to do */
    CHECK_EQ(bj_bucket_set_rate(b, 0, bj_now_ns()), 0);
    int rc;
    while ((rc = bj_copy_run(c, 100, 0)) == 2)
        ;
    CHECK_EQ(rc, 0);
    bj_copy_get_status(c, &st);
    CHECK_EQ(st.done, size);
    CHECK_EQ(st.zero_bytes, size);
    CHECK(reads_zero(d, 0, size));
    bj_copy_free(c);
    bj_bucket_free(b);
    close(d);
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

/* Items continuing each other in both files merge into requests of
 * request_size; a gap between them does not. An item continuing the last
 * one after it was wholly copied (an engine reused) is copied too. */
static void test_merge_adjacent(void)
{
    uint64_t size = 4ull << 20, c64 = 65536;
    int s = mkfile("s", size), d = mkfile("d", size);
    fill(s, 0, size, 9);
    struct bj_copy *c;
    struct bj_copy_opts o = { .src_fd = s, .dst_fd = d, .threads = 2, .request_size = 1 << 20 };
    CHECK_EQ(bj_copy_new(&c, &o), 0);
    struct bj_range r[32];
    for (int i = 0; i < 32; i++)
        r[i] = (struct bj_range){ (uint64_t)i * c64, (uint64_t)i * c64, c64, BJ_RANGE_COPY, -1 };
    CHECK_EQ(bj_copy_add(c, r, 32), 0);
    int rc;
    while ((rc = bj_copy_run(c, 100, 0)) == 2)
        ;
    CHECK_EQ(rc, 0);
    struct bj_copy_status st;
    bj_copy_get_status(c, &st);
    CHECK_EQ(st.done, 2ull << 20);
    CHECK_EQ(st.requests, 2);
    /* continues the finished item: merged, copied */
    struct bj_range more = { 2ull << 20, 2ull << 20, 1ull << 20, BJ_RANGE_COPY, s };
    CHECK_EQ(bj_copy_add(c, &more, 1), 0);
    /* a gap in the target between items: each its own request */
    for (int i = 0; i < 8; i++)
        r[i] = (struct bj_range){ (3ull << 20) + (uint64_t)i * c64,
                                  (3ull << 20) + (uint64_t)i * c64 * 2, c64, BJ_RANGE_COPY, -1 };
    CHECK_EQ(bj_copy_add(c, r, 8), 0);
    while ((rc = bj_copy_run(c, 100, 0)) == 2)
        ;
    CHECK_EQ(rc, 0);
    bj_copy_get_status(c, &st);
    CHECK_EQ(st.done, (3ull << 20) + 8 * c64);
    CHECK_EQ(st.requests, 2 + 1 + 8);
    bj_copy_free(c);
    CHECK(same(s, d, 3ull << 20));
    close(s);
    close(d);
}

/* The mapped read path: each data request is read from a mapping of the
 * source (the hook counts them); a source that shrinks under the mapping
 * (truncated by another process) raises SIGBUS on the scan, which sends the
 * request back to pread: no crash, and the bytes past the new end read as
 * zeroes, as a short pread gives them. A SIGBUS that is not the engine's
 * still reaches the handler that was there before. */
static int maps, shrink_fd = -1;
static uint64_t shrink_to;
static void on_map(int fd, uint64_t off, uint64_t len)
{
    __atomic_add_fetch(&maps, 1, __ATOMIC_SEQ_CST);
    if (fd == shrink_fd && off == 0)
        CHECK(ftruncate(fd, (off_t)shrink_to) == 0);
}

static volatile sig_atomic_t prev_called;
static void prev_handler(int sig)
{
    prev_called = sig;
}

static void test_mapped_source(void)
{
    uint64_t size = 8ull << 20, req = 2ull << 20;
    int s = mkfile("ms", size), d = mkfile("md", size);
    fill(s, 0, size, 5);
    struct sigaction sa = { 0 }, old;
    sa.sa_handler = prev_handler;
    sigemptyset(&sa.sa_mask);
    CHECK(sigaction(SIGBUS, &sa, &old) == 0);
    for (int zb = 0; zb <= 4096; zb += 4096) {
        struct bj_copy *c;
        struct bj_copy_opts o = { .src_fd = s, .dst_fd = d, .threads = 2, .request_size = req,
                                  .zero_block = (uint64_t)zb, .may_unmap = 1 };
        CHECK_EQ(bj_copy_new(&c, &o), 0);
        bj_copy_test_after_map(c, on_map);
        maps = 0;
        struct bj_range r = { 0, 0, size, BJ_RANGE_COPY, -1 };
        CHECK_EQ(bj_copy_add(c, &r, 1), 0);
        int rc;
        while ((rc = bj_copy_run(c, 50, 0)) == 2)
            ;
        CHECK_EQ(rc, 0);
        bj_copy_free(c);
        CHECK_EQ(maps, 4);          /* every request read from the mapping */
        CHECK(same(s, d, size));
    }
    /* the source shrinks to 1 MiB + 12 KiB while its first request is mapped */
    shrink_fd = s;
    shrink_to = (1ull << 20) + 12288;
    int d2 = mkfile("md2", size);
    struct bj_copy *c;
    struct bj_copy_opts o = { .src_fd = s, .dst_fd = d2, .threads = 1, .request_size = req,
                              .zero_block = 4096, .may_unmap = 1 };
    CHECK_EQ(bj_copy_new(&c, &o), 0);
    bj_copy_test_after_map(c, on_map);
    maps = 0;
    struct bj_range r = { 0, 0, size, BJ_RANGE_COPY, -1 };
    CHECK_EQ(bj_copy_add(c, &r, 1), 0);
    int rc;
    while ((rc = bj_copy_run(c, 50, 0)) == 2)
        ;
    CHECK_EQ(rc, 0);
    struct bj_copy_status st;
    bj_copy_get_status(c, &st);
    CHECK_EQ(st.done, size);
    CHECK_EQ(st.data_bytes, shrink_to);
    bj_copy_free(c);
    CHECK_EQ(maps, 1);      /* the later requests start past the end: pread */
    CHECK(same(s, d2, shrink_to));
    static unsigned char z[65536], zero[65536];
    for (uint64_t off = shrink_to; off < size; off += sizeof z) {
        size_t n = size - off < sizeof z ? size - off : sizeof z;
        CHECK(pread(d2, z, n, (off_t)off) == (ssize_t)n);
        CHECK(memcmp(z, zero, n) == 0);
    }
    shrink_fd = -1;
    CHECK_EQ(prev_called, 0);
    raise(SIGBUS);              /* not the engine's: the handler found before */
    CHECK_EQ(prev_called, SIGBUS);
    CHECK(sigaction(SIGBUS, &old, NULL) == 0);
    close(s);
    close(d);
    close(d2);
}

static uint64_t allocated(int fd)
{
    struct stat st;
    CHECK(fstat(fd, &st) == 0);
    return (uint64_t)st.st_blocks * 512;
}

/* The target's allocated bytes when the first request's source was mapped
 * (before that request's writes). */
static int alloc_fd = -1;
static uint64_t alloc_seen;

static void on_map_alloc(int fd, uint64_t off, uint64_t len)
{
    (void)fd;
    (void)off;
    (void)len;
    uint64_t none = UINT64_MAX; /* the first call's figure (two workers may call) */
    __atomic_compare_exchange_n(&alloc_seen, &none, allocated(alloc_fd), 0, __ATOMIC_SEQ_CST,
                                __ATOMIC_SEQ_CST);
}

/* prealloc: the target ranges of copy items are allocated as they are
 * queued (before any worker runs), zero runs found in their data are
 * punched out again, holes (zero items) and sparse items stay unallocated;
 * not on a target that does not read as zero. */
static void test_prealloc(void)
{
    const uint64_t M = 1ull << 20, size = 8 * M, zoff = 3 * M, zlen = 64 << 10;
    int s = mkfile("ps", size);
    fill(s, 0, 5 * M, 9);
    fill(s, 6 * M, 2 * M, 11);
    static const unsigned char zero[64 << 10];
    CHECK(pwrite(s, zero, zlen, (off_t)zoff) == (ssize_t)zlen); /* zeroes as data */
    struct bj_range items[] = {
        { 0, 0, 5 * M, BJ_RANGE_COPY, -1 },
        { 5 * M, 5 * M, M, BJ_RANGE_ZERO, -1 },
        { 6 * M, 6 * M, M, BJ_RANGE_COPY, -1 },
        { 7 * M, 7 * M, M, BJ_RANGE_COPY, -1 },  /* adjacent: one fallocate */
    };
    for (uint32_t threads = 1; threads <= 3; threads += 2) {
        int d = mkfile("pd", size);
        struct bj_copy *c;
        struct bj_copy_opts o = { .src_fd = s, .dst_fd = d, .threads = threads,
                                  .request_size = 256 << 10, .zero_block = 4096,
                                  .target_is_zero = 1, .may_unmap = 1, .prealloc = 1 };
        CHECK_EQ(bj_copy_new(&c, &o), 0);
        CHECK_EQ(bj_copy_add(c, items, 4), 0);
        /* allocated before the workers run (bj_copy_run starts them) */
        CHECK(allocated(d) >= 7 * M); /* (unwritten: SEEK_DATA sees holes) */
        int rc;
        while ((rc = bj_copy_run(c, 50, 0)) == 2)
            ;
        CHECK_EQ(rc, 0);
        struct bj_copy_status st;
        bj_copy_get_status(c, &st);
        CHECK_EQ(st.data_bytes, 7 * M - zlen);
        CHECK_EQ(st.zero_bytes, M + zlen);
        bj_copy_free(c);
        CHECK(same(s, d, size));
        /* the zero run in the data is deallocated again, the zero item
         * never was: the data's blocks alone */
        CHECK(allocated(d) <= 7 * M - zlen);
        CHECK_EQ(lseek(d, zoff, SEEK_DATA), (off_t)(zoff + zlen));
        CHECK_EQ(lseek(d, 5 * M, SEEK_DATA), (off_t)(6 * M));
        close(d);
    }
    /* runs of data shorter than 256 KiB are left to the writes */
    {
        int d = mkfile("pd", size);
        struct bj_copy *c;
        struct bj_copy_opts o = { .src_fd = s, .dst_fd = d, .threads = 1,
                                  .request_size = 1 << 20, .zero_block = 4096,
                                  .target_is_zero = 1, .may_unmap = 1, .prealloc = 1 };
        CHECK_EQ(bj_copy_new(&c, &o), 0);
        struct bj_range r[] = { { 0, 0, 128 << 10, BJ_RANGE_COPY, -1 },
                                { 1 << 20, 1 << 20, 128 << 10, BJ_RANGE_COPY, -1 },
                                { 2 << 20, 2 << 20, 128 << 10, BJ_RANGE_COPY, -1 },
                                { (2 << 20) + (128 << 10), (2 << 20) + (128 << 10), 128 << 10,
                                  BJ_RANGE_COPY, -1 } };  /* with the one before: 256 KiB */
        CHECK_EQ(bj_copy_add(c, r, 4), 0);
        CHECK_EQ(allocated(d), 256 << 10);
        int rc;
        while ((rc = bj_copy_run(c, 50, 0)) == 2)
            ;
        CHECK_EQ(rc, 0);
        bj_copy_free(c);
        close(d);
    }
    /* a target not known to read as zero, or a sparse item: nothing
     * allocated when queued; the sparse item's data extents are allocated
     * by the mapper, before the first request is read */
    for (int k = 0; k < 2; k++) {
        int d = mkfile("pd", size);
        struct bj_copy *c;
        struct bj_copy_opts o = { .src_fd = s, .dst_fd = d, .threads = 2,
                                  .request_size = 1 << 20, .zero_block = 4096,
                                  .target_is_zero = k, .may_unmap = 1, .prealloc = 1 };
        CHECK_EQ(bj_copy_new(&c, &o), 0);
        struct bj_range r = { 0, 0, size, k ? BJ_RANGE_COPY_SPARSE : BJ_RANGE_COPY, -1 };
        CHECK_EQ(bj_copy_add(c, &r, 1), 0);
        CHECK_EQ(allocated(d), 0);
        bj_copy_test_after_map(c, on_map_alloc);
        alloc_fd = d;
        alloc_seen = UINT64_MAX;
        int rc;
        while ((rc = bj_copy_run(c, 50, 0)) == 2)
            ;
        CHECK_EQ(rc, 0);
        bj_copy_free(c);
        CHECK(same(s, d, size));
        CHECK_EQ(lseek(d, 5 * M, SEEK_DATA), (off_t)(6 * M)); /* the source's hole */
        if (k) {
            CHECK(alloc_seen >= 7 * M);             /* allocated before any write */
            CHECK(allocated(d) <= 7 * M - zlen);    /* the zero run punched */
        } else {
            CHECK(alloc_seen < 7 * M);
        }
        close(d);
    }
    close(s);
}


/* Late allocation: once the zero runs punched out of ranges allocated ahead
 * reach 1/32 of them (two punches or more), the engine stops allocating
 * ahead: copy items queued after that are not allocated by bj_copy_add, nor
 * the data extents the mapper publishes, and each worker allocates a
 * request's data runs after scanning it, so its zero runs are never
 * allocated (and never punched). The target is the source's data either way,
 * its blocks the data's alone. */
static void run_all(struct bj_copy *c)
{
    int rc;
    while ((rc = bj_copy_run(c, 50, 0)) == 2)
        ;
    CHECK_EQ(rc, 0);
}

static void test_late_alloc(void)
{
    const uint64_t M = 1ull << 20, size = 32 * M, zl = 256 << 10;
    static const unsigned char zero[256 << 10];
    int s = mkfile("ls", size);
    for (uint64_t i = 0; i < 32; i++) {   /* each MiB: data, a 256 KiB zero run, data */
        fill(s, i * M, M, (unsigned char)(i + 1));
        CHECK(pwrite(s, zero, zl, (off_t)(i * M + 512 * 1024)) == (ssize_t)zl);
    }
    for (uint32_t threads = 1; threads <= 4; threads += 3) {
        int d = mkfile("ld", size);
        struct bj_copy *c;
        struct bj_copy_opts o = { .src_fd = s, .dst_fd = d, .threads = threads,
                                  .request_size = M, .zero_block = 4096,
                                  .target_is_zero = 1, .may_unmap = 1, .prealloc = 1 };
        CHECK_EQ(bj_copy_new(&c, &o), 0);
        struct bj_range first = { 0, 0, 8 * M, BJ_RANGE_COPY, -1 };
        CHECK_EQ(bj_copy_add(c, &first, 1), 0);
        CHECK(allocated(d) >= 8 * M);           /* ahead, as before */
        run_all(c);
        /* its 8 zero runs punched (st_blocks counts the extent tree's
         * blocks too: a few KiB over the data's) */
        uint64_t before = allocated(d);
        CHECK(before >= 8 * (M - zl) && before <= 8 * (M - zl) + (16 << 10));
        struct bj_range rest = { 8 * M, 8 * M, 24 * M, BJ_RANGE_COPY, -1 };
        CHECK_EQ(bj_copy_add(c, &rest, 1), 0);
        CHECK_EQ(allocated(d), before);         /* not ahead now */
        run_all(c);
        struct bj_copy_status st;
        bj_copy_get_status(c, &st);
        CHECK_EQ(st.data_bytes, 32 * (M - zl));
        CHECK_EQ(st.zero_bytes, 32 * zl);
        bj_copy_free(c);
        CHECK(same(s, d, size));
        CHECK(fsync(d) == 0);                   /* delayed allocations made */
        uint64_t a = allocated(d);              /* the data's blocks alone */
        CHECK(a >= 32 * (M - zl) && a <= 32 * (M - zl) + (16 << 10));
        for (uint64_t i = 0; i < 32; i++)       /* the zero runs read as holes */
            CHECK_EQ(lseek(d, (off_t)(i * M + 512 * 1024), SEEK_DATA),
                     (off_t)(i * M + 512 * 1024 + zl));
        close(d);
    }
    /* a sparse item: the mapper allocates its first work range's extents
     * ahead (128 MiB); their zero runs are punched, and the next work
     * range's extents are published unallocated */
    const uint64_t big = 300 * M;
    int s2 = mkfile("ls2", big);
    for (uint64_t off = 0; off < big; off += 8 * M) {
        fill(s2, off, M, (unsigned char)(off >> 20));
        CHECK(pwrite(s2, zero, zl, (off_t)(off + M)) == (ssize_t)zl);  /* zeroes as data */
        fill(s2, off + M + zl, M, (unsigned char)((off >> 20) + 1));
    }
    int d = mkfile("ld2", big);
    struct bj_copy *c;
    struct bj_copy_opts o = { .src_fd = s2, .dst_fd = d, .threads = 3, .request_size = 2 * M,
                              .zero_block = 4096, .target_is_zero = 1, .may_unmap = 1,
                              .prealloc = 1 };
    CHECK_EQ(bj_copy_new(&c, &o), 0);
    struct bj_range r = { 0, 0, big, BJ_RANGE_COPY_SPARSE, -1 };
    CHECK_EQ(bj_copy_add(c, &r, 1), 0);
    run_all(c);
    bj_copy_free(c);
    CHECK(same(s2, d, big));
    CHECK(fsync(d) == 0);
    uint64_t nruns = (big + 8 * M - 1) / (8 * M), a = allocated(d);
    CHECK(a >= nruns * 2 * M && a <= nruns * 2 * M + (64 << 10));
    close(d);
    close(s2);
    close(s);
}

int main(void)
{
    CHECK(mkdtemp(dir) != NULL);
    test_odd_sizes();
    test_sparse_and_existing_target();
    test_fragmented_sparse();
    test_order_one_worker();
    test_mapping_error();
    test_drain_resume_sparse();
    test_bad_args_and_cancel();
    test_zero_fallback_paced();
    test_merge_adjacent();
    test_mapped_source();
    test_prealloc();
    test_late_alloc();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    CHECK(system(cmd) == 0);
    printf("test_copy: ok\n");
    return 0;
}
