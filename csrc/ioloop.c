/* ioloop.c: measured I/O loops for `blkjobs bench` — sequential or random,
 * read or write, N threads over one open file.
 *
 * Design (the synchronous "psync" engine of fio, with the threads of one job
 * sharing one stream):
 *  - bj_ioloop_new() starts the workers at once. Each takes a 4 KiB-aligned
 *    buffer of bs bytes and touches every page of it (a write buffer gets a
 *    pseudo-random pattern, so no layer can compress or dedup it), then
 *    waits at a start gate. First-touch page faults and thread creation
 *    therefore stay outside the timed region: they cost up to 10x the I/O
 *    on a noisy small machine.
 *  - Buffers outlive their loop: bj_ioloop_free() keeps them (up to
 *    POOL_MAX_BYTES) and the next loop of the same bs takes them back, so
 *    the runs of one process use the pages of its first loop, as each fio
 *    process allocates its buffer once. Why it matters: an O_DIRECT request
 *    is one segment per physically contiguous run of its buffer's pages, and
 *    a device takes a bounded number (virtio-blk here: 254), so a 1 MiB
 *    request from 256 scattered 4 KiB pages is split into two device
 *    requests and costs 40% more than one from contiguous pages
 *    (benchmarks/README.md, "Why blkjobs' 1 MiB writes were 9% slower").
 *    Freeing a buffer and faulting a new one at once can get back the pages
 *    just freed in reverse order (the kernel's per-CPU free lists are LIFO):
 *    a contiguous buffer's successor is scattered, and vice versa, so the
 *    runs of one process did not draw their layouts as fio's processes do.
 *    bj_ioloop_release_buffers() frees the kept ones.
 *  - The first bj_ioloop_run() reads the clock and opens the gate.
 *    Sequential: worker t of N streams through its own section, blocks
 *    [t*nblocks/N, (t+1)*nblocks/N), wrapping inside it under a time
 *    budget, and does its share of the byte budget — fio's numjobs=N with
 *    offset_increment=size/N, which benchmarks/fio_compare.py measures
 *    against. (One shared stream with N requests in flight, fio's
 *    iodepth=N, was measured 20-25% slower on a virtio disk at N=4: the
 *    host serves separate streams better.) Random: workers claim requests
 *    with one atomic fetch-add on a shared counter (no lock on the data
 *    path) and a per-worker xorshift64* picks a block uniformly in
 *    [0, nblocks) (repeats allowed, like fio's norandommap).
 *  - The loop stops when the byte budget is claimed, the time budget is
 *    over (checked after every request: one vDSO clock read, ~20 ns), on
 *    cancel, or on the first error (recorded with its offset).
 *  - The last worker to stop runs fsync(fd) for writes when asked and only
 *    then reads the end time: durability is part of the write figure.
 *  - Progress (bytes, ops) is counted when a request completes.
 * Known flaw: bytes of requests that completed after the time budget ran
 * out are counted, and their time too; the overshoot is one request per
 * thread, at most threads*bs bytes.
 *  - Latency: each request's time from issue to completion (two clock
 *    reads around the pread/pwrite) is counted in the worker's own
 *    log-linear histogram (BJ_LAT_BUCKETS counters, allocated with the
 *    buffer: nothing is allocated or shared per request);
 *    bj_ioloop_get_latency() sums them once the loop finished.
 * Cost: one pread/pwrite per request plus one atomic add, two clock reads
 * and one counter increment; memory threads * (bs + 30 KiB), the buffers
 * kept afterwards.
 */
#include "ioloop.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* The buffers kept between loops: at most POOL_SLOTS of them and
 * POOL_MAX_BYTES in all; a buffer that does not fit is freed. */
#define POOL_SLOTS 64
#define POOL_MAX_BYTES (256ull << 20)
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static struct {
    void *p;
    uint64_t len;
} pool[POOL_SLOTS];
static uint64_t pool_bytes;

/* A kept buffer of len bytes, or a new one; NULL when out of memory. */
static void *buf_get(uint64_t len)
{
    void *p = NULL;
    pthread_mutex_lock(&pool_lock);
    for (int i = 0; i < POOL_SLOTS; i++) {
        if (pool[i].p && pool[i].len == len) {
            p = pool[i].p;
            pool[i].p = NULL;
            pool_bytes -= len;
            break;
        }
    }
    pthread_mutex_unlock(&pool_lock);
    if (!p && posix_memalign(&p, 4096, len))
        p = NULL;
    return p;
}

/* Keep p for the next loop, or free it when the pool is full. */
static void buf_put(void *p, uint64_t len)
{
    if (!p)
        return;
    pthread_mutex_lock(&pool_lock);
    if (pool_bytes + len <= POOL_MAX_BYTES) {
        for (int i = 0; i < POOL_SLOTS; i++) {
            if (!pool[i].p) {
                pool[i].p = p;
                pool[i].len = len;
                pool_bytes += len;
                p = NULL;
                break;
            }
        }
    }
    pthread_mutex_unlock(&pool_lock);
    free(p);
}

void bj_ioloop_release_buffers(void)
{
    pthread_mutex_lock(&pool_lock);
    for (int i = 0; i < POOL_SLOTS; i++) {
        free(pool[i].p);
        pool[i].p = NULL;
    }
    pool_bytes = 0;
    pthread_mutex_unlock(&pool_lock);
}

struct worker {
    struct bj_ioloop *b;
    pthread_t thread;
    void *buf;
    uint64_t *lat;     /* BJ_LAT_BUCKETS counters, this worker's only */
    uint64_t rng;
    int started;
};

struct bj_ioloop {
    struct bj_ioloop_opts o;
    uint64_t nblocks;          /* whole requests in the region */
    uint64_t nreq;             /* request budget (UINT64_MAX = time only) */
    struct worker *workers;
    uint32_t nworkers;

    pthread_mutex_t lock;
    pthread_cond_t cv;         /* CLOCK_MONOTONIC: gate, readiness, finish */
    uint32_t ready;            /* workers at the gate (or failed to set up) */
    int setup_error;           /* -errno from a worker's setup */
    int go, shutdown, finished;
    uint64_t start_ns, end_ns, fsync_ns;

    atomic_uint_fast64_t next; /* random: requests claimed so far */
    atomic_uint_fast64_t bytes, ops;
    atomic_uint stopped;
    atomic_int cancel;
    atomic_int error;
    atomic_uint_fast64_t error_offset;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* splitmix64's finaliser: a seed turned into a well-mixed xorshift state
 * (seeds that differ in one bit give unrelated states) */
static uint64_t mix64(uint64_t z)
{
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t xorshift64s(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1Dull;
}

uint32_t bj_lat_bucket(uint64_t ns)
{
    const uint64_t sub = 1u << BJ_LAT_SUB_BITS;
    if (ns < sub)
        return (uint32_t)ns;
    uint32_t msb = 63u - (uint32_t)__builtin_clzll(ns);
    uint32_t e = msb - BJ_LAT_SUB_BITS;            /* bucket width 2^e */
    return (uint32_t)(sub + e * sub + ((ns >> e) - sub));
}

uint64_t bj_lat_bucket_low(uint32_t idx)
{
    const uint64_t sub = 1u << BJ_LAT_SUB_BITS;
    if (idx < sub)
        return idx;
    if (idx >= BJ_LAT_BUCKETS)
        return UINT64_MAX;
    uint32_t e = (uint32_t)((idx - sub) / sub);
    return (sub + (idx - sub) % sub) << e;
}

static int io_full(int fd, int wr, char *buf, uint64_t len, uint64_t off)
{
    uint64_t n = 0;
    while (n < len) {
        ssize_t r = wr ? pwrite(fd, buf + n, len - n, (off_t)(off + n))
                       : pread(fd, buf + n, len - n, (off_t)(off + n));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0) /* the file is shorter than the region */
            return -EIO;
        n += (uint64_t)r;
    }
    return 0;
}

static void record_error(struct bj_ioloop *b, int err, uint64_t off)
{
    int zero = 0;
    if (atomic_compare_exchange_strong(&b->error, &zero, err))
        atomic_store(&b->error_offset, off);
}

/* Allocate and touch the buffer. Returns 0 or -errno. */
static int setup(struct worker *w, uint32_t index)
{
    struct bj_ioloop *b = w->b;
    w->buf = buf_get(b->o.bs);
    if (!w->buf)
        return -ENOMEM;
    w->lat = calloc(BJ_LAT_BUCKETS, sizeof(*w->lat));
    if (!w->lat)
        return -ENOMEM;
    /* mixed, not just OR-ed with 1: that made seeds 2k and 2k+1 the same */
    w->rng = mix64(b->o.seed ^ (0x9E3779B97F4A7C15ull * (index + 1)));
    if (w->rng == 0) /* xorshift's one fixed point */
        w->rng = 1;
    if (b->o.write) {
        uint64_t s = w->rng ^ 0xD1B54A32D192ED03ull, *p = w->buf;
        for (uint64_t i = 0; i < b->o.bs / 8; i++)
            p[i] = xorshift64s(&s);
        memset((char *)w->buf + (b->o.bs & ~7ull), 0xa5, b->o.bs & 7);
    } else {
        memset(w->buf, 0, b->o.bs);
    }
    return 0;
}

static void finish(struct bj_ioloop *b)
{
    uint64_t fs = 0;
    if (b->o.write && b->o.fsync_end && !atomic_load(&b->error) && !atomic_load(&b->cancel)) {
        uint64_t t = now_ns();
        if (fsync(b->o.fd) < 0)
            record_error(b, -errno, 0);
        fs = now_ns() - t;
    }
    uint64_t end = now_ns();
    pthread_mutex_lock(&b->lock);
    b->fsync_ns = fs;
    b->end_ns = end;
    b->finished = 1;
    pthread_cond_broadcast(&b->cv);
    pthread_mutex_unlock(&b->lock);
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    struct bj_ioloop *b = w->b;
    const struct bj_ioloop_opts *o = &b->o;
    int rc = setup(w, (uint32_t)(w - b->workers));

    pthread_mutex_lock(&b->lock);
    if (rc < 0 && !b->setup_error)
        b->setup_error = rc;
    b->ready++;
    pthread_cond_broadcast(&b->cv);
    while (!b->go && !b->shutdown)
        pthread_cond_wait(&b->cv, &b->lock);
    int run = !b->shutdown && rc == 0;
    uint64_t start = b->start_ns;
    pthread_mutex_unlock(&b->lock);

    /* sequential: this worker's section and share of the budget */
    uint32_t t = (uint32_t)(w - b->workers), n = b->nworkers;
    uint64_t first = b->nblocks * t / n, len = b->nblocks * (t + 1) / n - first;
    uint64_t quota = b->nreq == UINT64_MAX ? UINT64_MAX : b->nreq / n + (t < b->nreq % n);
    if (len == 0) { /* fewer blocks than workers: share the region */
        first = 0;
        len = b->nblocks;
    }
    for (uint64_t k = 0; run && !atomic_load_explicit(&b->cancel, memory_order_relaxed) &&
                         !atomic_load_explicit(&b->error, memory_order_relaxed); k++) {
        uint64_t blk;
        if (o->random) {
            if (atomic_fetch_add_explicit(&b->next, 1, memory_order_relaxed) >= b->nreq)
                break;
            blk = xorshift64s(&w->rng) % b->nblocks;
        } else {
            if (k >= quota)
                break;
            blk = first + k % len;
        }
        uint64_t off = blk * o->bs;
        uint64_t t0 = now_ns();
        int err = io_full(o->fd, (int)o->write, w->buf, o->bs, off);
        uint64_t t1 = now_ns();
        if (err < 0) {
            record_error(b, err, off);
            break;
        }
        w->lat[bj_lat_bucket(t1 - t0)]++;
        atomic_fetch_add_explicit(&b->bytes, o->bs, memory_order_relaxed);
        atomic_fetch_add_explicit(&b->ops, 1, memory_order_relaxed);
        if (o->runtime_ns && t1 - start >= o->runtime_ns)
            break;
    }
    /* The last one out runs the fsync and stops the clock. */
    if (atomic_fetch_add(&b->stopped, 1) + 1 == b->nworkers && run)
        finish(b);
    return NULL;
}

int bj_ioloop_new(struct bj_ioloop **out, const struct bj_ioloop_opts *opts)
{
    if (!out || !opts || opts->fd < 0 || opts->threads == 0 || opts->threads > 256 ||
        opts->bs < 512 || opts->bs > (1ull << 30) || opts->size < opts->bs ||
        opts->size > (uint64_t)INT64_MAX)
        return -EINVAL;
    struct bj_ioloop *b = calloc(1, sizeof(*b));
    if (!b)
        return -ENOMEM;
    b->o = *opts;
    b->nblocks = opts->size / opts->bs;
    uint64_t budget = opts->bytes ? opts->bytes : (opts->runtime_ns ? 0 : opts->size);
    b->nreq = budget ? (budget + opts->bs - 1) / opts->bs : UINT64_MAX;
    b->nworkers = opts->threads;
    b->workers = calloc(b->nworkers, sizeof(*b->workers));
    if (!b->workers) {
        free(b);
        return -ENOMEM;
    }
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_mutex_init(&b->lock, NULL);
    pthread_cond_init(&b->cv, &ca);
    pthread_condattr_destroy(&ca);
    atomic_init(&b->next, 0);
    atomic_init(&b->bytes, 0);
    atomic_init(&b->ops, 0);
    atomic_init(&b->stopped, 0);
    atomic_init(&b->cancel, 0);
    atomic_init(&b->error, 0);
    atomic_init(&b->error_offset, 0);

    int rc = 0;
    uint32_t created = 0;
    for (uint32_t i = 0; i < b->nworkers; i++) {
        b->workers[i].b = b;
        int e = pthread_create(&b->workers[i].thread, NULL, worker_main, &b->workers[i]);
        if (e) {
            rc = -e;
            break;
        }
        b->workers[i].started = 1;
        created++;
    }
    pthread_mutex_lock(&b->lock);
    while (b->ready < created)
        pthread_cond_wait(&b->cv, &b->lock);
    if (!rc)
        rc = b->setup_error;
    pthread_mutex_unlock(&b->lock);
    if (rc < 0) {
        bj_ioloop_free(b);
        return rc;
    }
    *out = b;
    return 0;
}

int bj_ioloop_run(struct bj_ioloop *b, uint32_t timeout_ms)
{
    if (!b)
        return -EINVAL;
    pthread_mutex_lock(&b->lock);
    if (!b->go) {
        b->start_ns = now_ns();
        b->go = 1;
        pthread_cond_broadcast(&b->cv);
    }
    struct timespec dl;
    clock_gettime(CLOCK_MONOTONIC, &dl);
    dl.tv_sec += timeout_ms / 1000;
    dl.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (dl.tv_nsec >= 1000000000L) {
        dl.tv_sec++;
        dl.tv_nsec -= 1000000000L;
    }
    while (!b->finished) {
        if (pthread_cond_timedwait(&b->cv, &b->lock, &dl) == ETIMEDOUT)
            break;
    }
    int finished = b->finished;
    pthread_mutex_unlock(&b->lock);
    if (!finished)
        return 2;
    int err = atomic_load(&b->error);
    if (err)
        return err;
    return atomic_load(&b->cancel) ? -ECANCELED : 0;
}

void bj_ioloop_cancel(struct bj_ioloop *b)
{
    if (b)
        atomic_store(&b->cancel, 1);
}

void bj_ioloop_get_result(struct bj_ioloop *b, struct bj_ioloop_result *r)
{
    if (!b || !r)
        return;
    pthread_mutex_lock(&b->lock);
    r->finished = b->finished;
    if (!b->go)
        r->elapsed_ns = 0;
    else if (b->finished)
        r->elapsed_ns = b->end_ns - b->start_ns;
    else
        r->elapsed_ns = now_ns() - b->start_ns;
    r->fsync_ns = b->fsync_ns;
    pthread_mutex_unlock(&b->lock);
    r->bytes = atomic_load(&b->bytes);
    r->ops = atomic_load(&b->ops);
    r->error = atomic_load(&b->error);
    r->error_offset = atomic_load(&b->error_offset);
}

int bj_ioloop_get_latency(struct bj_ioloop *b, uint64_t *counts)
{
    if (!b || !counts)
        return -EINVAL;
    /* finished is set under the lock after every worker stopped (the
     * stopped counter orders their last increments before it) */
    pthread_mutex_lock(&b->lock);
    int finished = b->finished;
    pthread_mutex_unlock(&b->lock);
    if (!finished)
        return -EBUSY;
    memset(counts, 0, BJ_LAT_BUCKETS * sizeof(*counts));
    for (uint32_t i = 0; i < b->nworkers; i++) {
        const uint64_t *lat = b->workers[i].lat;
        if (!lat)
            continue;
        for (uint32_t k = 0; k < BJ_LAT_BUCKETS; k++)
            counts[k] += lat[k];
    }
    return 0;
}

void bj_ioloop_free(struct bj_ioloop *b)
{
    if (!b)
        return;
    atomic_store(&b->cancel, 1);
    pthread_mutex_lock(&b->lock);
    b->shutdown = 1;
    pthread_cond_broadcast(&b->cv);
    pthread_mutex_unlock(&b->lock);
    for (uint32_t i = 0; i < b->nworkers; i++) {
        if (b->workers[i].started)
            pthread_join(b->workers[i].thread, NULL);
        buf_put(b->workers[i].buf, b->o.bs);
        free(b->workers[i].lat);
    }
    pthread_cond_destroy(&b->cv);
    pthread_mutex_destroy(&b->lock);
    free(b->workers);
    free(b);
}
