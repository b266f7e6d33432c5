/* Tests of csrc/zero.c: the zero scan, and the zeroing ladder
 * (punch hole -> FALLOC_FL_ZERO_RANGE -> write zeroes) on the normal file
 * system, on tmpfs (which refuses ZERO_RANGE), and with each rung refused
 * through the zeroer's fallocate hook: the next rung does the work, and the
 * refusal is remembered (the rung is never asked again). */
#include "check.h"
#include "zero.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/magic.h>
#include <pthread.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

static char dir[] = "/tmp/bjzeroXXXXXX";
static char shm[] = "/dev/shm/bjzeroXXXXXX";

static int mkfile(const char *d, const char *name, uint64_t size)
{
    char p[256];
    snprintf(p, sizeof p, "%s/%s", d, name);
    int fd = open(p, O_RDWR | O_CREAT | O_TRUNC, 0600);
    CHECK(fd >= 0);
    CHECK(ftruncate(fd, (off_t)size) == 0);
    return fd;
}

static void fill(int fd, uint64_t off, uint64_t len)
{
    unsigned char buf[4096];
    memset(buf, 0x5a, sizeof buf);
    while (len) {
        size_t n = len < sizeof buf ? len : sizeof buf;
        CHECK(pwrite(fd, buf, n, (off_t)off) == (ssize_t)n);
        off += n;
        len -= n;
    }
}

/* [off, off+len) reads as zeroes and its neighbours kept their bytes. */
static void check_zeroed(int fd, uint64_t off, uint64_t len, uint64_t size)
{
    static unsigned char buf[1 << 16];
    for (uint64_t p = 0; p < size; p += sizeof buf) {
        size_t n = size - p < sizeof buf ? size - p : sizeof buf;
        CHECK(pread(fd, buf, n, (off_t)p) == (ssize_t)n);
        for (size_t i = 0; i < n; i++) {
            int in = p + i >= off && p + i < off + len;
            if (buf[i] != (in ? 0 : 0x5a)) {
                fprintf(stderr, "byte %llu: %u\n", (unsigned long long)(p + i), buf[i]);
                exit(1);
            }
        }
    }
}

static long long blocks(int fd)
{
    struct stat st;
    CHECK(fstat(fd, &st) == 0);
    return (long long)st.st_blocks;
}

static void test_scan(void)
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
    CHECK_EQ(bj_zero_run(b, 100, 0, 1), 0);
    CHECK_EQ(bj_zero_run(b, 0, 0, 1), 0);
    /* a non-zero byte at every position of the first 16 and after */
    for (size_t i = 0; i < 40; i++) {
        unsigned char c[40] = { 0 };
        c[i] = 0x80;
        CHECK(!bj_is_zero(c, 40));
        CHECK(bj_is_zero(c, i));
        CHECK_EQ(bj_zero_run(c, 40, 8, 1), i / 8 * 8);
        CHECK_EQ(bj_zero_run(c, 40, 8, 0), i < 8 ? 8 : 0);
    }
}

/* ext4 (or whatever /tmp is): punching frees the blocks, ZERO_RANGE keeps
 * them allocated; both read as zeroes. */
static void test_normal_fs(void)
{
    uint64_t size = 1 << 20;
    struct bj_zeroer z;
    bj_zeroer_init(&z);
    int fd = mkfile(dir, "n", size);
    fill(fd, 0, size);
    CHECK(fsync(fd) == 0);
    long long before = blocks(fd);
    CHECK_EQ(bj_zero_range(&z, fd, 65536, 262144, 1), 0);
    check_zeroed(fd, 65536, 262144, size);
    CHECK(blocks(fd) < before); /* punched */
    CHECK_EQ(lseek(fd, 65536, SEEK_HOLE), 65536);
    CHECK_EQ(atomic_load(&z.no_punch), 0);

    fill(fd, 0, size);
    CHECK(fsync(fd) == 0);
    before = blocks(fd);
    CHECK_EQ(bj_zero_range(&z, fd, 4096 + 7, 8192 + 3, 0), 0); /* unaligned */
    check_zeroed(fd, 4096 + 7, 8192 + 3, size);
    CHECK_EQ(blocks(fd), before); /* no punch when may_unmap=0 */
    CHECK_EQ(atomic_load(&z.no_zero_range), 0);
    close(fd);
}

/* tmpfs refuses ZERO_RANGE (EOPNOTSUPP): zeroes are written instead and the
 * refusal is remembered; punching works there. */
static void test_tmpfs(void)
{
    struct statfs sf;
    CHECK(statfs("/dev/shm", &sf) == 0);
    CHECK(sf.f_type == TMPFS_MAGIC);
    uint64_t size = 3 << 20;
    struct bj_zeroer z;
    bj_zeroer_init(&z);
    int fd = mkfile(shm, "t", size);
    fill(fd, 0, size);
    CHECK_EQ(fallocate(fd, FALLOC_FL_ZERO_RANGE, 0, 4096), -1); /* the premise */
    CHECK_EQ(errno, EOPNOTSUPP);
    CHECK_EQ(bj_zero_range(&z, fd, 100, (2 << 20) + 5, 0), 0); /* > 1 MiB of writes */
    check_zeroed(fd, 100, (2 << 20) + 5, size);
    CHECK_EQ(atomic_load(&z.no_zero_range), 1);
    CHECK_EQ(atomic_load(&z.no_punch), 0);
    fill(fd, 0, size);
    CHECK_EQ(bj_zero_range(&z, fd, 8192, 8192, 1), 0);
    check_zeroed(fd, 8192, 8192, size);
    CHECK_EQ(lseek(fd, 8192, SEEK_HOLE), 8192);
    CHECK_EQ(atomic_load(&z.no_punch), 0);
    close(fd);
}

/* The hook: refuses the modes in `refuse` with `err`, counts the calls per
 * rung, does the others with the real fallocate. */
static int refuse_punch, refuse_zero, refuse_err, calls_punch, calls_zero;

static int fake_fallocate(int fd, int mode, off_t off, off_t len)
{
    int punch = (mode & FALLOC_FL_PUNCH_HOLE) != 0;
    if (punch)
        calls_punch++;
    else
        calls_zero++;
    if (punch ? refuse_punch : refuse_zero) {
        errno = refuse_err;
        return -1;
    }
    return fallocate(fd, mode, off, len);
}

static void hook(struct bj_zeroer *z, int punch, int zero, int err)
{
    bj_zeroer_init(z);
    z->fallocate = fake_fallocate;
    refuse_punch = punch;
    refuse_zero = zero;
    refuse_err = err;
    calls_punch = calls_zero = 0;
}

static void test_refused_rungs(void)
{
    uint64_t size = 1 << 20;
    int fd = mkfile(dir, "h", size);
    struct bj_zeroer z;
    int refusals[] = { EOPNOTSUPP, ENOTSUP, ENOSYS, EINVAL };
    for (size_t k = 0; k < sizeof refusals / sizeof *refusals; k++) {
        /* punch refused: ZERO_RANGE does it, the punch is not asked again */
        hook(&z, 1, 0, refusals[k]);
        fill(fd, 0, size);
        CHECK_EQ(bj_zero_range(&z, fd, 4096, 65536, 1), 0);
        check_zeroed(fd, 4096, 65536, size);
        CHECK_EQ(calls_punch, 1);
        CHECK_EQ(calls_zero, 1);
        CHECK_EQ(atomic_load(&z.no_punch), 1);
        CHECK_EQ(atomic_load(&z.no_zero_range), 0);
        fill(fd, 0, size);
        CHECK_EQ(bj_zero_range(&z, fd, 131072, 4096, 1), 0);
        check_zeroed(fd, 131072, 4096, size);
        CHECK_EQ(calls_punch, 1);
        CHECK_EQ(calls_zero, 2);

        /* both refused: zeroes are written; neither is asked again */
        hook(&z, 1, 1, refusals[k]);
        fill(fd, 0, size);
        CHECK_EQ(bj_zero_range(&z, fd, 1000, 300000, 1), 0);
        check_zeroed(fd, 1000, 300000, size);
        CHECK_EQ(calls_punch, 1);
        CHECK_EQ(calls_zero, 1);
        CHECK_EQ(atomic_load(&z.no_punch), 1);
        CHECK_EQ(atomic_load(&z.no_zero_range), 1);
        fill(fd, 0, size);
        CHECK_EQ(bj_zero_range(&z, fd, 0, size, 1), 0);
        check_zeroed(fd, 0, size, size);
        CHECK_EQ(calls_punch, 1);
        CHECK_EQ(calls_zero, 1);

        /* ZERO_RANGE refused without unmap: the punch is never tried */
        hook(&z, 1, 1, refusals[k]);
        fill(fd, 0, size);
        CHECK_EQ(bj_zero_range(&z, fd, 512, 512, 0), 0);
        check_zeroed(fd, 512, 512, size);
        CHECK_EQ(calls_punch, 0);
        CHECK_EQ(calls_zero, 1);
        CHECK_EQ(atomic_load(&z.no_punch), 0);
        CHECK_EQ(atomic_load(&z.no_zero_range), 1);
    }
    /* a real error is no refusal: returned, not remembered, no next rung */
    hook(&z, 1, 0, EIO);
    fill(fd, 0, size);
    CHECK_EQ(bj_zero_range(&z, fd, 0, 4096, 1), -EIO);
    CHECK_EQ(calls_zero, 0);
    CHECK_EQ(atomic_load(&z.no_punch), 0);
    check_zeroed(fd, 0, 0, size); /* untouched */
    hook(&z, 0, 1, ENOSPC);
    CHECK_EQ(bj_zero_range(&z, fd, 0, 4096, 0), -ENOSPC);
    CHECK_EQ(atomic_load(&z.no_zero_range), 0);
    close(fd);
}

/* The last rung paced: pace sees every piece before it is written, in
 * pieces of at most `piece` bytes, and stopping it leaves exactly the pieces
 * before written. */
static uint64_t paced_bytes, paced_max;
static int paced_calls, paced_stop_at;
static int pace_count(void *ctx, uint64_t n)
{
    CHECK(ctx == &paced_bytes);
    if (paced_calls++ == paced_stop_at)
        return 1;
    paced_bytes += n;
    if (n > paced_max)
        paced_max = n;
    return 0;
}

static void test_paced(void)
{
    uint64_t size = 4 << 20;
    int fd = mkfile(dir, "p", size);
    struct bj_zeroer z;
    hook(&z, 1, 1, EOPNOTSUPP);
    fill(fd, 0, size);
    paced_bytes = paced_max = 0;
    paced_calls = 0;
    paced_stop_at = -1;
    CHECK_EQ(bj_zero_range_paced(&z, fd, 100, size - 200, 1, 65536, pace_count, &paced_bytes), 0);
    check_zeroed(fd, 100, size - 200, size);
    CHECK_EQ(paced_bytes, size - 200);
    CHECK_EQ(paced_max, 65536);
    CHECK_EQ(paced_calls, (int)((size - 200 + 65535) / 65536));
    /* piece 0 = 1 MiB; stopped at the 3rd piece: -ECANCELED, 2 pieces
     * zeroed, the rest not */
    fill(fd, 0, size);
    paced_bytes = 0;
    paced_calls = 0;
    paced_stop_at = 2;
    CHECK_EQ(bj_zero_range_paced(&z, fd, 0, size, 1, 0, pace_count, &paced_bytes), -ECANCELED);
    CHECK_EQ(paced_bytes, 2 << 20);
    check_zeroed(fd, 0, 2 << 20, size);
    /* a 64 KiB piece limit: stop after 2 pieces */
    fill(fd, 0, size);
    paced_bytes = 0;
    paced_calls = 0;
    paced_stop_at = 2;
    CHECK_EQ(bj_zero_range_paced(&z, fd, 0, size, 1, 65536, pace_count, &paced_bytes), -ECANCELED);
    CHECK_EQ(paced_bytes, 2 * 65536);
    check_zeroed(fd, 0, 2 * 65536, size);
    /* the fallocate rungs are never paced */
    hook(&z, 0, 0, 0);
    paced_calls = 0;
    paced_stop_at = 0;
    CHECK_EQ(bj_zero_range_paced(&z, fd, 0, size, 1, 65536, pace_count, &paced_bytes), 0);
    CHECK_EQ(paced_calls, 0);
    close(fd);
}

static void test_bad_args(void)
{
    struct bj_zeroer z;
    bj_zeroer_init(&z);
    int fd = mkfile(dir, "b", 4096);
    CHECK_EQ(bj_zero_range(NULL, fd, 0, 1, 1), -EINVAL);
    CHECK_EQ(bj_zero_range(&z, fd, 0, 0, 1), 0);
    CHECK_EQ(bj_zero_range(&z, fd, (uint64_t)INT64_MAX + 1, 1, 1), -EINVAL);
    CHECK_EQ(bj_zero_range(&z, fd, 1, (uint64_t)INT64_MAX, 1), -EINVAL);
    CHECK_EQ(bj_zero_range(&z, fd, 0, UINT64_MAX, 0), -EINVAL);
    CHECK_EQ(bj_zero_range(&z, -1, 0, 1, 1), -EBADF);
    CHECK_EQ(bj_zero_range(&z, -1, 0, 1, 0), -EBADF);
    /* every rung refused and the fd read-only: the write's error */
    int ro = open("/dev/zero", O_RDONLY);
    CHECK(ro >= 0);
    atomic_store(&z.no_punch, 1);
    atomic_store(&z.no_zero_range, 1);
    CHECK_EQ(bj_zero_range(&z, ro, 0, 1, 1), -EBADF);
    close(ro);
    close(fd);
}

/* Threads share one zeroer on tmpfs (ZERO_RANGE refused): the first refusal
 * is set while the others test the flag (the TSan build watches this). */
#define NTH 4
struct zarg {
    struct bj_zeroer *z;
    int fd, i;
};

static void *zeroer_thread(void *arg)
{
    struct zarg *a = arg;
    for (uint64_t k = 0; k < 16; k++)
        CHECK_EQ(bj_zero_range(a->z, a->fd, ((uint64_t)a->i * 16 + k) * 8192, 8192, 0), 0);
    return NULL;
}

static void test_shared(void)
{
    uint64_t size = NTH * 16 * 8192;
    int fd = mkfile(shm, "s", size);
    fill(fd, 0, size);
    struct bj_zeroer z;
    bj_zeroer_init(&z);
    pthread_t th[NTH];
    struct zarg args[NTH];
    for (int i = 0; i < NTH; i++) {
        args[i] = (struct zarg){ &z, fd, i };
        CHECK_EQ(pthread_create(&th[i], NULL, zeroer_thread, &args[i]), 0);
    }
    for (int i = 0; i < NTH; i++)
        CHECK_EQ(pthread_join(th[i], NULL), 0);
    check_zeroed(fd, 0, size, size);
    CHECK_EQ(atomic_load(&z.no_zero_range), 1);
    close(fd);
}

int main(void)
{
    CHECK(mkdtemp(dir) != NULL);
    CHECK(mkdtemp(shm) != NULL);
    test_scan();
    test_normal_fs();
    test_tmpfs();
    test_refused_rungs();
    test_bad_args();
    test_paced();
    test_shared();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s %s", dir, shm);
    CHECK(system(cmd) == 0);
    printf("test_zero: ok\n");
    return 0;
}
