/* Tests of csrc/extents.c (SEEK_DATA/SEEK_HOLE walks) on the normal file
 * system and on tmpfs: sparse layouts against a model, ranges clipped to
 * the file and past its end, resuming when the output is full, and bad
 * input (directories, pipes, closed fds, NULL, overflow). */
#include "check.h"
#include "extents.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define K 65536ull /* layout unit: a multiple of every block size here */

static char dir[] = "/tmp/bjextXXXXXX";
static char shm[] = "/dev/shm/bjextXXXXXX";

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
    memset(buf, 0x77, sizeof buf);
    while (len) {
        size_t n = len < sizeof buf ? len : sizeof buf;
        CHECK(pwrite(fd, buf, n, (off_t)off) == (ssize_t)n);
        off += n;
        len -= n;
    }
}

/* The layout: units of K, '#' data, '.' hole; the file is `tail` bytes
 * longer than the units (data when the last unit is data). */
static const char layout[] = "..##.#...####.#.....##";
#define UNITS (sizeof layout - 1)

static int make_layout(const char *d, uint64_t tail)
{
    int fd = mkfile(d, "l", UNITS * K + tail);
    for (size_t i = 0; i < UNITS; i++)
        if (layout[i] == '#')
            fill(fd, i * K, K + (i == UNITS - 1 ? tail : 0));
    return fd;
}

static int model_data(uint64_t off)
{
    size_t i = (size_t)(off / K);
    return i < UNITS ? layout[i] == '#' : layout[UNITS - 1] == '#';
}

/* Walk [off, off+len) with room for `max` extents at a time, check the
 * answer is adjacent, in order, merged, and agrees with the model (data
 * inside the file, hole past size). Returns the number of extents. */
static size_t walk(int fd, uint64_t off, uint64_t len, uint64_t size, size_t max)
{
    struct bj_extent ex[64];
    uint64_t pos = off, end = off + len;
    size_t total = 0;
    int last_flags = -1;
    CHECK(max <= 64);
    while (pos < end) {
        size_t n = 99;
        uint64_t next = 0;
        CHECK_EQ(bj_extents(fd, pos, end - pos, ex, max, &n, &next), 0);
        if (n < 1 || n > max) {
            fprintf(stderr, "[%llu, %llu) of a %llu-byte file: %zu extents\n",
                    (unsigned long long)pos, (unsigned long long)end, (unsigned long long)size, n);
            exit(1);
        }
        CHECK(next > pos && next <= end);
        uint64_t at = pos;
        for (size_t i = 0; i < n; i++) {
            CHECK_EQ(ex[i].offset, at);
            CHECK(ex[i].length > 0);
            CHECK((int)ex[i].flags != last_flags || i == 0); /* merged within a call */
            for (uint64_t b = ex[i].offset; b < ex[i].offset + ex[i].length; b += 512) {
                int want = b < size && model_data(b);
                if (want != (int)(ex[i].flags & BJ_EXTENT_DATA)) {
                    fprintf(stderr, "offset %llu: flags %u\n", (unsigned long long)b,
                            ex[i].flags);
                    exit(1);
                }
            }
            at += ex[i].length;
            last_flags = (int)ex[i].flags;
        }
        last_flags = -1;
        CHECK_EQ(at, next);
        pos = next;
        total += n;
    }
    return total;
}

static void test_layout(const char *d)
{
    uint64_t tails[] = { 0, 100, 4096 + 1 };
    for (size_t t = 0; t < sizeof tails / sizeof *tails; t++) {
        uint64_t size = UNITS * K + tails[t];
        int fd = make_layout(d, tails[t]);
        /* the whole file: runs of the layout, one extent each */
        size_t runs = 1;
        for (size_t i = 1; i < UNITS; i++)
            runs += layout[i] != layout[i - 1];
        CHECK_EQ(walk(fd, 0, size, size, 64), runs);
        /* one extent at a time: resumes where it stopped */
        CHECK_EQ(walk(fd, 0, size, size, 1), runs);
        /* unaligned windows, inside extents and across them, past the end */
        uint64_t offs[] = { 0, 1, K - 1, 2 * K + 17, 5 * K, size - 1 };
        uint64_t lens[] = { 1, 511, K, 3 * K + 5, 100 * K };
        for (size_t i = 0; i < sizeof offs / sizeof *offs; i++)
            for (size_t j = 0; j < sizeof lens / sizeof *lens; j++) {
                walk(fd, offs[i], lens[j], size, 64);
                walk(fd, offs[i], lens[j], size, 2);
            }
        close(fd);
    }
}

static void test_edges(const char *d)
{
    struct bj_extent ex[4];
    size_t n;
    uint64_t next;
    /* empty file: all of the range is a hole past EOF */
    int fd = mkfile(d, "e", 0);
    CHECK_EQ(bj_extents(fd, 0, 4096, ex, 4, &n, &next), 0);
    CHECK_EQ(n, 1);
    CHECK_EQ(ex[0].offset, 0);
    CHECK_EQ(ex[0].length, 4096);
    CHECK_EQ(ex[0].flags, 0);
    CHECK_EQ(next, 4096);
    /* a zero-length range describes nothing */
    CHECK_EQ(bj_extents(fd, 100, 0, ex, 4, &n, &next), 0);
    CHECK_EQ(n, 0);
    CHECK_EQ(next, 100);
    close(fd);
    /* all data, the range ends past EOF: data then hole; with one slot the
     * walk resumes at EOF */
    fd = mkfile(d, "f", 0);
    fill(fd, 0, 3 * K);
    CHECK_EQ(bj_extents(fd, K, 4 * K, ex, 4, &n, &next), 0);
    CHECK_EQ(n, 2);
    CHECK_EQ(ex[0].offset, K);
    CHECK_EQ(ex[0].length, 2 * K);
    CHECK_EQ(ex[0].flags, BJ_EXTENT_DATA);
    CHECK_EQ(ex[1].offset, 3 * K);
    CHECK_EQ(ex[1].length, 2 * K);
    CHECK_EQ(ex[1].flags, 0);
    CHECK_EQ(next, 5 * K);
    CHECK_EQ(bj_extents(fd, K, 4 * K, ex, 1, &n, &next), 0);
    CHECK_EQ(n, 1);
    CHECK_EQ(next, 3 * K);
    /* entirely past EOF */
    CHECK_EQ(bj_extents(fd, 10 * K, K, ex, 4, &n, &next), 0);
    CHECK_EQ(n, 1);
    CHECK_EQ(ex[0].flags, 0);
    CHECK_EQ(next, 11 * K);
    close(fd);
}

static void test_bad_input(void)
{
    struct bj_extent ex[4];
    size_t n = 99;
    uint64_t next = 99;
    int fd = mkfile(dir, "b", K);
    CHECK_EQ(bj_extents(fd, 0, 1, NULL, 4, &n, &next), -EINVAL);
    CHECK_EQ(bj_extents(fd, 0, 1, ex, 0, &n, &next), -EINVAL);
    CHECK_EQ(bj_extents(fd, 0, 1, ex, 4, NULL, &next), -EINVAL);
    CHECK_EQ(bj_extents(fd, 0, 1, ex, 4, &n, NULL), -EINVAL);
    CHECK_EQ(bj_extents(fd, UINT64_MAX, 2, ex, 4, &n, &next), -EINVAL);
    CHECK_EQ(bj_extents(fd, 1, UINT64_MAX, ex, 4, &n, &next), -EINVAL);
    CHECK_EQ(n, 0);
    close(fd);
    CHECK_EQ(bj_extents(fd, 0, 1, ex, 4, &n, &next), -EBADF); /* closed */
    CHECK_EQ(bj_extents(-1, 0, 1, ex, 4, &n, &next), -EBADF);
    int d = open(dir, O_RDONLY | O_DIRECTORY);
    CHECK(d >= 0);
    CHECK_EQ(bj_extents(d, 0, 1, ex, 4, &n, &next), -EISDIR);
    close(d);
    int p[2];
    CHECK(pipe(p) == 0);
    CHECK_EQ(bj_extents(p[0], 0, 1, ex, 4, &n, &next), -ESPIPE);
    close(p[0]);
    close(p[1]);
    /* a device without SEEK_DATA reads as all data */
    int z = open("/dev/zero", O_RDONLY);
    CHECK(z >= 0);
    CHECK_EQ(bj_extents(z, 0, K, ex, 4, &n, &next), 0);
    CHECK_EQ(n, 1);
    CHECK_EQ(ex[0].flags, BJ_EXTENT_DATA);
    CHECK_EQ(ex[0].length, K);
    CHECK_EQ(next, K);
    close(z);
}

/* bj_zero_blocks: per block, zero or not, against what was written: data
 * in the first read (512 bytes), only past it (the second read), past the
 * first MiB of a big block (the chunked reads), zeroes written as data,
 * holes, a short last block, a range past the end of the file; bad input. */
static void test_zero_blocks(const char *d)
{
    int fd = mkfile(d, "z", 80 * K);
    unsigned char one = 1, z[8192];
    memset(z, 0, sizeof z);
    CHECK(pwrite(fd, &one, 1, (off_t)(1 * K + 7)) == 1);          /* block 1: head */
    CHECK(pwrite(fd, &one, 1, (off_t)(2 * K + 40000)) == 1);      /* block 2: past the head */
    CHECK(pwrite(fd, z, sizeof z, (off_t)(3 * K)) == (ssize_t)sizeof z); /* 3: zero data */
    CHECK(pwrite(fd, &one, 1, (off_t)(4 * K - 1)) == 1);          /* 3's last byte: no */
    CHECK(pwrite(fd, &one, 1, (off_t)(32 * K + 1500000)) == 1);   /* a 2 MiB block, late */
    uint8_t out[64];
    memset(out, 0xee, sizeof out);
    CHECK(bj_zero_blocks(fd, 0, 6 * K, K, out, 6) == 0);
    CHECK(out[0] == 1 && out[1] == 0 && out[2] == 0 && out[3] == 0 && out[4] == 1 &&
          out[5] == 1);
    CHECK(out[6] == 0xee);                                        /* nothing past n */
    CHECK(bj_zero_blocks(fd, 32 * K, 48 * K, 32 * K, out, 2) == 0); /* 1 MiB chunks */
    CHECK(out[0] == 0 && out[1] == 1);
    /* unaligned start, a short last block, past the end of the file */
    CHECK(bj_zero_blocks(fd, K + 8, K - 8 + 100, K - 8, out, 2) == 0);
    CHECK(out[0] == 1 && out[1] == 1);
    CHECK(bj_zero_blocks(fd, K, 100, 4096, out, 1) == 0);
    CHECK(out[0] == 0);
    CHECK(bj_zero_blocks(fd, 79 * K, 3 * K, K, out, 3) == 0);
    CHECK(out[0] == 1 && out[1] == 1 && out[2] == 1);
    CHECK(bj_zero_blocks(fd, 0, 0, K, NULL, 0) == 0);
    /* bad input */
    CHECK(bj_zero_blocks(fd, 0, 6 * K, K, out, 5) == -EINVAL);    /* out too small */
    CHECK(bj_zero_blocks(fd, 0, K, 0, out, 64) == -EINVAL);
    CHECK(bj_zero_blocks(fd, 0, K, K, NULL, 1) == -EINVAL);
    CHECK(bj_zero_blocks(-1, 0, K, K, out, 1) == -EINVAL);
    CHECK(bj_zero_blocks(fd, UINT64_MAX, 2, 1, out, 2) == -EINVAL);
    close(fd);
    CHECK(bj_zero_blocks(fd, 0, K, K, out, 1) == -EBADF);
    int dfd = open(d, O_RDONLY | O_DIRECTORY);
    CHECK(dfd >= 0);
    CHECK(bj_zero_blocks(dfd, 0, K, K, out, 1) == -EISDIR);
    close(dfd);
}

int main(void)
{
    CHECK(mkdtemp(dir) != NULL);
    CHECK(mkdtemp(shm) != NULL);
    test_layout(dir);
    test_layout(shm);
    test_edges(dir);
    test_edges(shm);
    test_bad_input();
    test_zero_blocks(dir);
    test_zero_blocks(shm);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s %s", dir, shm);
    CHECK(system(cmd) == 0);
    printf("test_extents: ok\n");
    return 0;
}
