/* Tests of csrc/nbdsrv.c (the NBD export's C data path) over a socketpair:
 * headers read ahead and split at a WRITE (its payload left for
 * bj_nbds_recv), a partial header kept for the next call, simple and
 * structured READ replies (OFFSET_DATA, OFFSET_HOLE runs, DF: one data
 * chunk), bytes past the end of the file as an EIO error or as zeroes,
 * segments that do not add up refused, many reads in flight each answered
 * once by handle, a client gone mid-reply (the session breaks, every
 * token still comes back), a token back before its reply is sent (a
 * client that does not read), EOF; a raw file's holes as OFFSET_HOLE
 * chunks and HOLE|ZERO extents, block status replies (REQ_ONE, merged
 * neighbours, the 65536-extent cap, a client gone before one); worker
 * threads taken on demand from the process's pool (none for a session that
 * reads nothing), parked and reused by the next sessions; bj_nbds_queue
 * (no wait for free workers) and bj_nbds_wait_free (as many as asked, or
 * half); the process's one reaper for the tokens of many sessions, and
 * their drains; the handshake's common options (bj_nbdh_step: nbdcopy's sent a
 * byte at a time, what it leaves to the caller); zero-copy replies of
 * stable reads, and where they fall back on pread; bj_nbds_serve_one (a
 * request served in the caller's thread, its token handed to the reaper
 * when the send must wait); no leak
 * (ASan, valgrind), no race (TSan). */
#include "check.h"
#include "nbdsrv.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#define FSIZE (256u * 1024u)

static unsigned char file[FSIZE];

static void put32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24); p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8); p[3] = (unsigned char)v;
}
static void put64(unsigned char *p, uint64_t v) { put32(p, (uint32_t)(v >> 32)); put32(p + 4, (uint32_t)v); }
static uint32_t get32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static uint64_t get64(const unsigned char *p) { return (uint64_t)get32(p) << 32 | get32(p + 4); }

static void request(int fd, uint16_t flags, uint16_t type, uint64_t handle, uint64_t off,
                    uint32_t len)
{
    unsigned char h[28];
    put32(h, 0x25609513u);
    h[4] = (unsigned char)(flags >> 8); h[5] = (unsigned char)flags;
    h[6] = (unsigned char)(type >> 8); h[7] = (unsigned char)type;
    put64(h + 8, handle);
    put64(h + 16, off);
    put32(h + 24, len);
    CHECK_EQ(write(fd, h, sizeof(h)), sizeof(h));
}

static void readn(int fd, void *buf, size_t n)
{
    unsigned char *p = buf;
    while (n) {
        ssize_t k = read(fd, p, n);
        CHECK(k > 0);
        p += k;
        n -= (size_t)k;
    }
}

/* A structured error chunk from fd: its 20-byte header into h (checked:
 * type ERROR), its payload read; returns the chunk's error number. */
static uint32_t error_chunk(int fd, unsigned char *h)
{
    unsigned char payload[256];
    readn(fd, h, 20);
    CHECK_EQ(h[6], 0x80);
    uint32_t n = get32(h + 16);
    CHECK(n >= 6 && n < sizeof(payload));
    readn(fd, payload, n);
    return get32(payload);
}

static void take_tokens(struct bj_nbds *s, int want)
{
    uint64_t done[64];
    int got = 0;
    while (got < want) {
        int n = bj_nbds_wait_done(s, done, 64);
        CHECK(n > 0);
        got += n;
    }
    CHECK_EQ(got, want);
}

static void test_headers_and_simple_reads(int dfd)
{
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    struct bj_nbds *s = bj_nbds_new(sv[0], 0, 2);
    CHECK(s);
    struct bj_nbds_req r[8];
    /* two reads, a write with its payload, a flush: split after the write */
    request(sv[1], 0, 0, 1, 0, 4096);
    request(sv[1], 0, 0, 2, 8192, 100);
    request(sv[1], 1, 1, 3, 0, 5);
    CHECK_EQ(write(sv[1], "hello", 5), 5);
    request(sv[1], 0, 3, 4, 0, 0);
    int n = 0;
    while (n < 3) {
        int k = bj_nbds_next(s, r + n, 8);
        CHECK(k > 0);
        n += k;
        if (r[n - 1].type == 1)
            break;
    }
    CHECK_EQ(n, 3);
    CHECK_EQ(r[0].handle, 1);
    CHECK_EQ(r[1].offset, 8192);
    CHECK_EQ(r[1].length, 100);
    CHECK_EQ(r[2].type, 1);
    CHECK_EQ(r[2].flags, 1);
    char payload[5];
    CHECK_EQ(bj_nbds_recv(s, payload, 5), 0);
    CHECK(memcmp(payload, "hello", 5) == 0);
    CHECK_EQ(bj_nbds_next(s, r, 8), 1);
    CHECK_EQ(r[0].type, 3);
    /* a partial header waits for the rest */
    unsigned char half[28];
    put32(half, 0x25609513u);
    memset(half + 4, 0, 24);
    half[27] = 9;
    CHECK_EQ(write(sv[1], half, 10), 10);
    CHECK_EQ(write(sv[1], half + 10, 18), 18);
    CHECK_EQ(bj_nbds_next(s, r, 8), 1);
    CHECK_EQ(r[0].length, 9);
    /* serve the two reads */
    uint64_t q[12] = {1, 0, 4096, 0, 11, 1, 2, 8192, 100, 0, 12, 1};
    uint64_t g[8] = {BJ_NBDS_DATA, (uint64_t)dfd, 0, 4096, BJ_NBDS_DATA, (uint64_t)dfd, 8192, 100};
    CHECK(bj_nbds_submit(s, q, 2, g, 2) > 0);
    for (int i = 0; i < 2; i++) {
        unsigned char h[16], data[4096];
        readn(sv[1], h, 16);
        CHECK_EQ(get32(h), 0x67446698u);
        CHECK_EQ(get32(h + 4), 0);
        uint64_t hd = get64(h + 8);
        CHECK(hd == 1 || hd == 2);
        size_t len = hd == 1 ? 4096 : 100;
        readn(sv[1], data, len);
        CHECK(memcmp(data, file + (hd == 1 ? 0 : 8192), len) == 0);
    }
    take_tokens(s, 2);
    /* past the end of the file: EIO (DATA) */
    uint64_t q2[6] = {5, FSIZE - 10, 20, 0, 13, 1};
    uint64_t g2[4] = {BJ_NBDS_DATA, (uint64_t)dfd, FSIZE - 10, 20};
    CHECK(bj_nbds_submit(s, q2, 1, g2, 1) > 0);
    unsigned char h[16];
    readn(sv[1], h, 16);
    CHECK_EQ(get32(h + 4), EIO);
    CHECK_EQ(get64(h + 8), 5);
    take_tokens(s, 1);
    /* segments that do not add up, an unknown kind: refused, nothing queued */
    uint64_t bad[6] = {6, 0, 20, 0, 14, 1};
    uint64_t gbad[4] = {BJ_NBDS_DATA, (uint64_t)dfd, 0, 19};
    CHECK_EQ(bj_nbds_submit(s, bad, 1, gbad, 1), -EINVAL);
    gbad[0] = 7;
    gbad[3] = 20;
    CHECK_EQ(bj_nbds_submit(s, bad, 1, gbad, 1), -EINVAL);
    bad[5] = 2;
    CHECK_EQ(bj_nbds_submit(s, bad, 1, gbad, 1), -EINVAL);
    bj_nbds_wait_idle(s);
    CHECK_EQ(bj_nbds_inflight(s), 0);
    /* a reply of Python's goes out whole */
    const void *parts[2] = {"abc", "de"};
    size_t lens[2] = {3, 2};
    CHECK_EQ(bj_nbds_send(s, parts, lens, 2), 0);
    char five[5];
    readn(sv[1], five, 5);
    CHECK(memcmp(five, "abcde", 5) == 0);
    /* EOF */
    close(sv[1]);
    CHECK_EQ(bj_nbds_next(s, r, 8), -ECONNRESET);
    bj_nbds_wait_idle(s);
    bj_nbds_stop_done(s);
    CHECK_EQ(bj_nbds_wait_done(s, (uint64_t[1]){0}, 1), 0);
    bj_nbds_free(s);
    close(sv[0]);
}

static void test_structured(int dfd)
{
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    struct bj_nbds *s = bj_nbds_new(sv[0], 1, 1);
    CHECK(s);
    /* data 1000, data (padded past EOF) 24, zero 2000, data 500 */
    uint64_t q[6] = {9, 4096, 3524, 0, 1, 4};
    uint64_t g[16] = {BJ_NBDS_DATA, (uint64_t)dfd, 0, 1000,
                      BJ_NBDS_DATA_PAD, (uint64_t)dfd, FSIZE - 4, 24,
                      BJ_NBDS_ZERO, 0, 0, 2000,
                      BJ_NBDS_DATA, (uint64_t)dfd, 10000, 500};
    CHECK(bj_nbds_submit(s, q, 1, g, 4) > 0);
    unsigned char h[32], data[1024];
    /* data chunk of 1024 */
    readn(sv[1], h, 28);
    CHECK_EQ(get32(h), 0x668e33efu);
    CHECK_EQ(h[5], 0);                      /* not DONE */
    CHECK_EQ(h[7], 1);                      /* OFFSET_DATA */
    CHECK_EQ(get64(h + 8), 9);
    CHECK_EQ(get32(h + 16), 8 + 1024);
    CHECK_EQ(get64(h + 20), 4096);
    readn(sv[1], data, 1024);
    CHECK(memcmp(data, file, 1000) == 0);
    CHECK(memcmp(data + 1000, file + FSIZE - 4, 4) == 0);
    for (int i = 1004; i < 1024; i++)
        CHECK_EQ(data[i], 0);
    /* hole of 2000 */
    readn(sv[1], h, 32);
    CHECK_EQ(h[7], 2);
    CHECK_EQ(get32(h + 16), 12);
    CHECK_EQ(get64(h + 20), 4096 + 1024);
    CHECK_EQ(get32(h + 28), 2000);
    /* the last data chunk, DONE */
    readn(sv[1], h, 28);
    CHECK_EQ(h[5], 1);
    CHECK_EQ(h[7], 1);
    CHECK_EQ(get64(h + 20), 4096 + 3024);
    readn(sv[1], data, 500);
    CHECK(memcmp(data, file + 10000, 500) == 0);
    take_tokens(s, 1);
    /* DF: one data chunk, the hole as zeroes */
    uint64_t q2[6] = {10, 0, 3000, 4, 2, 2};
    uint64_t g2[8] = {BJ_NBDS_ZERO, 0, 0, 1000, BJ_NBDS_DATA, (uint64_t)dfd, 0, 2000};
    CHECK(bj_nbds_submit(s, q2, 1, g2, 2) > 0);
    unsigned char big[3000];
    readn(sv[1], h, 28);
    CHECK_EQ(h[5], 1);
    CHECK_EQ(get32(h + 16), 3008);
    readn(sv[1], big, 3000);
    for (int i = 0; i < 1000; i++)
        CHECK_EQ(big[i], 0);
    CHECK(memcmp(big + 1000, file, 2000) == 0);
    take_tokens(s, 1);
    /* an error as a structured error chunk */
    uint64_t q3[6] = {11, 0, 64, 0, 3, 1};
    uint64_t g3[4] = {BJ_NBDS_DATA, (uint64_t)dfd, FSIZE, 64};
    CHECK(bj_nbds_submit(s, q3, 1, g3, 1) > 0);
    CHECK_EQ(error_chunk(sv[1], h), EIO);
    CHECK_EQ(h[5], 1);
    CHECK_EQ(get32(h) , 0x668e33efu);
    CHECK_EQ(h[7], 1);
    take_tokens(s, 1);
    bj_nbds_stop_done(s);
    bj_nbds_free(s);
    close(sv[0]);
    close(sv[1]);
}

struct client {
    int fd;
    const uint64_t *q;
    int n;
};

/* Read n simple replies of the reads in q (any order), check each once. */
static void *client_reads(void *arg)
{
    struct client *c = arg;
    static int seen[256];
    static unsigned char data[4096];
    for (int k = 0; k < c->n; k++) {
        unsigned char h[16];
        readn(c->fd, h, 16);
        CHECK_EQ(get32(h + 4), 0);
        uint64_t i = get64(h + 8) - 1000;
        CHECK(i < (uint64_t)c->n && !seen[i]);
        seen[i] = 1;
        readn(c->fd, data, c->q[6 * i + 2]);
        CHECK(memcmp(data, file + c->q[6 * i + 1], c->q[6 * i + 2]) == 0);
    }
    return NULL;
}

/* Many reads in flight (4 workers), then the client goes away mid-reply. */
static void test_many_and_gone(int dfd)
{
    enum { N = 200 };
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    struct bj_nbds *s = bj_nbds_new(sv[0], 0, 4);
    CHECK(s);
    static uint64_t q[6 * N], g[4 * N];
    for (int i = 0; i < N; i++) {
        uint64_t off = (uint64_t)(i * 997) % (FSIZE - 4096), len = 1 + (uint64_t)(i * 31) % 4096;
        uint64_t *r = q + 6 * i, *w = g + 4 * i;
        r[0] = 1000 + (uint64_t)i; r[1] = off; r[2] = len; r[3] = 0; r[4] = (uint64_t)i; r[5] = 1;
        w[0] = BJ_NBDS_DATA; w[1] = (uint64_t)dfd; w[2] = off; w[3] = len;
    }
    /* the client reads the replies meanwhile (submit waits for a free worker) */
    struct client c = {sv[1], q, N};
    pthread_t t;
    CHECK(pthread_create(&t, NULL, client_reads, &c) == 0);
    CHECK(bj_nbds_submit(s, q, N, g, N) > 0);
    take_tokens(s, N);
    CHECK(pthread_join(t, NULL) == 0);
    /* a client that asks for a lot and closes without reading it */
    for (int i = 0; i < 64; i++) {
        uint64_t *r = q + 6 * i, *w = g + 4 * i;
        r[1] = 0; r[2] = FSIZE; w[2] = 0; w[3] = FSIZE;
    }
    close(sv[1]);
    CHECK(bj_nbds_submit(s, q, 64, g, 64) > 0);
    take_tokens(s, 64);
    const void *parts[1] = {"x"};
    size_t lens[1] = {1};
    CHECK(bj_nbds_send(s, parts, lens, 1) < 0);
    struct bj_nbds_req r[4];
    CHECK(bj_nbds_next(s, r, 4) < 0);
    bj_nbds_stop_done(s);
    bj_nbds_free(s);
    close(sv[0]);
}

/* The end of a session of 2 workers over the socket pair sv: idle, both
 * workers free, ended; the pair closed. */
static void end_two_worker_session(struct bj_nbds *s, int sv[2])
{
    bj_nbds_wait_idle(s);
    CHECK_EQ(bj_nbds_wait_slots(s), 2);
    bj_nbds_stop_done(s);
    bj_nbds_free(s);
    close(sv[0]);
    close(sv[1]);
}

/* A client that does not read its replies: the read's token comes back
 * while its reply still waits to be sent (no write of another client waits
 * for it meanwhile). */
static void test_token_before_send(int dfd)
{
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    struct bj_nbds *s = bj_nbds_new(sv[0], 0, 2);
    CHECK(s);
    CHECK_EQ(bj_nbds_wait_slots(s), 2);
    uint64_t q[6] = {1, 0, FSIZE, 0, 42, 1};
    uint64_t g[4] = {BJ_NBDS_DATA, (uint64_t)dfd, 0, FSIZE};
    CHECK(bj_nbds_submit(s, q, 1, g, 1) > 0);
    uint64_t t = 0;
    CHECK_EQ(bj_nbds_wait_done(s, &t, 1), 1);
    CHECK_EQ(t, 42);
    static unsigned char data[FSIZE];
    unsigned char h[16];
    readn(sv[1], h, 16);
    readn(sv[1], data, FSIZE);
    CHECK(memcmp(data, file, FSIZE) == 0);
    end_two_worker_session(s, sv);
}


/* bj_nbds_queue queues without waiting for free workers: two reads larger
 * than the socket takes, for a client that reads nothing yet, with both
 * workers of the session busy sending them -- it returns at once (0 free;
 * bj_nbds_submit would wait for the client), and the replies come whole
 * once the client reads. */
/* n segments, each the whole data file (DATA, offset 0, FSIZE) */
static void whole_file_segs(uint64_t *g, int n, int dfd)
{
    for (int i = 0; i < n; i++) {
        g[4 * i] = BJ_NBDS_DATA;
        g[4 * i + 1] = (uint64_t)dfd;
        g[4 * i + 2] = 0;
        g[4 * i + 3] = FSIZE;
    }
}

static void test_queue_does_not_wait(int dfd)
{
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    struct bj_nbds *s = bj_nbds_new(sv[0], 0, 2);
    CHECK(s);
    /* 4 MiB each: the file 16 times over */
    uint64_t q[12] = {1, 0, 16 * FSIZE, 0, 1, 16, 2, 0, 16 * FSIZE, 0, 2, 16};
    uint64_t g[32 * 4];
    whole_file_segs(g, 32, dfd);
    CHECK_EQ(bj_nbds_queue(s, q, 2, g, 32), 0);
    static unsigned char data[FSIZE];
    unsigned char h[16];
    for (int i = 0; i < 2; i++) {
        readn(sv[1], h, 16);
        CHECK_EQ(get32(h), 0x67446698u);
        CHECK(get64(h + 8) == 1 || get64(h + 8) == 2);
        for (int k = 0; k < 16; k++) {
            readn(sv[1], data, FSIZE);
            CHECK(memcmp(data, file, FSIZE) == 0);
        }
    }
    take_tokens(s, 2);
    end_two_worker_session(s, sv);
}


struct waiter {
    struct bj_nbds *s;
    int want, got;
};

static void *wait_free_thread(void *arg)
{
    struct waiter *w = arg;
    w->got = bj_nbds_wait_free(w->s, w->want);
    return NULL;
}

/* bj_nbds_wait_free waits for as many free workers as asked, or half of
 * them: 4 workers busy sending 4 MiB replies to a client that reads them
 * one after the other; a waiter for 8 returns with at least 2 free. */
static void test_wait_free(int dfd)
{
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    struct bj_nbds *s = bj_nbds_new(sv[0], 0, 4);
    CHECK(s);
    CHECK_EQ(bj_nbds_wait_free(s, 8), 4);
    CHECK_EQ(bj_nbds_wait_free(s, 0), 4);
    uint64_t q[4 * 6], g[4 * 16 * 4];
    for (int i = 0; i < 4; i++) {
        uint64_t *r = q + 6 * i;
        r[0] = (uint64_t)i + 1; r[1] = 0; r[2] = 16 * FSIZE; r[3] = 0; r[4] = (uint64_t)i + 1;
        r[5] = 16;
    }
    whole_file_segs(g, 64, dfd);
    CHECK_EQ(bj_nbds_queue(s, q, 4, g, 64), 0);
    struct waiter w = {s, 8, -1};
    pthread_t t;
    CHECK(pthread_create(&t, NULL, wait_free_thread, &w) == 0);
    static unsigned char data[FSIZE];
    unsigned char h[16];
    for (int i = 0; i < 4; i++) {
        readn(sv[1], h, 16);
        CHECK_EQ(get32(h), 0x67446698u);
        for (int k = 0; k < 16; k++) {
            readn(sv[1], data, FSIZE);
            CHECK(memcmp(data, file, FSIZE) == 0);
        }
    }
    pthread_join(t, NULL);
    CHECK(w.got >= 2 && w.got <= 4);
    take_tokens(s, 4);
    bj_nbds_wait_idle(s);
    CHECK_EQ(bj_nbds_wait_free(s, 3), 4);
    bj_nbds_stop_done(s);
    bj_nbds_free(s);
    close(sv[0]);
    close(sv[1]);
}


/* The flags word of a block status request: NBD flags, the command, the
 * meta context's id (nbdsrv.h). */
static uint64_t bs_flags(uint64_t nbd_flags, uint64_t ctx)
{
    return nbd_flags | 7u << 16 | ctx << 32;
}

/* A block status reply: its extents into ext (pairs), their number. */
static size_t read_status(int fd, uint64_t handle, uint32_t ctx, uint32_t *ext, size_t max)
{
    unsigned char h[24];
    readn(fd, h, 24);
    CHECK_EQ(get32(h), 0x668e33efu);
    CHECK_EQ(h[5], 1);                      /* DONE */
    CHECK_EQ(h[7], 5);                      /* BLOCK_STATUS */
    CHECK_EQ(get64(h + 8), handle);
    uint32_t n = get32(h + 16);
    CHECK(n >= 12 && (n - 4) % 8 == 0 && (n - 4) / 8 <= max);
    CHECK_EQ(get32(h + 20), ctx);
    static unsigned char buf[8u << 16];
    readn(fd, buf, n - 4);
    for (size_t i = 0; i < (n - 4) / 4; i++)
        ext[i] = get32(buf + 4 * i);
    return (n - 4) / 8;
}

/* A raw file with holes: structured reads send them as OFFSET_HOLE chunks
 * (with DF, and in simple replies, as zeroes), block status reports them
 * HOLE|ZERO (REQ_ONE: the first extent only); qcow2-like segments (data
 * clusters, zeroes) as extents with neighbours merged; a request of more
 * than 65536 extents gets 65536; block status refused without structured
 * replies, an unknown command refused; a client gone before its block
 * status reply. */
static void test_holes_and_status(void)
{
    char path[] = "/tmp/bjnbdsXXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    unlink(path);
    CHECK(ftruncate(fd, 1 << 20) == 0);
    CHECK_EQ(pwrite(fd, file, 65536, 65536), 65536);
    CHECK_EQ(pwrite(fd, file + 4096, 4096, 512 << 10), 4096);
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    struct bj_nbds *s = bj_nbds_new(sv[0], 1, 2);
    CHECK(s);
    /* READ of [32K, 1M): hole 32K, data 64K, hole 384K, data 4K, hole 508K */
    uint64_t q[6] = {1, 32768, (1 << 20) - 32768, 0, 1, 1};
    uint64_t g[4] = {BJ_NBDS_DATA, (uint64_t)fd, 32768, (1 << 20) - 32768};
    CHECK(bj_nbds_submit(s, q, 1, g, 1) > 0);
    static const struct { int type; uint64_t off, len; } want[] = {
        {2, 32768, 32768}, {1, 65536, 65536}, {2, 131072, 393216}, {1, 524288, 4096},
        {2, 528384, 520192}};
    static unsigned char data[65536];
    for (size_t i = 0; i < 5; i++) {
        unsigned char h[32];
        readn(sv[1], h, 20);
        CHECK_EQ(h[5], i == 4);
        CHECK_EQ(h[7], want[i].type);
        CHECK_EQ(get64(h + 8), 1);
        if (want[i].type == 2) {
            CHECK_EQ(get32(h + 16), 12);
            readn(sv[1], h + 20, 12);
            CHECK_EQ(get64(h + 20), want[i].off);
            CHECK_EQ(get32(h + 28), want[i].len);
        } else {
            CHECK_EQ(get32(h + 16), 8 + want[i].len);
            readn(sv[1], h + 20, 8);
            CHECK_EQ(get64(h + 20), want[i].off);
            readn(sv[1], data, want[i].len);
            CHECK(memcmp(data, file + (i == 1 ? 0 : 4096), want[i].len) == 0);
        }
    }
    take_tokens(s, 1);
    /* DF: the holes as zeroes, one chunk */
    uint64_t q2[6] = {2, 0, 131072, 4, 2, 1};
    uint64_t g2[4] = {BJ_NBDS_DATA, (uint64_t)fd, 0, 131072};
    CHECK(bj_nbds_submit(s, q2, 1, g2, 1) > 0);
    unsigned char h[28];
    readn(sv[1], h, 28);
    CHECK_EQ(h[5], 1);
    CHECK_EQ(h[7], 1);
    CHECK_EQ(get32(h + 16), 8 + 131072);
    static unsigned char big[131072];
    readn(sv[1], big, 131072);
    for (int i = 0; i < 65536; i++)
        CHECK_EQ(big[i], 0);
    CHECK(memcmp(big + 65536, file, 65536) == 0);
    take_tokens(s, 1);
    /* BLOCK_STATUS of the whole file, context id 3; then REQ_ONE */
    static uint32_t ext[2u << 16];
    uint64_t q3[6] = {3, 0, 1 << 20, bs_flags(0, 3), 3, 1};
    uint64_t g3[4] = {BJ_NBDS_DATA, (uint64_t)fd, 0, 1 << 20};
    CHECK(bj_nbds_submit(s, q3, 1, g3, 1) > 0);
    CHECK_EQ(read_status(sv[1], 3, 3, ext, 16), 5);
    static const uint32_t wext[10] = {65536, 3, 65536, 0, 393216, 3, 4096, 0, 520192, 3};
    CHECK(memcmp(ext, wext, sizeof(wext)) == 0);
    q3[3] = bs_flags(8, 1);
    q3[0] = 4;
    CHECK(bj_nbds_submit(s, q3, 1, g3, 1) > 0);
    CHECK_EQ(read_status(sv[1], 4, 1, ext, 1), 1);
    CHECK(ext[0] == 65536 && ext[1] == 3);
    take_tokens(s, 2);
    /* qcow2-like: data cluster (DATA_PAD, even over the file's hole), a raw
     * part (data), zeroes twice, a data cluster: 0, 0 merged; 3 */
    uint64_t q4[6] = {5, 0, 5000, bs_flags(0, 1), 4, 5};
    uint64_t g4[20] = {BJ_NBDS_DATA_PAD, (uint64_t)fd, 0, 1000,
                       BJ_NBDS_DATA, (uint64_t)fd, 65536, 1000,
                       BJ_NBDS_ZERO, 0, 0, 1000, BJ_NBDS_ZERO, 0, 0, 1000,
                       BJ_NBDS_DATA_PAD, (uint64_t)fd, 0, 1000};
    CHECK(bj_nbds_submit(s, q4, 1, g4, 5) > 0);
    CHECK_EQ(read_status(sv[1], 5, 1, ext, 16), 3);
    static const uint32_t wext4[6] = {2000, 0, 2000, 3, 1000, 0};
    CHECK(memcmp(ext, wext4, sizeof(wext4)) == 0);
    take_tokens(s, 1);
    /* 65537 runs of zeroes and data: 65536 extents */
    enum { RUNS = 65537 };
    static uint64_t g5[4 * RUNS];
    for (int i = 0; i < RUNS; i++) {
        uint64_t *w = g5 + 4 * i;
        w[0] = i % 2 ? BJ_NBDS_DATA_PAD : BJ_NBDS_ZERO;
        w[1] = i % 2 ? (uint64_t)fd : 0;
        w[2] = 0;
        w[3] = 512;
    }
    uint64_t q5[6] = {6, 0, 512u * RUNS, bs_flags(0, 1), 5, RUNS};
    CHECK(bj_nbds_submit(s, q5, 1, g5, RUNS) > 0);
    CHECK_EQ(read_status(sv[1], 6, 1, ext, 1u << 16), 1u << 16);
    for (size_t i = 0; i < (1u << 16); i++)
        CHECK(ext[2 * i] == 512 && ext[2 * i + 1] == (i % 2 ? 0u : 3u));
    take_tokens(s, 1);
    /* an unknown command: refused, nothing queued */
    uint64_t q6[6] = {7, 0, 512, 9u << 16, 6, 1};
    uint64_t g6[4] = {BJ_NBDS_ZERO, 0, 0, 512};
    CHECK_EQ(bj_nbds_submit(s, q6, 1, g6, 1), -EINVAL);
    /* a client gone: the block status's token still comes back */
    close(sv[1]);
    q3[0] = 8;
    q3[3] = bs_flags(0, 1);
    CHECK(bj_nbds_submit(s, q3, 1, g3, 1) > 0);
    take_tokens(s, 1);
    bj_nbds_wait_idle(s);
    bj_nbds_stop_done(s);
    bj_nbds_free(s);
    close(sv[0]);
    /* block status needs structured replies */
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    s = bj_nbds_new(sv[0], 0, 1);
    CHECK(s);
    CHECK_EQ(bj_nbds_submit(s, q3, 1, g3, 1), -EINVAL);
    bj_nbds_stop_done(s);
    bj_nbds_free(s);
    close(sv[0]);
    close(sv[1]);
    close(fd);
}

static int threads_now(void)
{
    int n = 0;
    char line[256];
    FILE *f = fopen("/proc/self/status", "r");
    CHECK(f);
    while (fgets(line, sizeof(line), f))
        if (sscanf(line, "Threads: %d", &n) == 1)
            break;
    fclose(f);
    return n;
}

/* One read of the file's first 4 KiB through session s (simple reply). */
static void one_read(struct bj_nbds *s, int client, int dfd, uint64_t handle)
{
    uint64_t q[6] = {handle, 0, 4096, 0, handle, 1};
    uint64_t g[4] = {BJ_NBDS_DATA, (uint64_t)dfd, 0, 4096};
    CHECK(bj_nbds_submit(s, q, 1, g, 1) > 0);
    unsigned char r[16 + 4096];
    readn(client, r, sizeof(r));
    CHECK_EQ(get32(r), 0x67446698u);
    CHECK_EQ(get32(r + 4), 0);
    CHECK_EQ(get64(r + 8), handle);
    CHECK(memcmp(r + 16, file, 4096) == 0);
    take_tokens(s, 1);
}

static void end_session(struct bj_nbds *s)
{
    bj_nbds_wait_idle(s);
    bj_nbds_stop_done(s);
    bj_nbds_free(s);
}

struct one_arg {
    struct bj_nbds *s;
    int dfd, rc;
    uint64_t token;
};

static void *serve_one_thread(void *arg)
{
    struct one_arg *a = arg;
    uint64_t q[6] = {9, 0, FSIZE, 0, 77, 1};
    uint64_t g[4] = {BJ_NBDS_DATA, (uint64_t)a->dfd, 0, FSIZE};
    a->rc = bj_nbds_serve_one(a->s, q, g, 1, &a->token);
    return NULL;
}

/* bj_nbds_serve_one: a read served in the caller's thread -- no worker
 * taken, the reply as a worker's, the token the caller's (1) -- and a
 * block status the same way; a bad request refused (nothing served); a
 * reply larger than the socket takes, for a client not reading yet: the
 * token goes to the reaper before the send waits (0 for the caller), and
 * the reply comes whole once the client reads. */
static void test_serve_one(int dfd)
{
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    CHECK_EQ(bj_nbds_pool_trim(0), 0);
    int before = threads_now();
    struct bj_nbds *s = bj_nbds_new(sv[0], 1, 2);
    CHECK(s);
    uint64_t q[6] = {5, 0, 4096, 0, 55, 1};
    uint64_t g[4] = {BJ_NBDS_DATA, (uint64_t)dfd, 0, 4096};
    uint64_t t = 0;
    CHECK_EQ(bj_nbds_serve_one(s, q, g, 1, &t), 1);
    CHECK_EQ(t, 55);
    CHECK_EQ(threads_now(), before);
    CHECK_EQ(bj_nbds_pool_idle(), 0);
    unsigned char r[28 + 4096];
    readn(sv[1], r, sizeof(r));
    CHECK_EQ(get32(r), 0x668e33efu);
    CHECK_EQ(get64(r + 8), 5);
    CHECK_EQ(get64(r + 20), 0);
    CHECK(memcmp(r + 28, file, 4096) == 0);
    /* block status of base:allocation (context 1): one data extent */
    uint64_t b[6] = {6, 0, 4096, bs_flags(0, 1), 56, 1};
    CHECK_EQ(bj_nbds_serve_one(s, b, g, 1, &t), 1);
    CHECK_EQ(t, 56);
    uint32_t ext[4];
    CHECK_EQ(read_status(sv[1], 6, 1, ext, 2), 1);
    CHECK_EQ(ext[0], 4096);
    CHECK_EQ(ext[1], 0);
    /* segments that do not add up: refused, nothing sent */
    uint64_t bad[6] = {7, 0, 8192, 0, 57, 1};
    CHECK_EQ(bj_nbds_serve_one(s, bad, g, 1, &t), -EINVAL);
    CHECK_EQ(bj_nbds_inflight(s), 0);
    /* a client not reading: the token is the reaper's before the send waits */
    int small = 4096;
    CHECK(setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof(small)) == 0);
    struct one_arg a = {.s = s, .dfd = dfd, .rc = -1};
    pthread_t th;
    CHECK(pthread_create(&th, NULL, serve_one_thread, &a) == 0);
    uint64_t got = 0;
    CHECK_EQ(bj_nbds_wait_done(s, &got, 1), 1);
    CHECK_EQ(got, 77);
    static unsigned char data[FSIZE];
    unsigned char h[28];                /* one OFFSET_DATA chunk, DONE */
    readn(sv[1], h, 28);
    CHECK_EQ(get32(h), 0x668e33efu);
    CHECK_EQ(get64(h + 8), 9);
    CHECK_EQ(get32(h + 16), 8 + FSIZE);
    readn(sv[1], data, FSIZE);
    CHECK(memcmp(data, file, FSIZE) == 0);
    CHECK(pthread_join(th, NULL) == 0);
    CHECK_EQ(a.rc, 0);
    CHECK_EQ(threads_now(), before + 0);
    end_session(s);
    close(sv[0]);
    close(sv[1]);
}

/* A session takes no thread before its first request (one that reads
 * nothing -- nbdinfo --size -- takes none), then one per read in flight up
 * to its workers, from the process's pool: they go back parked when the
 * session ends, and the next sessions take them again -- the thread count
 * after 20 sessions is that after 1 -- until bj_nbds_pool_trim ends them. */
static void test_threads_on_demand(int dfd)
{
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    CHECK_EQ(bj_nbds_pool_trim(0), 0);
    CHECK_EQ(bj_nbds_pool_idle(), 0);
    int before = threads_now();
    struct bj_nbds *s = bj_nbds_new(sv[0], 0, 4);
    CHECK(s);
    CHECK_EQ(threads_now(), before);
    one_read(s, sv[1], dfd, 1);
    CHECK_EQ(threads_now(), before + 1);
    end_session(s);
    /* parked, not ended */
    CHECK_EQ(bj_nbds_pool_idle(), 1);
    CHECK_EQ(threads_now(), before + 1);
    /* a session that never reads */
    s = bj_nbds_new(sv[0], 1, 4);
    CHECK(s);
    end_session(s);
    CHECK_EQ(bj_nbds_pool_idle(), 1);
    /* 4 reads in flight at once take 4 threads; 20 such sessions, one
     * after the other, no more */
    int after_one = 0;
    for (int k = 0; k < 20; k++) {
        s = bj_nbds_new(sv[0], 0, 4);
        CHECK(s);
        uint64_t q[4 * 6], g[4 * 4];
        for (int i = 0; i < 4; i++) {
            uint64_t *r = q + 6 * i, *x = g + 4 * i;
            r[0] = (uint64_t)(100 + i); r[1] = 0; r[2] = 4096; r[3] = 0;
            r[4] = (uint64_t)(100 + i); r[5] = 1;
            x[0] = BJ_NBDS_DATA; x[1] = (uint64_t)dfd; x[2] = 0; x[3] = 4096;
        }
        CHECK(bj_nbds_submit(s, q, 4, g, 4) >= 0);
        unsigned char r[4 * (16 + 4096)];
        readn(sv[1], r, sizeof(r));
        take_tokens(s, 4);
        one_read(s, sv[1], dfd, 7);
        CHECK(threads_now() <= before + 4);
        end_session(s);
        if (k == 0)
            after_one = threads_now();
        CHECK_EQ(threads_now(), after_one);
        CHECK_EQ(bj_nbds_pool_idle(), after_one - before);
    }
    CHECK(after_one > before && after_one <= before + 4);
    /* a client gone with reads queued: the session ends, its threads park */
    s = bj_nbds_new(sv[0], 0, 4);
    CHECK(s);
    close(sv[1]);
    uint64_t q[6] = {9, 0, 4096, 0, 9, 1};
    uint64_t g[4] = {BJ_NBDS_DATA, (uint64_t)dfd, 0, 4096};
    CHECK(bj_nbds_submit(s, q, 1, g, 1) >= 0);
    take_tokens(s, 1);
    end_session(s);
    CHECK_EQ(threads_now(), after_one);
    CHECK_EQ(bj_nbds_pool_trim(1), 1);
    CHECK_EQ(threads_now(), before + 1);
    CHECK_EQ(bj_nbds_pool_trim(0), 0);
    CHECK_EQ(threads_now(), before);
    close(sv[0]);
}


/* -- the process's reaper (bj_nbds_global, bj_nbds_reap, bj_nbds_drain) ----- */

enum { GN = 100 };
static int gseen[2][GN];            /* tokens ended: by the reaper or a drain */
static struct bj_nbds *gsess[2];

static void gtoken(uint64_t key, uint64_t t)
{
    int k = key == (uint64_t)(uintptr_t)gsess[0] ? 0 : 1;
    CHECK(key == (uint64_t)(uintptr_t)gsess[k]);
    CHECK(t < GN && !gseen[k][t]);
    gseen[k][t] = 1;
}

static void *greaper(void *arg)
{
    (void)arg;
    uint64_t keys[16], done[16];
    uint32_t counts[16];
    int runs;
    while ((runs = bj_nbds_reap(keys, counts, done, 16)) > 0) {
        int pos = 0;
        for (int r = 0; r < runs; r++) {
            CHECK(counts[r] > 0 && pos + (int)counts[r] <= 16);
            for (uint32_t i = 0; i < counts[r]; i++)
                gtoken(keys[r], done[pos++]);
        }
        bj_nbds_reaped();
    }
    bj_nbds_reaped();
    return NULL;
}

static void *gclient(void *arg)
{
    int fd = *(int *)arg;
    static __thread unsigned char data[4096];
    for (int k = 0; k < GN; k++) {
        unsigned char h[16];
        readn(fd, h, 16);
        CHECK_EQ(get32(h + 4), 0);
        readn(fd, data, 512);
    }
    return NULL;
}

/* Two sessions' reads ended by one reaper thread, the rest by their
 * drains: each token once, with its session; a drain stops the workers
 * and waits for the reaper's batch; bj_nbds_reap_stop ends the reaper. */
static void test_global_reaper(int dfd)
{
    int sv[2][2];
    pthread_t rt, ct[2];
    CHECK_EQ(pthread_create(&rt, NULL, greaper, NULL), 0);
    static uint64_t q[6 * GN], g[4 * GN];
    for (int i = 0; i < GN; i++) {
        uint64_t *r = q + 6 * i, *w = g + 4 * i;
        r[0] = 1 + (uint64_t)i; r[1] = 512u * (uint64_t)i; r[2] = 512; r[3] = 0;
        r[4] = (uint64_t)i; r[5] = 1;
        w[0] = BJ_NBDS_DATA; w[1] = (uint64_t)dfd; w[2] = 512u * (uint64_t)i; w[3] = 512;
    }
    for (int k = 0; k < 2; k++) {
        CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv[k]), 0);
        gsess[k] = bj_nbds_new(sv[k][0], 0, 4);
        CHECK(gsess[k]);
        bj_nbds_global(gsess[k]);
        CHECK_EQ(pthread_create(&ct[k], NULL, gclient, &sv[k][1]), 0);
    }
    for (int i = 0; i < GN; i += 10)
        for (int k = 0; k < 2; k++)
            CHECK(bj_nbds_submit(gsess[k], q + 6 * i, 10, g + 4 * i, 10) > 0);
    for (int k = 0; k < 2; k++) {
        CHECK_EQ(pthread_join(ct[k], NULL), 0);
        bj_nbds_wait_idle(gsess[k]);
        uint64_t done[8];
        int n;
        while ((n = bj_nbds_drain(gsess[k], done, 8)) > 0)
            for (int i = 0; i < n; i++)
                gtoken((uint64_t)(uintptr_t)gsess[k], done[i]);
    }
    bj_nbds_reap_stop(1);
    CHECK_EQ(pthread_join(rt, NULL), 0);
    bj_nbds_reap_stop(0);
    for (int k = 0; k < 2; k++) {
        for (int i = 0; i < GN; i++)
            CHECK(gseen[k][i]);
        bj_nbds_free(gsess[k]);
        close(sv[k][0]);
        close(sv[k][1]);
    }
}

/* -- the handshake's common options (bj_nbdh_step) ------------------------- */

static size_t opt(unsigned char *p, uint32_t option, const void *data, uint32_t len)
{
    put64(p, 0x49484156454f5054ull);
    put32(p + 8, option);
    put32(p + 12, len);
    if (len)
        memcpy(p + 16, data, len);
    return 16 + len;
}

/* One option reply from fd: its option and type (data length checked). */
static void reply(int fd, uint32_t option, uint32_t type, uint32_t len)
{
    unsigned char r[20];
    readn(fd, r, 20);
    CHECK_EQ(get64(r), 0x0003e889045565a9ull);
    CHECK_EQ(get32(r + 8), option);
    CHECK_EQ(get32(r + 12), type);
    CHECK_EQ(get32(r + 16), len);
    unsigned char d[64];
    CHECK(len <= sizeof(d));
    readn(fd, d, len);
}

/* exports a (with dirty bitmaps) and d */
static const unsigned char NAMES[] = "\0\0\0\1a\1\0\0\0\1d\0";
#define NAMES_LEN (sizeof(NAMES) - 1)
static const unsigned char META_D[] = "\0\0\0\1d\0\0\0\1\0\0\0\x0f" "base:allocation";
static const unsigned char GO_D[] = "\0\0\0\1d\0\2\0\3\0\1";
static const unsigned char LIST_D[] = "\0\0\0\1d\0\0\0\0";

/* The greeting, nbdcopy's options sent one byte at a time (from a thread:
 * the client's side), GO returned; then an INFO left to the caller at
 * rpos, unknown client flags, EOF in an option, an option longer than the
 * buffer left to the caller, bad arguments. */
struct dribble {
    int fd;
    const unsigned char *p;
    size_t n;
};

static void *dribble_thread(void *arg)
{
    struct dribble *d = arg;
    for (size_t i = 0; i < d->n; i++)
        CHECK_EQ(write(d->fd, d->p + i, 1), 1);
    return NULL;
}

static void test_handshake(void)
{
    int sv[2];
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    unsigned char in[512], buf[4096];
    size_t n = 0;
    put32(in, 3);
    n = 4;
    n += opt(in + n, 8, NULL, 0);
    n += opt(in + n, 10, META_D, sizeof(META_D) - 1);
    n += opt(in + n, 7, GO_D, sizeof(GO_D) - 1);
    n += opt(in + n, 6, GO_D, sizeof(GO_D) - 1);
    n += opt(in + n, 9, LIST_D, sizeof(LIST_D) - 1);
    size_t info = n;
    n += opt(in + n, 3, "abcd", 4);
    struct dribble d = {sv[1], in, n};
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, dribble_thread, &d), 0);
    struct bj_nbdh h = {.ctx_export = -1};
    CHECK_EQ(bj_nbdh_step(sv[0], &h, buf, sizeof(buf), NAMES, NAMES_LEN), BJ_NBDH_GO);
    CHECK_EQ(h.state, BJ_NBDH_GREETED | BJ_NBDH_NO_ZEROES | BJ_NBDH_STRUCTURED
             | BJ_NBDH_BASE_ALLOC);
    CHECK_EQ(h.ctx_export, 1);
    CHECK_EQ(h.go_export, 1);
    CHECK_EQ(h.go_info, 1u << 3 | 1u << 1);
    unsigned char g[18];
    readn(sv[1], g, 18);
    CHECK_EQ(get64(g), 0x4e42444d41474943ull);
    CHECK_EQ(g[17], 3);
    reply(sv[1], 8, 1, 0);
    reply(sv[1], 10, 4, 19);
    reply(sv[1], 10, 1, 0);
    /* INFO: returned as GO is; LIST_META_CONTEXT of d (no bitmaps):
     * answered */
    h.go_export = -1;
    CHECK_EQ(bj_nbdh_step(sv[0], &h, buf, sizeof(buf), NAMES, NAMES_LEN), BJ_NBDH_INFO);
    CHECK_EQ(h.go_export, 1);
    /* LIST: the caller's, its header at rpos (maybe not all of it read) */
    CHECK_EQ(bj_nbdh_step(sv[0], &h, buf, sizeof(buf), NAMES, NAMES_LEN), BJ_NBDH_OPTION);
    reply(sv[1], 9, 4, 19);
    reply(sv[1], 9, 1, 0);
    CHECK_EQ(pthread_join(t, NULL), 0);
    CHECK(h.rlen - h.rpos >= 16);
    CHECK(memcmp(buf + h.rpos, in + info, 16) == 0);
    /* the rest of it, then EOF in the next option's header */
    unsigned char ready[4096];
    size_t k = h.rlen - h.rpos;
    memcpy(ready, buf + h.rpos, k);
    readn(sv[0], ready + k, n - info - k);
    CHECK(memcmp(ready, in + info, n - info) == 0);
    h.rpos = h.rlen = 0;
    CHECK_EQ(write(sv[1], in + 4, 7), 7);
    CHECK_EQ(shutdown(sv[1], SHUT_WR), 0);
    CHECK_EQ(bj_nbdh_step(sv[0], &h, buf, sizeof(buf), NAMES, NAMES_LEN), -ECONNRESET);
    close(sv[0]);
    close(sv[1]);

    /* unknown client flags; a SET_META_CONTEXT of an unknown export, and one
     * longer than the buffer: the caller's */
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    put32(in, 0x10);
    CHECK_EQ(write(sv[1], in, 4), 4);
    struct bj_nbdh h2 = {.ctx_export = -1};
    CHECK_EQ(bj_nbdh_step(sv[0], &h2, buf, sizeof(buf), NAMES, NAMES_LEN), BJ_NBDH_HANGUP);
    unsigned char meta_x[sizeof(META_D)], list_a[sizeof(LIST_D)];
    memcpy(meta_x, META_D, sizeof(META_D));
    meta_x[4] = 'x';
    memcpy(list_a, LIST_D, sizeof(LIST_D));
    list_a[4] = 'a';
    /* (a has bitmaps: its list is the caller's) */
    n = opt(in, 8, NULL, 0);
    CHECK_EQ(write(sv[1], in, n), (ssize_t)n);
    n = opt(in, 9, list_a, sizeof(LIST_D) - 1);
    CHECK_EQ(write(sv[1], in, n), (ssize_t)n);
    CHECK_EQ(bj_nbdh_step(sv[0], &h2, buf, sizeof(buf), NAMES, NAMES_LEN), BJ_NBDH_OPTION);
    CHECK_EQ(h2.rlen - h2.rpos, n);
    h2.rpos = h2.rlen = 0;
    n = opt(in, 10, meta_x, sizeof(META_D) - 1);
    CHECK_EQ(write(sv[1], in, n), (ssize_t)n);
    CHECK_EQ(bj_nbdh_step(sv[0], &h2, buf, sizeof(buf), NAMES, NAMES_LEN), BJ_NBDH_OPTION);
    CHECK_EQ(h2.ctx_export, -1);
    CHECK(h2.state & BJ_NBDH_STRUCTURED);
    CHECK_EQ(h2.rlen - h2.rpos, n);
    h2.rpos = h2.rlen = 0;
    unsigned char big[64];
    opt(big, 10, NULL, 0);
    put32(big + 12, 2000);
    CHECK_EQ(write(sv[1], big, 16), 16);
    CHECK_EQ(bj_nbdh_step(sv[0], &h2, buf, 1024, NAMES, NAMES_LEN), BJ_NBDH_OPTION);
    CHECK_EQ(h2.rlen - h2.rpos, 16);
    h2.rpos = 5;
    h2.rlen = 4;
    CHECK_EQ(bj_nbdh_step(sv[0], &h2, buf, sizeof(buf), NAMES, NAMES_LEN), -EINVAL);
    close(sv[0]);
    close(sv[1]);
}

/* Zero-copy replies (BJ_NBDS_STABLE on an AF_UNIX socket): the bytes and
 * chunks of the pread path, counted in bj_nbds_zc_stats; the pread path
 * for padding past EOF, a segment past EOF (EIO as before), uncached data,
 * a revoked session, a read not flagged; bj_nbds_zc_busy while the peer
 * has not read a reply, 0 once it has. */
static void zc_read(int fd, unsigned char *h, unsigned char *data, uint64_t handle, int type,
                    uint32_t len)
{
    readn(fd, h, type == 1 ? 28 : 32);
    CHECK_EQ(get32(h), 0x668e33efu);
    CHECK_EQ(h[7], type);
    CHECK_EQ(get64(h + 8), handle);
    if (type == 1) {
        CHECK_EQ(get32(h + 16), 8 + len);
        readn(fd, data, len);
    } else {
        CHECK_EQ(get32(h + 28), len);
    }
}

static void test_zero_copy(int dfd)
{
    int sv[2];
    uint64_t st[2], cr[2] = {0, 4096}, cs[5];
    unsigned char h[32], data[4096];
    /* cachestat(2): without it (before Linux 6.5; valgrind knows it not:
     * ENOSYS) every reply goes the pread way */
    uint64_t zc = syscall(451, dfd, cr, cs, 0) == 0;
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    struct bj_nbds *s = bj_nbds_new(sv[0], 1, 2);
    CHECK(s);
    CHECK_EQ(bj_nbds_zc_busy(s), 0);
    /* data 1000, zero 2000, data 500: zero-copy, the chunks as before */
    uint64_t q[6] = {9, 4096, 3500, BJ_NBDS_STABLE, 1, 3};
    uint64_t g[12] = {BJ_NBDS_DATA, (uint64_t)dfd, 0, 1000, BJ_NBDS_ZERO, 0, 0, 2000,
                      BJ_NBDS_DATA_PAD, (uint64_t)dfd, 10000, 500};
    CHECK(bj_nbds_submit(s, q, 1, g, 3) > 0);
    take_tokens(s, 1);                      /* (after the send) */
    CHECK_EQ(bj_nbds_zc_busy(s), 1);        /* the peer has not read it */
    CHECK(bj_nbds_outq(sv[0]) > 0);         /* (either way: SIOCOUTQ) */
    zc_read(sv[1], h, data, 9, 1, 1000);
    CHECK_EQ(h[5], 0);
    CHECK(memcmp(data, file, 1000) == 0);
    zc_read(sv[1], h, data, 9, 2, 2000);
    CHECK_EQ(get64(h + 20), 4096 + 1000);
    zc_read(sv[1], h, data, 9, 1, 500);
    CHECK_EQ(h[5], 1);
    CHECK_EQ(get64(h + 20), 4096 + 3000);
    CHECK(memcmp(data, file + 10000, 500) == 0);
    CHECK_EQ(bj_nbds_zc_busy(s), 0);
    CHECK_EQ(bj_nbds_outq(sv[0]), 0);
    bj_nbds_zc_stats(s, st);
    CHECK_EQ(st[0], zc * 1500);
    CHECK_EQ(st[1], zc);
    /* DATA_PAD past EOF (zeroes there): the pread path */
    uint64_t q2[6] = {10, 0, 64, BJ_NBDS_STABLE, 2, 1};
    uint64_t g2[4] = {BJ_NBDS_DATA_PAD, (uint64_t)dfd, FSIZE - 32, 64};
    CHECK(bj_nbds_submit(s, q2, 1, g2, 1) > 0);
    zc_read(sv[1], h, data, 10, 1, 64);
    CHECK(memcmp(data, file + FSIZE - 32, 32) == 0);
    for (int i = 32; i < 64; i++)
        CHECK_EQ(data[i], 0);
    take_tokens(s, 1);
    /* DATA past EOF: EIO, as before */
    uint64_t q3[6] = {11, 0, 64, BJ_NBDS_STABLE, 3, 1};
    uint64_t g3[4] = {BJ_NBDS_DATA, (uint64_t)dfd, FSIZE, 64};
    CHECK(bj_nbds_submit(s, q3, 1, g3, 1) > 0);
    CHECK_EQ(error_chunk(sv[1], h), EIO);
    take_tokens(s, 1);
    /* not flagged stable */
    uint64_t q4[6] = {12, 0, 4096, 0, 4, 1};
    uint64_t g4[4] = {BJ_NBDS_DATA, (uint64_t)dfd, 4096, 4096};
    CHECK(bj_nbds_submit(s, q4, 1, g4, 1) > 0);
    zc_read(sv[1], h, data, 12, 1, 4096);
    CHECK(memcmp(data, file + 4096, 4096) == 0);
    take_tokens(s, 1);
    /* not in the page cache */
    CHECK_EQ(fsync(dfd), 0);
    CHECK_EQ(posix_fadvise(dfd, 0, 0, POSIX_FADV_DONTNEED), 0);
    q4[0] = 13;
    q4[3] = BJ_NBDS_STABLE;
    CHECK(bj_nbds_submit(s, q4, 1, g4, 1) > 0);
    zc_read(sv[1], h, data, 13, 1, 4096);
    CHECK(memcmp(data, file + 4096, 4096) == 0);
    take_tokens(s, 1);
    bj_nbds_zc_stats(s, st);
    CHECK_EQ(st[0], zc * 1500);
    /* cached now (the pread read it): zero-copy; then revoked: not */
    q4[0] = 14;
    CHECK(bj_nbds_submit(s, q4, 1, g4, 1) > 0);
    zc_read(sv[1], h, data, 14, 1, 4096);
    CHECK(memcmp(data, file + 4096, 4096) == 0);
    take_tokens(s, 1);
    bj_nbds_zc_revoke(s);
    q4[0] = 15;
    CHECK(bj_nbds_submit(s, q4, 1, g4, 1) > 0);
    zc_read(sv[1], h, data, 15, 1, 4096);
    CHECK(memcmp(data, file + 4096, 4096) == 0);
    take_tokens(s, 1);
    bj_nbds_zc_stats(s, st);
    CHECK_EQ(st[0], zc * (1500 + 4096));
    CHECK_EQ(st[1], zc * 2);
    CHECK_EQ(bj_nbds_zc_busy(s), 0);
    CHECK_EQ(bj_nbds_outq(-1), -EBADF);
    bj_nbds_stop_done(s);
    bj_nbds_free(s);
    close(sv[0]);
    close(sv[1]);
}

int main(void)
{
    char path[] = "/tmp/bjnbdsXXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    unlink(path);
    uint32_t seed = 5;
    for (size_t i = 0; i < FSIZE; i++) {
        seed = seed * 1103515245u + 12345u;
        file[i] = (unsigned char)(seed >> 16);
    }
    CHECK_EQ(write(fd, file, FSIZE), FSIZE);
    CHECK(bj_nbds_new(0, 0, 0) == NULL && errno == EINVAL);
    test_headers_and_simple_reads(fd);
    test_structured(fd);
    test_many_and_gone(fd);
    test_token_before_send(fd);
    test_queue_does_not_wait(fd);
    test_wait_free(fd);
    test_holes_and_status();
    test_threads_on_demand(fd);
    test_serve_one(fd);
    test_handshake();
    test_global_reaper(fd);
    test_zero_copy(fd);
    bj_nbds_pool_trim(0);           /* (no thread left for valgrind to see) */
    close(fd);
    puts("nbdsrv: ok");
    return 0;
}
