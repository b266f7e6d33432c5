/* The copy engine's shared state under concurrency, meant for the `tsan`
 * build (ThreadSanitizer) as much as for ASan/valgrind: several workers copy
 * through one engine while
 *  - a thread changes the token bucket's rate (bj_bucket_set_rate) and the
 *    workers read it (bj_bucket_rate, bj_bucket_max_request);
 *  - items whose source is /dev/zero make copy_file_range refuse (EINVAL:
 *    not a regular file), so a worker sets the engine's no_copy_range flag
 *    while the others test it;
 *  - zero items land on a tmpfs target with may_unmap=0, where
 *    FALLOC_FL_ZERO_RANGE is refused (EOPNOTSUPP), so a worker sets the
 *    zeroer's no_zero_range flag while the others test it;
 *  - sparse items make the workers map extents (SEEK_DATA/SEEK_HOLE).
 * The target must end up byte for byte as the model says. */
#include "check.h"
#include "copy.h"
#include "ratelimit.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#define CHUNK (256u << 10)  /* one item per chunk of the target */
#define NCHUNK 48u
#define SIZE ((uint64_t)CHUNK * NCHUNK)
#define ROUNDS 8

static char sdir[] = "/tmp/bjracesXXXXXX";
static char ddir[] = "/dev/shm/bjracedXXXXXX";

static int mkfile(const char *dir, const char *name, uint64_t size)
{
    char p[256];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    int fd = open(p, O_RDWR | O_CREAT | O_TRUNC, 0600);
    CHECK(fd >= 0);
    CHECK(ftruncate(fd, (off_t)size) == 0);
    return fd;
}

static unsigned char pattern(uint64_t off)
{
    return (unsigned char)(1 + (off * 31 + (off >> 9)) % 251); /* never 0 */
}

/* Source: data in even 64 KiB blocks, holes in odd ones. */
static void fill_source(int fd)
{
    static unsigned char buf[65536];
    for (uint64_t off = 0; off < SIZE; off += 2 * sizeof buf) {
        for (size_t i = 0; i < sizeof buf; i++)
            buf[i] = pattern(off + i);
        CHECK(pwrite(fd, buf, sizeof buf, (off_t)off) == (ssize_t)sizeof buf);
    }
}

static unsigned char source_byte(uint64_t off)
{
    return (off / 65536) % 2 ? 0 : pattern(off);
}

/* What chunk i of the target holds after round r: a copy, a sparse copy, a
 * zero item, or a copy from /dev/zero (kinds rotate with the round). */
enum { K_COPY, K_SPARSE, K_ZERO, K_DEVZERO, K_N };
static int kind_of(unsigned i, unsigned r)
{
    return (int)((i + r) % K_N);
}

struct setter {
    struct bj_bucket *b;
    atomic_int stop;
    unsigned long changes;
};

static void *rate_setter(void *arg)
{
    struct setter *s = arg;
    uint64_t rates[] = { 4ull << 30, 2ull << 30, 8ull << 30 }; /* fast: no real waits */
    unsigned k = 0;
    while (!atomic_load(&s->stop)) {
        CHECK_EQ(bj_bucket_set_rate(s->b, rates[k++ % 3], bj_now_ns()), 0);
        s->changes++;
        sched_yield();
    }
    return NULL;
}

static void check_target(int d, unsigned r)
{
    static unsigned char buf[CHUNK];
    for (unsigned i = 0; i < NCHUNK; i++) {
        uint64_t off = (uint64_t)i * CHUNK;
        CHECK(pread(d, buf, CHUNK, (off_t)off) == (ssize_t)CHUNK);
        int k = kind_of(i, r);
        for (size_t j = 0; j < CHUNK; j++) {
            unsigned char want = (k == K_COPY || k == K_SPARSE) ? source_byte(off + j) : 0;
            if (buf[j] != want) {
                fprintf(stderr, "round %u chunk %u (kind %d) byte %zu: %u, want %u\n", r, i, k,
                        j, buf[j], want);
                exit(1);
            }
        }
    }
}

static void test_shared_engine(void)
{
    struct statfs sf;
    CHECK(statfs("/dev/shm", &sf) == 0);
    CHECK(sf.f_type == TMPFS_MAGIC); /* the test needs a file system refusing ZERO_RANGE */
    int s = mkfile(sdir, "s", SIZE), d = mkfile(ddir, "d", SIZE);
    int z = open("/dev/zero", O_RDONLY);
    CHECK(z >= 0);
    fill_source(s);

    struct setter st = { .stop = 0 };
    CHECK_EQ(bj_bucket_new(&st.b, 4ull << 30, 1.0, bj_now_ns()), 0);
    pthread_t th;
    CHECK_EQ(pthread_create(&th, NULL, rate_setter, &st), 0);

    for (unsigned r = 0; r < ROUNDS; r++) {
        /* A fresh engine each round: its flags start clear, so they are set
         * while the other workers are testing them. */
        struct bj_copy *c;
        struct bj_copy_opts o = { .src_fd = s, .dst_fd = d, .threads = 4,
                                  .request_size = 64 << 10, .zero_block = 0, .may_unmap = 0,
                                  .allow_copy_range = 1, .bucket = st.b };
        CHECK_EQ(bj_copy_new(&c, &o), 0);
        /* garbage first, so that zeroes must be written */
        static unsigned char junk[CHUNK];
        memset(junk, 0xa5, sizeof junk);
        for (unsigned i = 0; i < NCHUNK; i++)
            CHECK(pwrite(d, junk, CHUNK, (off_t)i * CHUNK) == (ssize_t)CHUNK);
        /* Items grouped by kind (the group order rotates with the round),
         * so that several workers meet the same refusal at once; queued
         * in small batches while the workers run. */
        uint64_t total = 0;
        for (int g = 0; g < K_N; g++) {
            for (unsigned i = 0; i < NCHUNK; i++) {
                if (kind_of(i, r) != g)
                    continue;
                uint64_t off = (uint64_t)i * CHUNK;
                struct bj_range it = { off, off, CHUNK, BJ_RANGE_COPY, -1 };
                switch (g) {
                case K_SPARSE: it.kind = BJ_RANGE_COPY_SPARSE; break;
                case K_ZERO: it.kind = BJ_RANGE_ZERO; break;
                case K_DEVZERO: it.src_fd = z; break;
                default: break;
                }
                CHECK_EQ(bj_copy_add(c, &it, 1), 0);
                total += CHUNK;
            }
            CHECK(bj_copy_run(c, 0, 0) >= 0);
        }
        int rc;
        while ((rc = bj_copy_run(c, 100, 0)) == 2)
            ;
        CHECK_EQ(rc, 0);
        struct bj_copy_status cs;
        bj_copy_get_status(c, &cs);
        CHECK_EQ(cs.done, total);
        CHECK_EQ(cs.queued, total);
        CHECK_EQ(cs.in_flight, 0);
        CHECK_EQ(cs.error, 0);
        bj_copy_free(c);
        check_target(d, r);
    }
    atomic_store(&st.stop, 1);
    CHECK_EQ(pthread_join(th, NULL), 0);
    CHECK(st.changes > 0);
    bj_bucket_free(st.b);
    close(z);
    close(s);
    close(d);
}

/* Cancel and drain from other threads while sparse work is being mapped and
 * copied: run returns -ECANCELED, nothing is left in flight. */
struct canceller {
    struct bj_copy *c;
};

static void *cancel_soon(void *arg)
{
    struct canceller *k = arg;
    struct bj_copy_status cs;
    do {
        sched_yield();
        bj_copy_get_status(k->c, &cs);
    } while (cs.done == 0);
    bj_copy_cancel(k->c);
    return NULL;
}

static void test_cancel_while_mapping(void)
{
    int s = mkfile(sdir, "s", SIZE), d = mkfile(ddir, "d", SIZE);
    fill_source(s);
    struct bj_copy *c;
    struct bj_copy_opts o = { .src_fd = s, .dst_fd = d, .threads = 3, .request_size = 4096,
                              .zero_block = 4096, .may_unmap = 1 };
    CHECK_EQ(bj_copy_new(&c, &o), 0);
    for (unsigned i = 0; i < 64; i++) { /* many sparse items: much mapping */
        struct bj_range it = { 0, 0, SIZE, BJ_RANGE_COPY_SPARSE, -1 };
        CHECK_EQ(bj_copy_add(c, &it, 1), 0);
    }
    struct canceller k = { c };
    pthread_t th;
    CHECK_EQ(pthread_create(&th, NULL, cancel_soon, &k), 0);
    int rc;
    while ((rc = bj_copy_run(c, 100, 0)) == 2)
        ;
    CHECK_EQ(rc, -ECANCELED);
    CHECK_EQ(pthread_join(th, NULL), 0);
    struct bj_copy_status cs;
    bj_copy_get_status(c, &cs);
    CHECK_EQ(cs.in_flight, 0);
    CHECK(cs.done > 0 && cs.done < 64 * SIZE);
    bj_copy_free(c);
    close(s);
    close(d);
}

int main(void)
{
    CHECK(mkdtemp(sdir) != NULL);
    CHECK(mkdtemp(ddir) != NULL);
    test_shared_engine();
    test_cancel_while_mapping();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s %s", sdir, ddir);
    CHECK(system(cmd) == 0);
    printf("test_race: ok\n");
    return 0;
}
