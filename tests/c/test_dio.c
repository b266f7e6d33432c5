/* Tests of csrc/dio.c under the sanitizers: reads and writes of odd
 * offsets, lengths and buffer addresses on an O_DIRECT fd land as they
 * would on a buffered one (checked through a second, buffered fd), a
 * partial last block keeps the file's size, a read across the end stops
 * there, and a buffered fd is passed straight through (alignment 1).
 * Unaligned requests racing a thread that switches O_DIRECT on and off
 * (a daemon's blockdev-reopen under a job's copy) all succeed, and an
 * fd whose mode is not the one the caller believes (a stale alignment,
 * either way) is read and written right at the first retry. */
#include "check.h"
#include "dio.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define SIZE ((1u << 20) + 513u)

static uint32_t seed = 7;
static void fill(unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        p[i] = (unsigned char)(seed >> 16);
    }
}

static atomic_int stop_switch;

static void *switcher(void *arg)
{
    int fd = *(int *)arg;
    while (!atomic_load(&stop_switch)) {
        int fl = fcntl(fd, F_GETFL);
        fcntl(fd, F_SETFL, fl ^ O_DIRECT);
        sched_yield();      /* valgrind runs one thread at a time */
    }
    return NULL;
}

/* Before dio.c retried, about one in 10000 of these met EINVAL; with a
 * retry "in the mode the fd is in now", bounded at 16 tries, two in 60000
 * still did under TSan (the mode flipped back each time). */
static void racing_the_mode_switch(void)
{
    char path[] = "/tmp/bjdioXXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    CHECK(ftruncate(fd, 1 << 20) == 0);
    pthread_t t;
    CHECK(pthread_create(&t, NULL, switcher, &fd) == 0);
    unsigned char data[1000], back[1000];
    int failed = 0;
    for (int i = 0; i < 4000; i++) {
        memset(data, i % 251, sizeof data);
        uint64_t off = 4096 + 7 + (uint64_t)(i % 64) * 1000, fail = 0;
        if (bj_dio_pwrite(fd, data, sizeof data, off, &fail) != (int64_t)sizeof data)
            failed++;
        else if (bj_dio_pread(fd, back, sizeof back, off) != (int64_t)sizeof back ||
                 memcmp(back, data, sizeof data) != 0)
            failed++;
    }
    atomic_store(&stop_switch, 1);
    pthread_join(t, NULL);
    CHECK_EQ(failed, 0);
    close(fd);
    unlink(path);
}

/* The caller's alignment is stale: 1 on an fd now O_DIRECT (the request
 * goes unaligned and meets EINVAL), 4096 on one now buffered. */
static void stale_alignment(void)
{
    char path[] = "/tmp/bjdioXXXXXX";
    int bfd = mkstemp(path);
    CHECK(bfd >= 0);
    CHECK(ftruncate(bfd, 1 << 20) == 0);
    int dfd = open(path, O_RDWR | O_DIRECT);
    CHECK(dfd >= 0);
    unsigned char data[1000], back[1003];
    uint64_t fail = 0;
    memset(data, 0x5a, sizeof data);
    CHECK_EQ(bj_dio_pwrite_a(dfd, 1, data, sizeof data, 4103, &fail), (long long)sizeof data);
    CHECK_EQ(bj_dio_pread_a(dfd, 1, back + 3, sizeof data, 4103), (long long)sizeof data);
    CHECK(memcmp(back + 3, data, sizeof data) == 0);
    memset(data, 0xa5, sizeof data);
    CHECK_EQ(bj_dio_pwrite_a(bfd, 4096, data, sizeof data, 9000, &fail), (long long)sizeof data);
    CHECK_EQ(bj_dio_pread_a(bfd, 4096, back + 1, sizeof data, 9000), (long long)sizeof data);
    CHECK(memcmp(back + 1, data, sizeof data) == 0);
    CHECK_EQ(pread(bfd, back, sizeof data, 4103), (long long)sizeof data);
    CHECK(back[0] == 0x5a && back[999] == 0x5a);
    struct stat st;
    CHECK(fstat(bfd, &st) == 0);
    CHECK_EQ(st.st_size, 1 << 20);
    close(dfd);
    close(bfd);
    unlink(path);
}

int main(void)
{
    stale_alignment();
    racing_the_mode_switch();
    char path[] = "/tmp/bjdioXXXXXX";
    int bfd = mkstemp(path);
    CHECK(bfd >= 0);
    static unsigned char ref[4u << 20], got[(4u << 20) + 16];
    size_t size = SIZE;
    fill(ref, size);
    CHECK_EQ(pwrite(bfd, ref, size, 0), (long long)size);
    int fd = open(path, O_RDWR | O_DIRECT);
    CHECK(fd >= 0);
    uint32_t a = bj_dio_align(fd);
    CHECK(a == 512 || a == 4096);
    CHECK_EQ(bj_dio_align(bfd), 1);
    static const struct { uint64_t off, len; } w[] = {
        {0, 1}, {72, 8}, {4095, 2}, {SIZE - 5, 5}, {SIZE - 600, 600}, {1000, 1500000},
        {8192, 4096}, {SIZE + 100, 3}};
    unsigned char buf[1500001];
    for (size_t i = 0; i < sizeof(w) / sizeof(w[0]); i++) {
        /* an odd buffer address too */
        fill(buf + 1, w[i].len);
        uint64_t fail = 0;
        CHECK_EQ(bj_dio_pwrite(fd, buf + 1, w[i].len, w[i].off, &fail), (long long)w[i].len);
        if (w[i].off > size)
            memset(ref + size, 0, w[i].off - size);
        memcpy(ref + w[i].off, buf + 1, w[i].len);
        if (w[i].off + w[i].len > size)
            size = w[i].off + w[i].len;
        struct stat st;
        CHECK(fstat(fd, &st) == 0);
        CHECK_EQ(st.st_size, (long long)size);
        uint64_t start = w[i].off ? w[i].off - 1 : 0;
        int64_t n = bj_dio_pread(fd, got + 3, w[i].len + 7, start);
        uint64_t want = start + w[i].len + 7 <= size ? w[i].len + 7 : size - start;
        CHECK_EQ(n, (long long)want);
        CHECK(memcmp(got + 3, ref + start, want) == 0);
    }
    CHECK_EQ(bj_dio_pread(fd, got, 4096, size - 10), 10);
    CHECK_EQ(bj_dio_pread(fd, got, 4096, size + 4096), 0);
    CHECK_EQ(pread(bfd, got, sizeof got, 0), (long long)size);
    CHECK(memcmp(got, ref, size) == 0);
    close(fd);
    close(bfd);
    unlink(path);
    printf("test_dio: ok\n");
    return 0;
}
