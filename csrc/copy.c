/* copy.c: the copy engine. Moves queued byte ranges from one fd to another
 * with N worker threads.
 *
 * Design (after nbdcopy's multi-thread copier):
 *  - A queue of work items (struct bj_range) lives in the engine. Workers
 *    claim requests from its head under one mutex: a request is at most
 *    request_size bytes (and at most what the rate limiter allows at once),
 *    never crossing an extent boundary of a sparse source.
 *  - A sparse item (BJ_RANGE_COPY_SPARSE) is mapped per work range of
 *    128 MiB, never for the whole file up front. A worker claims the work
 *    range under the mutex (it becomes "the mapper"), asks the file system
 *    for its extents (bj_extents: lseek SEEK_DATA/SEEK_HOLE) WITHOUT the
 *    mutex, and publishes them, one batch of extents at a time, as copy and
 *    zero items on the "mapped" queue, where every worker claims requests
 *    from. So a slow lseek (a fragmented file, NFS) never blocks the other
 *    workers' claims and completions, get_status or add.
 *  - Claim order is queue order (one worker alone copies strictly in order):
 *    the mapped queue comes first, the items after the range being mapped
 *    wait until it is mapped, and one work range is mapped at a time. The
 *    next work range is mapped ahead (while the mapped queue still holds
 *    less than a request per worker) so the workers rarely wait for it.
 *  - Each worker owns its buffer (allocated on first use), so the data path
 *    takes no lock of the queue: the mutex is held only to claim and to
 *    account.
 *  - Reads run in parallel; data writes to the target go one at a time
 *    (wlock, a sleeping mutex). A buffered pwrite holds the target inode's
 *    lock (i_rwsem) while it copies into the page cache, so the kernel
 *    serialises the writers anyway -- but its waiters spin on the owner
 *    (rwsem_spin_on_owner: a quarter of the samples of a dense copy), which
 *    on a host whose cores are busy takes the CPU from the reader and from
 *    the guests. Waiting here sleeps instead. Dense 512 MiB raw -> raw,
 *    page cache, median of 5 rounds (benchmarks/convert_raw.py, 2 shared
 *    cores): quiet 1.02 s / 0.29 s system against 1.34 s / 0.49 s before;
 *    with both cores busy 2.9 s / 0.47 s against 10.1 s / 1.46 s (the
 *    per-round ratio before/after 3.5).
 *  - Flags workers set while others test them without the mutex
 *    (no_copy_range here, the zeroer's in zero.c, the bucket's rate in
 *    ratelimit.c) are C11 atomics.
 *  - A data request is pread into the buffer, a piece of PIECE bytes at a
 *    time (each written before the next is read); with zero detection on, runs
 *    of all-zero blocks (zero_block bytes, aligned to target offsets) are
 *    skipped when the target already reads as zero, else zeroed with the
 *    ladder of zero.c; the other runs are pwritten. Without zero detection
 *    copy_file_range moves the bytes inside the kernel (falls back to
 *    read/write, remembered, when the file systems refuse it).
 *  - Progress ("done") grows when a request's writes completed.
 *  - The caller (Python, GIL released) calls bj_copy_run() which returns at
 *    least every timeout_ms so progress and job verbs stay live; workers keep
 *    running between calls until bj_copy_drain(), which is how a job pauses.
 *  - A zero request is at most 1 GiB (one fallocate), or a data request's
 *    size once the target is known to zero by writing (zero.c's last rung).
 *    Zeroes written that way are paced piece by piece (bj_zero_range_paced):
 *    they take from the rate limiter like data, and cancel or drain stops
 *    them between pieces; the pieces written count as done and the rest is
 *    handed back.
 *  - Cancel and errors are honoured between requests; the first error is
 *    recorded with its side and offset, the workers stop claiming. An engine
 *    that failed or was cancelled is not run again (the caller drains and
 *    frees it).
 *  - A buffered source is read through a mapping of the request's range
 *    (copy_mapped: mmap MAP_POPULATE, the pieces scanned and pwritten from
 *    it, munmap), which spares pread's copy into the buffer; a source that
 *    shrinks meanwhile (SIGBUS, EFAULT) sends the request back to pread.
 *  - prealloc (a fresh buffered target): bj_copy_add allocates the target
 *    ranges of copy items (fallocate KEEP_SIZE, adjacent items in one call)
 *    on the caller's thread, before any worker writes them. A buffered
 *    write into allocated (unwritten) blocks skips ext4's delayed
 *    allocation of every block (ext4_da_get_block_prep: reservation and
 *    extent status insert, 14-17% of a qcow2 -> raw copy's samples; 7%
 *    with prealloc), and the target's writes are the serial part of the
 *    copy (the inode lock). Zero runs found in the data are punched out
 *    again (flush_zeroes), so the target holds no more blocks than without.
 *    A sparse item's data extents are allocated by the mapper, as each
 *    batch of them is published (raw -> raw).
 *    1 GiB qcow2 -> raw, engine alone (benchmarks/engine_q2r.py), VM-shaped:
 *    CPU -15..-18%, wall per round 1.18-1.24x; dense: CPU -4..-12%, wall
 *    1.05-1.17x (benchmarks/README.md, stop 20). Only on a new file
 *    (convert_chain): an existing one taken as zero keeps its data.
 *  - Late allocation (prealloc): each punch of a zero run holds the inode
 *    lock, the writes' lock, and on a file system mounted with discard
 *    waits for the device (55 per VM-shaped GiB, 0.23 ms each). Once the
 *    punches reach 1/32 of the bytes allocated ahead, nothing more is
 *    allocated ahead: items and mapped extents are queued KIND_LATE, and a
 *    worker scans such a request whole from its mapping, allocates its data
 *    runs in claim order (late_alloc_turn) and writes them; its zero runs
 *    were never allocated. A dense source never punches, so keeps the
 *    allocation ahead. VM-shaped raw -> raw against allocating ahead
 *    (median of per-round ratios): 1 GiB quiet 1.12x, both cores busy 1.09x,
 *    busy in other sessions 1.21x; 4 GiB 2.29x, 1.60x, 2.92x. The target
 *    is in more extents (1 GiB: 125 instead of 49; cp's 69): the requests
 *    of four workers are not scanned in file order (benchmarks/README.md,
 *    stop 24).
 * Cost: one pwrite per piece of a request and one mmap + munmap per request
 * (or one pread + one pwrite per piece: O_DIRECT, a source that refuses
 * mmap; or one copy_file_range per request), one pass over each piece for
 * the zero scan; memory threads*PIECE, plus the mapped pages of the
 * requests in flight (threads*request_size, page cache shared with the
 * source's readers).
 */
#include "copy.h"
#include "dio.h"
#include "extents.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define WORK_RANGE (128ull << 20)
#define ZERO_CHUNK (1ull << 30)
#define EXT_BATCH 64   /* extents asked of the file system at once */
/* A data request is read and written in pieces of this size: a 2 MiB
 * buffer per worker (four of them) left the CPU's cache between the read and
 * the write, and the write's copy into the page cache
 * (copy_folio_from_iter_atomic: 80% of the samples) made a dense 1 GiB
 * raw -> raw copy 3-6x slower than with 256 KiB (benchmarks/README.md). */
#define PIECE (256ull << 10)
/* prealloc: shorter runs of data are left to the writes (a fragmented
 * sparse source would pay a fallocate, and the inode lock, per extent) */
#define PREALLOC_MIN (256ull << 10)

struct worker {
    struct bj_copy *c;
    pthread_t thread;
    void *buf;
    uint64_t bufsz;
    uint64_t wb_off, wb_len;  /* previous request, for write-behind */
    int started;
    /* O_DIRECT alignment of the source fds this worker read (bj_dio_align
     * costs an fcntl, and was asked twice per 256 KiB piece) */
    struct { int fd; uint32_t align; } fds[4];
    unsigned nfds;
    /* late allocation: the runs of the request being copied */
    struct run { uint64_t pos, len; int zero; } *runs;
    size_t cap_runs;
    /* its request queued unallocated, in claim order, not yet past the
     * allocation (late_alloc_turn); under the lock */
    uint64_t late_seq;
    int late_pending;
};

struct bj_copy {
    struct bj_copy_opts o;
    uint32_t nworkers;
    struct worker *workers;

    pthread_mutex_t lock;
    pthread_cond_t work_cv;   /* workers wait here for work / activation */
    pthread_cond_t done_cv;   /* run/drain wait here for progress */

    /* queue */
    struct bj_range *items;
    size_t n_items, cap_items, head;
    uint64_t head_pos;        /* bytes of items[head] already claimed */
    uint64_t unclaimed;
    /* requests handed back by workers interrupted while rate-limited */
    struct bj_range *returned;
    size_t n_returned;
    /* the mapped queue: copy / zero items from the extents of sparse work
     * ranges, claimed before the queue's head; m_pos bytes of
     * mapped[m_head] are claimed, m_left bytes of the mapped queue are not */
    struct bj_range *mapped;
    size_t n_mapped, cap_mapped, m_head;
    uint64_t m_pos, m_left;
    int mapping;              /* a worker is mapping a work range */

    /* state */
    int active, shutdown;
    uint32_t idle;            /* workers waiting on work_cv */
    uint32_t done_waiters;    /* run / drain callers waiting on done_cv */
    uint64_t low_water;       /* of the bj_copy_run() waiting, 0 = none */
    uint32_t in_flight;       /* requests (and the mapping) in progress */
    uint32_t throttled;       /* of which: waiting in the rate limiter */
    atomic_int cancel;
    atomic_int no_copy_range; /* copy_file_range refused: read/write */
    atomic_int no_mmap;       /* a source refused mmap: read into buffers */
    atomic_int no_prealloc;   /* the target refused fallocate: prealloc off */
    atomic_int no_unalloc;    /* it refused a punch: zero runs stay allocated */
    /* prealloc: allocation after the scan (see copy_runs_late). Set once the
     * punches of zero runs found in allocated ranges reach 1/32 of the bytes
     * allocated ahead (at least LATE_PUNCHES of them): from then on a copy
     * item or mapped extent is queued unallocated (KIND_LATE) and the worker
     * allocates a request's data runs once it has scanned it */
    atomic_int late_alloc;
    atomic_uint_fast64_t ahead_bytes;  /* allocated ahead of the scan */
    atomic_uint_fast64_t punched_bytes, punches;
    uint64_t late_next;       /* claim order of the unallocated requests */
    uint64_t keep_end;        /* prealloc: the target's data run at offset 0
                                 when the engine was made (a new raw file's
                                 first block, written by its creation): never
                                 punched */
    uint64_t page;            /* the page size (mmap offsets are multiples) */
    /* tests only: called after a request's source range is mapped */
    void (*after_map)(int fd, uint64_t off, uint64_t len);
    uint32_t dst_align;       /* the target's O_DIRECT alignment, 1: buffered */
    int direct;               /* the target or default source is O_DIRECT: no
                                 copy_file_range (it would move the bytes
                                 through the page cache) */
    struct bj_zeroer zeroer;  /* shared by the workers (atomic flags) */
    pthread_mutex_t wlock;    /* held around each data write to the target */

    /* status */
    uint64_t queued, done, data_bytes, zero_bytes, requests;
    int error, error_side;
    uint64_t error_offset;
};

/* REQ_MAP: map the work range r (a sparse item's) into the mapped queue. */
enum req_kind { REQ_COPY, REQ_ZERO, REQ_MAP };
struct req {
    enum req_kind kind;
    int late;                 /* its target range was not allocated ahead */
    struct bj_range r;
};
/* An item's kind with this bit: queued unallocated under prealloc (the
 * worker allocates its data runs after the scan). Internal: bj_copy_add
 * refuses kinds past BJ_RANGE_COPY_SPARSE. */
#define KIND_LATE 0x100u
#define LATE_PUNCHES 2

static int stopping(struct bj_copy *c)
{
    return c->error || atomic_load(&c->cancel);
}

static void set_error(struct bj_copy *c, int err, int side, uint64_t off)
{
    if (!c->error) {
        c->error = err;
        c->error_side = side;
        c->error_offset = off;
    }
}

/* 1 when zeroing the target is known to mean writing zeroes (both
 * fallocate rungs refused, or the one it may use): zero requests are then
 * cut like data ones, so progress, pause and rate stay as fine as for data. */
static int zeroes_by_writing(struct bj_copy *c)
{
    return !c->o.target_is_zero &&
           atomic_load_explicit(&c->zeroer.no_zero_range, memory_order_relaxed) &&
           (!c->o.may_unmap || atomic_load_explicit(&c->zeroer.no_punch, memory_order_relaxed));
}

/* Work may have become claimable: wake one idle worker. A worker that
 * claims leaves the next one to wake (wake_next), so only as many workers
 * wake as there is work for, not every worker per item (a broadcast per
 * queued 64 KiB cluster cost tens of thousands of futex calls and context
 * switches for an incremental backup). Called with the lock held. */
static void wake_worker(struct bj_copy *c)
{
    if (c->idle)
        pthread_cond_signal(&c->work_cv);
}

/* After a claim: if more is claimable, hand the wake-up on. */
static void wake_next(struct bj_copy *c)
{
    if (c->idle && (c->n_returned || c->unclaimed))
        pthread_cond_signal(&c->work_cv);
}

/* Something a run / drain waits for may have happened: everything done,
 * nothing in flight during a drain, an error, the low-water mark. Called
 * with the lock held; a plain completion wakes nobody (run returns at its
 * timeout for progress anyway). Nothing in flight while the engine runs is
 * no news for a run: with one worker (or all of them between requests on a
 * loaded host) it woke the caller after every request (a dense 1 GiB copy
 * with -m 1: 520 wake-ups of the waiting thread, each taking the lock back
 * from the worker). */
static void wake_waiters(struct bj_copy *c)
{
    if (!c->done_waiters)
        return;
    if ((c->in_flight == 0 && !c->active) || c->error || atomic_load(&c->cancel) ||
        c->done == c->queued ||
        (c->low_water && c->unclaimed < c->low_water))
        pthread_cond_broadcast(&c->done_cv);
}

/* Cut the next request off item it, of which *pos bytes are claimed; zero
 * items in pieces of zmax bytes. */
static void cut(const struct bj_range *it, uint64_t *pos, uint64_t maxreq, uint64_t zmax,
                struct req *q)
{
    uint64_t rem = it->len - *pos, n;
    if (it->kind == BJ_RANGE_ZERO) {
        n = rem < zmax ? rem : zmax;
        q->kind = REQ_ZERO;
    } else {
        n = rem < maxreq ? rem : maxreq;
        q->kind = REQ_COPY;
    }
    q->r.src_off = it->src_off + *pos;
    q->r.dst_off = it->dst_off + *pos;
    q->r.len = n;
    q->r.src_fd = it->src_fd;
    q->r.kind = q->kind == REQ_ZERO ? BJ_RANGE_ZERO : BJ_RANGE_COPY;
    q->late = (it->kind & KIND_LATE) != 0;
    *pos += n;
}

/* The first item of the queue with bytes left to claim, or NULL. */
static struct bj_range *head_item(struct bj_copy *c)
{
    while (c->head < c->n_items && c->head_pos == c->items[c->head].len) {
        c->head++;
        c->head_pos = 0;
    }
    return c->head < c->n_items ? &c->items[c->head] : NULL;
}

/* Claim the next request. Called with the lock held. Returns 1 with *q set,
 * 0 when nothing is claimable. */
static int claim(struct bj_copy *c, struct req *q)
{
    if (c->n_returned) {
        q->r = c->returned[--c->n_returned];
        q->late = (q->r.kind & KIND_LATE) != 0;
        q->r.kind &= ~KIND_LATE;
        q->kind = q->r.kind == BJ_RANGE_ZERO ? REQ_ZERO : REQ_COPY;
        return 1;
    }
    uint64_t maxreq = c->o.request_size;
    if (c->o.bucket) {
        uint64_t m = bj_bucket_max_request(c->o.bucket);
        if (m < maxreq)
            maxreq = m;
    }
    uint64_t zmax = zeroes_by_writing(c) ? maxreq : ZERO_CHUNK;
    struct bj_range *it = c->mapping ? NULL : head_item(c);
    if (it && it->kind == BJ_RANGE_COPY_SPARSE && c->m_left < (uint64_t)c->nworkers * maxreq) {
        /* become the mapper of the next work range (ahead, while the
         * mapped queue runs low); its bytes stay unclaimed until mapped */
        uint64_t rem = it->len - c->head_pos;
        q->kind = REQ_MAP;
        q->late = 0;
        q->r.src_off = it->src_off + c->head_pos;
        q->r.dst_off = it->dst_off + c->head_pos;
        q->r.len = rem < WORK_RANGE ? rem : WORK_RANGE;
        q->r.src_fd = it->src_fd;
        q->r.kind = BJ_RANGE_COPY_SPARSE;
        c->head_pos += q->r.len;
        c->mapping = 1;
        return 1;
    }
    while (c->m_head < c->n_mapped) {
        struct bj_range *m = &c->mapped[c->m_head];
        if (c->m_pos == m->len) {
            c->m_head++;
            c->m_pos = 0;
            continue;
        }
        cut(m, &c->m_pos, maxreq, zmax, q);
        c->m_left -= q->r.len;
        c->unclaimed -= q->r.len;
        return 1;
    }
    if (c->mapping || !it)
        return 0; /* the range being mapped comes before the queue's head */
    cut(it, &c->head_pos, maxreq, zmax, q);
    c->unclaimed -= q->r.len;
    return 1;
}

/* Append [src_off, src_off+len) of work range wr to the mapped queue as a
 * copy (data) or zero (hole) item. Called with the lock held. */
static int publish(struct bj_copy *c, const struct bj_range *wr, uint64_t src_off, uint64_t len,
                   uint32_t kind)
{
    if (len == 0)
        return 0;
    if (c->m_head > 0 && c->m_head >= c->n_mapped / 2) {
        memmove(c->mapped, c->mapped + c->m_head, (c->n_mapped - c->m_head) * sizeof(*c->mapped));
        c->n_mapped -= c->m_head;
        c->m_head = 0;
    }
    if (c->n_mapped == c->cap_mapped) {
        size_t cap = c->cap_mapped ? 2 * c->cap_mapped : EXT_BATCH;
        struct bj_range *p = realloc(c->mapped, cap * sizeof(*p));
        if (!p)
            return -ENOMEM;
        c->mapped = p;
        c->cap_mapped = cap;
    }
    struct bj_range *m = &c->mapped[c->n_mapped++];
    m->src_off = src_off;
    m->dst_off = wr->dst_off + (src_off - wr->src_off);
    m->len = len;
    m->kind = kind;
    m->src_fd = wr->src_fd;
    c->m_left += len;
    return 0;
}

static void prealloc_items(struct bj_copy *c, const struct bj_range *r, size_t n);

/* prealloc, a sparse item: the data extents of a batch (clipped to
 * [pos, end) of work range wr) allocated in the target before they are
 * published, so before any worker writes them. Called without the lock. */
static void prealloc_extents(struct bj_copy *c, const struct bj_range *wr, uint64_t pos,
                             uint64_t end, const struct bj_extent *ext, size_t n)
{
    struct bj_range r[EXT_BATCH];
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t a = ext[i].offset, b = ext[i].offset + ext[i].length;
        if (!(ext[i].flags & BJ_EXTENT_DATA))
            continue;
        a = a < pos ? pos : a;
        b = b > end ? end : b;
        if (b <= a)
            continue;
        r[k].src_off = a;
        r[k].dst_off = wr->dst_off + (a - wr->src_off);
        r[k].len = b - a;
        r[k].kind = BJ_RANGE_COPY;
        r[k].src_fd = wr->src_fd;
        k++;
    }
    prealloc_items(c, r, k);
}

/* The mapper's work: ask the extents of work range wr without the lock, a
 * batch at a time, and publish each batch. Called (and returns) with the
 * lock held. Extents are taken as the file system reports them but never
 * trusted to cover the range: what they leave out is copied as data. */
static void map_work_range(struct bj_copy *c, const struct bj_range *wr)
{
    struct bj_extent ext[EXT_BATCH];
    uint64_t pos = wr->src_off, end = wr->src_off + wr->len;
    while (pos < end && !stopping(c) && !c->shutdown) {
        size_t n = 0;
        uint64_t next = end;
        pthread_mutex_unlock(&c->lock);
        int rc = bj_extents(wr->src_fd, pos, end - pos, ext, EXT_BATCH, &n, &next);
        /* once late allocation is on, the batch's data is left to the
         * workers' scans (KIND_LATE), else allocated here */
        uint32_t late = c->o.prealloc && atomic_load(&c->late_alloc) ? KIND_LATE : 0;
        if (rc == 0 && c->o.prealloc && !late)
            prealloc_extents(c, wr, pos, end, ext, n);
        pthread_mutex_lock(&c->lock);
        if (rc < 0) {
            set_error(c, rc, BJ_SIDE_SOURCE, pos);
            return;
        }
        uint64_t cur = pos;
        for (size_t i = 0; i < n && rc == 0; i++) {
            uint64_t e_off = ext[i].offset, e_end = ext[i].offset + ext[i].length;
            if (e_end > end)
                e_end = end;
            if (e_end <= cur)
                continue;
            if (e_off > cur) /* a gap in the answer: copy it */
                rc = publish(c, wr, cur, e_off - cur, BJ_RANGE_COPY | late);
            else
                e_off = cur;
            if (rc == 0)
                rc = publish(c, wr, e_off, e_end - e_off,
                             (ext[i].flags & BJ_EXTENT_DATA) ? BJ_RANGE_COPY | late
                                                             : BJ_RANGE_ZERO);
            cur = e_end;
        }
        if (rc == 0 && cur == pos) { /* no progress (cannot happen): copy the rest */
            rc = publish(c, wr, pos, end - pos, BJ_RANGE_COPY | late);
            cur = end;
        }
        if (rc < 0) {
            set_error(c, rc, BJ_SIDE_NONE, wr->dst_off + (pos - wr->src_off));
            return;
        }
        pos = cur;
        wake_worker(c);
    }
}

static void unprealloc(struct bj_copy *c, uint64_t off, uint64_t len);

static int zero_target(struct bj_copy *c, uint64_t off, uint64_t len)
{
    if (c->o.target_is_zero)
        return 0;
    return bj_zero_range(&c->zeroer, c->o.dst_fd, off, len, c->o.may_unmap);
}

/* Reads and writes go through dio.c: they work on an O_DIRECT fd too
 * (unaligned requests through an aligned bounce buffer). */
static int pread_full(int fd, uint32_t align, char *buf, uint64_t len, uint64_t off)
{
    int64_t got = bj_dio_pread_a(fd, align, buf, len, off);
    if (got < 0)
        return (int)got;
    if ((uint64_t)got < len) /* past the end of the source: reads as zeroes */
        memset(buf + got, 0, len - (uint64_t)got);
    return 0;
}

static int pwrite_full(int fd, uint32_t align, const char *buf, uint64_t len, uint64_t off,
                       uint64_t *fail_off)
{
    int64_t rc = bj_dio_pwrite_a(fd, align, buf, len, off, fail_off);
    return rc < 0 ? (int)rc : 0;
}

/* A data write to the target: one writer at a time (see the top). On an
 * O_DIRECT target no page cache is copied into, and the writers wait for
 * the disk: block-aligned writes go in parallel (a request's aligned blocks
 * are its own); an unaligned one (its partial blocks are read, patched and
 * written: dio.c) still takes the lock, as the request next to it may
 * patch the same block. */
static int write_target(struct bj_copy *c, const char *buf, uint64_t len, uint64_t off,
                        uint64_t *fail_off)
{
    if (c->dst_align > 1 && off % c->dst_align == 0 && len % c->dst_align == 0)
        return pwrite_full(c->o.dst_fd, c->dst_align, buf, len, off, fail_off);
    pthread_mutex_lock(&c->wlock);
    int rc = pwrite_full(c->o.dst_fd, c->dst_align, buf, len, off, fail_off);
    pthread_mutex_unlock(&c->wlock);
    return rc;
}

/* copy_file_range loop. Returns 0, -errno, or 1 when the kernel refused and
 * the caller should fall back to read/write (remembered in c). */
static int copy_range(struct bj_copy *c, const struct bj_range *r, int *side, uint64_t *fail_off)
{
    uint64_t done = 0;
    while (done < r->len) {
        loff_t in = (loff_t)(r->src_off + done), out = (loff_t)(r->dst_off + done);
        ssize_t n = copy_file_range(r->src_fd, &in, c->o.dst_fd, &out, r->len - done, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            /* EINVAL part-way: O_DIRECT switched on meanwhile (a reopen, dio.c):
             * the read/write path does the whole request again */
            if ((done == 0 || (errno == EINVAL && (bj_dio_align(c->o.dst_fd) > 1 ||
                                                   bj_dio_align(r->src_fd) > 1))) &&
                (errno == EXDEV || errno == EINVAL || errno == ENOSYS ||
                 errno == EOPNOTSUPP || errno == ENOTSUP || errno == EBADF)) {
                atomic_store_explicit(&c->no_copy_range, 1, memory_order_relaxed);
                return 1;
            }
            /* cannot tell which side failed: ENOSPC/EDQUOT/EFBIG are the target's */
            *side = (errno == ENOSPC || errno == EDQUOT || errno == EFBIG) ? BJ_SIDE_TARGET
                                                                           : BJ_SIDE_SOURCE;
            *fail_off = *side == BJ_SIDE_TARGET ? (uint64_t)out : (uint64_t)in;
            return -errno;
        }
        if (n == 0) { /* source shorter than expected: rest reads as zeroes */
            if (c->o.prealloc)
                unprealloc(c, r->dst_off + done, r->len - done);
            int rc = zero_target(c, r->dst_off + done, r->len - done);
            if (rc < 0) {
                *side = BJ_SIDE_TARGET;
                *fail_off = r->dst_off + done;
                return rc;
            }
            break;
        }
        done += (uint64_t)n;
    }
    return 0;
}

static int throttle(struct bj_copy *c, uint64_t n);
static int interrupted(struct bj_copy *c);

/* The zeroer's pace for a zero request: called before each piece of zeroes
 * it writes, once every piece before has been written. */
struct zpace {
    struct bj_copy *c;
    uint64_t written, cleared; /* bytes written / let through so far */
    int stopped;
};

static int pace_zero(void *arg, uint64_t n)
{
    struct zpace *p = arg;
    struct bj_copy *c = p->c;
    p->written = p->cleared;
    if (c->o.bucket && bj_bucket_rate(c->o.bucket))
        p->stopped = throttle(c, n);
    else
        p->stopped = interrupted(c);
    if (!p->stopped)
        p->cleared += n;
    return p->stopped;
}

/* A zero run in a target range bj_copy_add allocated: deallocated again
 * (it reads as zeroes either way; the punch only keeps the target as
 * sparse as without prealloc). Not fatal when refused. */
static void unprealloc(struct bj_copy *c, uint64_t off, uint64_t len)
{
    if (atomic_load_explicit(&c->no_unalloc, memory_order_relaxed))
        return;
    if (off < c->keep_end) { /* allocated before the copy: stays so */
        if (off + len <= c->keep_end)
            return;
        len -= c->keep_end - off;
        off = c->keep_end;
    }
    if (fallocate(c->o.dst_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off,
                  (off_t)len) < 0) {
        if (errno != EINTR)
            atomic_store_explicit(&c->no_unalloc, 1, memory_order_relaxed);
        return;
    }
    /* Each punch holds the target's inode lock (the writes wait), and on a
     * file system mounted with discard it waits for the device. A source
     * whose data holds zero runs is from here on allocated after the scan
     * (copy_runs_late): the zero runs are never allocated. */
    uint64_t p = atomic_fetch_add_explicit(&c->punched_bytes, len, memory_order_relaxed) + len;
    uint64_t k = atomic_fetch_add_explicit(&c->punches, 1, memory_order_relaxed) + 1;
    if (k >= LATE_PUNCHES && p * 32 >= atomic_load_explicit(&c->ahead_bytes, memory_order_relaxed))
        atomic_store(&c->late_alloc, 1);
}

/* A run of zero blocks found but not yet zeroed: runs of consecutive
 * pieces join, so a long zero run is one zeroing call as before. */
struct zrun {
    uint64_t off, len;
    int punch;    /* the request's range was allocated: punch zero runs */
};

static int flush_zeroes(struct bj_copy *c, struct zrun *z, uint64_t *fail_off, uint64_t *zero)
{
    if (!z->len)
        return 0;
    if (z->punch)
        unprealloc(c, z->off, z->len);
    int rc = zero_target(c, z->off, z->len);
    if (rc < 0) {
        *fail_off = z->off;
        return rc;
    }
    *zero += z->len;
    z->len = 0;
    return 0;
}

/* The run at buf (n bytes for target offset off) of blocks (zero_block zb,
 * aligned to target offsets) that all read as zero or all hold data: its
 * length; *is_zero says which. */
static uint64_t scan_run(const char *buf, uint64_t n, uint64_t off, uint64_t zb, int *is_zero)
{
    uint64_t first = zb - off % zb;           /* bytes to the next boundary */
    if (first > n)
        first = n;
    *is_zero = bj_is_zero(buf, first);
    uint64_t run = first;
    if (run < n)
        run += bj_zero_run(buf + run, n - run, zb, *is_zero);
    return run;
}

/* Write one piece read into buf (n bytes for target offset off): its runs
 * of data blocks are written, its runs of zero blocks (blocks of zero_block
 * bytes aligned to target offsets) join *z. */
static int put_piece(struct bj_copy *c, const char *buf, uint64_t n, uint64_t off,
                     struct zrun *z, int *side, uint64_t *fail_off, uint64_t *data,
                     uint64_t *zero)
{
    int rc;
    uint64_t zb = c->o.zero_block, pos = 0;
    if (zb == 0) {
        rc = write_target(c, buf, n, off, fail_off);
        if (rc < 0)
            *side = BJ_SIDE_TARGET;
        else
            *data += n;
        return rc;
    }
    while (pos < n) {
        uint64_t abs = off + pos;
        int is_zero;
        uint64_t run = scan_run(buf + pos, n - pos, abs, zb, &is_zero);
        if (is_zero) {
            if (z->len && z->off + z->len == abs) {
                z->len += run;
            } else {
                rc = flush_zeroes(c, z, fail_off, zero);
                if (rc < 0) {
                    *side = BJ_SIDE_TARGET;
                    return rc;
                }
                z->off = abs;
                z->len = run;
            }
        } else {
            rc = flush_zeroes(c, z, fail_off, zero);
            if (rc == 0)
                rc = write_target(c, buf + pos, run, abs, fail_off);
            if (rc < 0) {
                *side = BJ_SIDE_TARGET;
                return rc;
            }
            *data += run;
        }
        pos += run;
    }
    return 0;
}

/* The O_DIRECT alignment of source fd (1: buffered), remembered per worker
 * (an engine's fds stay open and keep their flags while it runs). */
static uint32_t src_align(struct worker *w, int fd)
{
    for (unsigned i = 0; i < w->nfds; i++)
        if (w->fds[i].fd == fd)
            return w->fds[i].align;
    uint32_t a = bj_dio_align(fd);
    unsigned slot = w->nfds < 4 ? w->nfds++ : (unsigned)fd % 4;
    w->fds[slot].fd = fd;
    w->fds[slot].align = a;
    return a;
}

/* Reading a mapped source: the page cache's bytes are scanned and written
 * to the target straight from the mapping, without the copy of pread into
 * the worker's buffer (a third of a dense raw -> raw copy's CPU, as much as
 * the write's copy into the target's page cache). A source that shrinks
 * under the mapping (another process truncating it) raises SIGBUS on the
 * scan's access and EFAULT on the pwrite's: both end the mapped attempt and
 * the request is done again with pread (whose short read reads as zeroes).
 * The SIGBUS handler jumps back only for a worker inside a mapped scan
 * (bus_jb, per thread); any other SIGBUS goes to the handler found when it
 * was installed (Python's faulthandler under pytest), or the default. */
/* initial-exec: the handler reads it without a lazy TLS allocation */
static _Thread_local sigjmp_buf *bus_jb __attribute__((tls_model("initial-exec")));
static struct sigaction bus_prev;
static pthread_mutex_t bus_lock = PTHREAD_MUTEX_INITIALIZER;

static void on_sigbus(int sig, siginfo_t *si, void *uc)
{
    sigjmp_buf *jb = bus_jb;
    if (jb)
        siglongjmp(*jb, 1);
    if (bus_prev.sa_flags & SA_SIGINFO) {
        if (bus_prev.sa_sigaction) {
            bus_prev.sa_sigaction(sig, si, uc);
            return;
        }
    } else if (bus_prev.sa_handler != SIG_DFL && bus_prev.sa_handler != SIG_IGN) {
        bus_prev.sa_handler(sig);
        return;
    }
    /* the default action: on return the fault repeats (or the raise lands) */
    signal(SIGBUS, SIG_DFL);
    raise(SIGBUS);
}

/* Install on_sigbus unless it is the handler now (installed again when
 * something replaced it since). 0, or -errno: no mapped reads. */
static int install_sigbus(void)
{
    struct sigaction cur, sa;
    int rc = 0;
    pthread_mutex_lock(&bus_lock);
    if (sigaction(SIGBUS, NULL, &cur) < 0) {
        rc = -errno;
    } else if (!((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_sigbus)) {
        memset(&sa, 0, sizeof(sa));
        sa.sa_sigaction = on_sigbus;
        sa.sa_flags = SA_SIGINFO | SA_NODEFER; /* (jumped out of: not left blocked) */
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGBUS, &sa, &bus_prev) < 0)
            rc = -errno;
    }
    pthread_mutex_unlock(&bus_lock);
    return rc;
}

/* 1 when worker w's unallocated request is the oldest one not yet past its
 * allocation: then the data runs are allocated in claim order. A request
 * scanned before an older one was allocated leaves its data to the file
 * system's delayed allocation (at writeback, in file order) rather than
 * wait. Either way w is past it. The target of a VM-shaped GiB came out in
 * 125 extents with this order against 167 without it (49 allocating ahead;
 * waiting for the older requests instead: 111, no better than 113 for this
 * rule in the same run; benchmarks/README.md, stop 24). */
static int late_alloc_turn(struct worker *w)
{
    struct bj_copy *c = w->c;
    int turn = 1;
    pthread_mutex_lock(&c->lock);
    for (uint32_t i = 0; i < c->nworkers; i++) {
        const struct worker *o = &c->workers[i];
        if (o != w && o->late_pending && o->late_seq < w->late_seq)
            turn = 0;
    }
    w->late_pending = 0;
    pthread_mutex_unlock(&c->lock);
    return turn;
}

/* Late allocation (prealloc, a request queued unallocated): the request
 * mapped at base is scanned whole into runs of data and zero blocks, its data
 * runs of PREALLOC_MIN or more are allocated (in one fallocate each), then
 * the data runs are written in pieces and the zero runs zeroed (a target
 * that reads as zero: skipped). Its zero runs were never allocated, so
 * nothing is punched. The scan of a data block stops at its first non-zero
 * byte, so scanning ahead of the writes costs little more than scanning
 * each piece before it is written. Returns 0, -errno, or -ENOMEM when the
 * run list cannot grow (the caller copies the request as before);
 * *allocated: a data run was allocated. */
static int copy_runs_late(struct worker *w, const char *base, const struct bj_range *r,
                          uint64_t piece, int *side, uint64_t *fail_off, uint64_t *data,
                          uint64_t *zero, int *allocated)
{
    struct bj_copy *c = w->c;
    uint64_t zb = c->o.zero_block, pos = 0;
    size_t n = 0;
    while (pos < r->len) {
        int is_zero;
        uint64_t run = scan_run(base + pos, r->len - pos, r->dst_off + pos, zb, &is_zero);
        if (n == w->cap_runs) {
            size_t cap = w->cap_runs ? 2 * w->cap_runs : 64;
            struct run *p = realloc(w->runs, cap * sizeof(*p));
            if (!p)
                return -ENOMEM;
            w->runs = p;
            w->cap_runs = cap;
        }
        w->runs[n].pos = pos;
        w->runs[n].len = run;
        w->runs[n].zero = is_zero;
        n++;
        pos += run;
    }
    int turn = late_alloc_turn(w);
    for (size_t i = 0; i < n && turn; i++) {
        if (w->runs[i].zero || w->runs[i].len < PREALLOC_MIN ||
            atomic_load_explicit(&c->no_prealloc, memory_order_relaxed))
            continue;
        if (fallocate(c->o.dst_fd, FALLOC_FL_KEEP_SIZE, (off_t)(r->dst_off + w->runs[i].pos),
                      (off_t)w->runs[i].len) == 0)
            *allocated = 1;
        else if (errno != EINTR)
            atomic_store_explicit(&c->no_prealloc, 1, memory_order_relaxed);
    }
    for (size_t i = 0; i < n; i++) {
        uint64_t off = r->dst_off + w->runs[i].pos, len = w->runs[i].len;
        const char *p = base + w->runs[i].pos;
        if (w->runs[i].zero) {
            int rc = zero_target(c, off, len);
            if (rc < 0) {
                *side = BJ_SIDE_TARGET;
                *fail_off = off;
                return rc;
            }
            *zero += len;
            continue;
        }
        for (uint64_t done = 0; done < len;) {
            uint64_t k = piece - (off + done) % piece;  /* pieces end where put_piece's do */
            if (k > len - done)
                k = len - done;
            int rc = write_target(c, p + done, k, off + done, fail_off);
            if (rc < 0) {
                *side = BJ_SIDE_TARGET;
                return rc;
            }
            *data += k;
            done += k;
        }
    }
    return 0;
}

/* The request's pieces scanned and written from a mapping of the source.
 * Returns 0 or -errno like do_request, or 1: not done (mmap refused, the
 * source is shorter than the request or shrank meanwhile), do it with pread;
 * *data and *zero are then as on entry. */
static int copy_mapped(struct worker *w, const struct req *q, uint64_t piece, int *side,
                       uint64_t *fail_off, uint64_t *data, uint64_t *zero, int *allocated)
{
    const struct bj_range *r = &q->r;
    struct bj_copy *c = w->c;
    uint64_t pg = c->page;
    struct stat st;
    if (fstat(r->src_fd, &st) < 0 || (uint64_t)st.st_size < r->src_off + r->len)
        return 1; /* past the end of the source (reads as zeroes): pread does that */
    uint64_t moff = r->src_off - r->src_off % pg;
    size_t mlen = (size_t)(r->src_off + r->len - moff);
    void *m = mmap(NULL, mlen, PROT_READ, MAP_SHARED | MAP_POPULATE, r->src_fd, (off_t)moff);
    if (m == MAP_FAILED) {
        if (errno != ENOMEM && errno != EAGAIN)
            atomic_store_explicit(&c->no_mmap, 1, memory_order_relaxed);
        return 1;
    }
    if (c->after_map)
        c->after_map(r->src_fd, r->src_off, r->len);
    const char *base = (const char *)m + (r->src_off - moff);
    uint64_t data0 = *data, zero0 = *zero;
    int rc;
    sigjmp_buf jb;
    if (sigsetjmp(jb, 0) == 0) {
        bus_jb = &jb;
        struct zrun zr = { 0, 0, c->o.prealloc && !q->late };
        uint64_t pos = 0;
        rc = 0;
        if (q->late && c->o.zero_block &&
            !atomic_load_explicit(&c->no_prealloc, memory_order_relaxed)) {
            rc = copy_runs_late(w, base, r, piece, side, fail_off, data, zero, allocated);
            if (rc == -ENOMEM) { /* no room for the runs: piece by piece below */
                *data = data0;
                *zero = zero0;
                rc = 0;
            } else {
                pos = r->len;
            }
        }
        while (pos < r->len && rc == 0) {
            uint64_t n = piece - (r->dst_off + pos) % piece;
            if (n > r->len - pos)
                n = r->len - pos;
            rc = put_piece(c, base + pos, n, r->dst_off + pos, &zr, side, fail_off, data, zero);
            pos += n;
        }
        bus_jb = NULL;
        if (rc == 0) {
            rc = flush_zeroes(c, &zr, fail_off, zero);
            if (rc < 0)
                *side = BJ_SIDE_TARGET;
        } else if (rc == -EFAULT) {
            rc = 1; /* the pwrite met a page the source lost */
        }
    } else {
        bus_jb = NULL; /* SIGBUS: the source shrank under the scan */
        rc = 1;
    }
    munmap(m, mlen);
    if (rc == 1) {
        *data = data0;
        *zero = zero0;
    }
    return rc;
}

/* Do one request. Returns 0 or -errno with *side / *fail_off set, or 1 when
 * a zero request stopped part-way (cancel, drain, error elsewhere): its first
 * *partial bytes are done, the rest is to be handed back. */
static int do_request(struct worker *w, const struct req *q, int *side, uint64_t *fail_off,
                      uint64_t *data, uint64_t *zero, uint64_t *partial)
{
    struct bj_copy *c = w->c;
    const struct bj_range *r = &q->r;
    int rc;

    if (q->kind == REQ_ZERO) {
        if (c->o.target_is_zero) {
            *zero += r->len;
            return 0;
        }
        /* paced: zeroes written by the ladder's last rung go through the
         * rate limit and stop on cancel / drain, keeping what was written */
        struct zpace p = { c, 0, 0, 0 };
        uint64_t piece = c->o.request_size;
        if (c->o.bucket && bj_bucket_max_request(c->o.bucket) < piece)
            piece = bj_bucket_max_request(c->o.bucket);
        rc = bj_zero_range_paced(&c->zeroer, c->o.dst_fd, r->dst_off, r->len, c->o.may_unmap,
                                 piece, pace_zero, &p);
        if (rc == -ECANCELED && p.stopped) {
            *zero += p.written;
            *partial = p.written;
            return 1;
        }
        if (rc < 0) {
            *side = BJ_SIDE_TARGET;
            *fail_off = r->dst_off;
        } else {
            *zero += r->len;
        }
        return rc;
    }
    if (c->o.zero_block == 0 && c->o.allow_copy_range && !c->direct &&
        !(r->src_fd >= 0 && r->src_fd != c->o.src_fd && src_align(w, r->src_fd) > 1) &&
        !atomic_load_explicit(&c->no_copy_range, memory_order_relaxed)) {
        rc = copy_range(c, r, side, fail_off);
        if (rc <= 0) {
            if (rc == 0)
                *data += r->len;
            return rc;
        }
    }
    /* The request moves in pieces of PIECE bytes (read, scan, write each
     * while it is in the CPU's cache), aligned to target offsets and a
     * multiple of the zero block, so no block straddles two pieces. */
    uint64_t zb = c->o.zero_block;
    /* O_DIRECT: no cache to keep the piece in between read and write, and
     * each call waits for the disk: the whole request at once */
    uint64_t piece = c->direct && c->o.request_size > PIECE ? c->o.request_size : PIECE;
    int allocated = 0;
    if (zb)
        piece = zb >= piece ? zb : piece - piece % zb;
    if (!c->direct && !atomic_load_explicit(&c->no_mmap, memory_order_relaxed) &&
        src_align(w, r->src_fd) <= 1) {
        rc = copy_mapped(w, q, piece, side, fail_off, data, zero, &allocated);
        if (rc <= 0)
            return rc;
    }
    uint64_t bufsz = r->len < piece ? r->len : piece;
    if (!w->buf || w->bufsz < bufsz) {
        free(w->buf);
        w->bufsz = 0;
        if (posix_memalign(&w->buf, 4096, bufsz)) {
            w->buf = NULL;
            *side = BJ_SIDE_NONE;
            *fail_off = r->dst_off;
            return -ENOMEM;
        }
        w->bufsz = bufsz;
    }
    /* a request queued unallocated has none of its zero runs allocated,
     * unless the mapped attempt allocated its data before it failed */
    struct zrun zr = { 0, 0, c->o.prealloc && (!q->late || allocated) };
    uint64_t pos = 0;
    while (pos < r->len) {
        /* pieces end at multiples of piece in the target (so the page
         * cache's copy stays in the CPU cache); under O_DIRECT the whole
         * request, only its zero blocks kept whole */
        uint64_t n = c->direct ? piece - (zb ? (r->dst_off + pos) % zb : 0)
                               : piece - (r->dst_off + pos) % piece;
        if (n > r->len - pos)
            n = r->len - pos;
        rc = pread_full(r->src_fd, src_align(w, r->src_fd), w->buf, n, r->src_off + pos);
        if (rc < 0) {
            *side = BJ_SIDE_SOURCE;
            *fail_off = r->src_off + pos;
            return rc;
        }
        rc = put_piece(c, w->buf, n, r->dst_off + pos, &zr, side, fail_off, data, zero);
        if (rc < 0)
            return rc;
        pos += n;
    }
    rc = flush_zeroes(c, &zr, fail_off, zero);
    if (rc < 0)
        *side = BJ_SIDE_TARGET;
    return rc;
}

/* 1 when the workers are to stop between requests (cancel, drain, an
 * error). Called without the lock. */
static int interrupted(struct bj_copy *c)
{
    if (atomic_load(&c->cancel))
        return 1;
    pthread_mutex_lock(&c->lock);
    int stop = !c->active || c->error;
    pthread_mutex_unlock(&c->lock);
    return stop;
}

/* Sleep for the rate limiter. Returns 1 if the request must be handed back
 * (drain or cancel arrived before or while sleeping). Called without the
 * lock. */
static int throttle(struct bj_copy *c, uint64_t n)
{
    if (interrupted(c))
        return 1;
    uint64_t wait = bj_bucket_take(c->o.bucket, n, bj_now_ns());
    int handed_back = 0;
    if (wait == 0)
        return 0;
    pthread_mutex_lock(&c->lock);
    c->throttled++;            /* the job reads as not busy (QEMU: sleeping) */
    pthread_mutex_unlock(&c->lock);
    uint64_t rate = bj_bucket_rate(c->o.bucket);
    while (wait > 0) {
        uint64_t slice = wait < 10000000u ? wait : 10000000u; /* 10 ms */
        struct timespec ts = { (time_t)(slice / 1000000000u), (long)(slice % 1000000000u) };
        nanosleep(&ts, NULL);
        wait -= slice;
        if (interrupted(c)) {
            handed_back = 1;
            break;
        }
        /* set-speed while sleeping (QEMU kicks a job sleeping in its rate
         * limit): what is left of the wait is owed at the new rate; none
         * when the limit is lifted */
        uint64_t now_rate = bj_bucket_rate(c->o.bucket);
        if (now_rate != rate && wait > 0) {
            wait = now_rate ? (uint64_t)((double)wait * (double)rate / (double)now_rate) : 0;
            rate = now_rate;
        }
    }
    pthread_mutex_lock(&c->lock);
    c->throttled--;
    pthread_mutex_unlock(&c->lock);
    return handed_back;
}

/* Write-behind for durable copies (the page-cache discipline nbdcopy uses):
 * start writeback of each request as soon as it is written, then wait for
 * the writeback of this worker's previous request and drop its pages from
 * the cache. Disk writes overlap the copy, dirty memory stays bounded to
 * about two requests per worker, and the final fsync has almost nothing
 * left to do. Errors here are not fatal: the final fsync reports them. */
static void write_behind(struct worker *w, const struct req *q)
{
    struct bj_copy *c = w->c;
    int fd = c->o.dst_fd;
    (void)sync_file_range(fd, (off_t)q->r.dst_off, (off_t)q->r.len, SYNC_FILE_RANGE_WRITE);
    if (w->wb_len) {
        (void)sync_file_range(fd, (off_t)w->wb_off, (off_t)w->wb_len,
                              SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
                                  SYNC_FILE_RANGE_WAIT_AFTER);
        (void)posix_fadvise(fd, (off_t)w->wb_off, (off_t)w->wb_len, POSIX_FADV_DONTNEED);
    }
    w->wb_off = q->r.dst_off;
    w->wb_len = q->r.len;
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    struct bj_copy *c = w->c;
    pthread_mutex_lock(&c->lock);
    for (;;) {
        struct req q = { .kind = REQ_COPY }; /* (set by claim; the analyzer cannot tell) */
        while (!c->shutdown && (!c->active || stopping(c) || !claim(c, &q))) {
            c->idle++;
            pthread_cond_wait(&c->work_cv, &c->lock);
            c->idle--;
        }
        if (c->shutdown)
            break;
        c->in_flight++;
        if (q.kind == REQ_COPY && q.late) {
            w->late_seq = c->late_next++;
            w->late_pending = 1;
        }
        wake_next(c);
        if (q.kind == REQ_MAP) {
            map_work_range(c, &q.r);
            c->mapping = 0;
            c->in_flight--;
            wake_worker(c); /* the items after the range are claimable now */
            wake_waiters(c);
            continue;
        }
        pthread_mutex_unlock(&c->lock);

        int side = BJ_SIDE_NONE, rc = 0, handed_back = 0;
        uint64_t fail_off = 0, data = 0, zero = 0, partial = 0;
        if (q.kind == REQ_COPY && c->o.bucket && bj_bucket_rate(c->o.bucket))
            handed_back = throttle(c, q.r.len);
        if (!handed_back) {
            rc = do_request(w, &q, &side, &fail_off, &data, &zero, &partial);
            if (rc == 0 && data && c->o.write_behind)
                write_behind(w, &q);
            if (rc == 1) { /* a zero request stopped part-way */
                handed_back = 1;
                rc = 0;
            }
        }

        pthread_mutex_lock(&c->lock);
        c->in_flight--;
        w->late_pending = 0;
        if (handed_back) {
            /* its done part counts, the rest is claimed first next time */
            c->done += partial;
            c->zero_bytes += zero;
            q.r.src_off += partial;
            q.r.dst_off += partial;
            q.r.len -= partial;
            if (q.late)
                q.r.kind |= KIND_LATE;
            c->returned[c->n_returned++] = q.r;
        } else if (rc < 0) {
            set_error(c, rc, side, fail_off); /* its bytes stay un-done */
        } else {
            c->done += q.r.len;
            c->data_bytes += data;
            c->zero_bytes += zero;
            c->requests++;
        }
        wake_waiters(c);
    }
    pthread_mutex_unlock(&c->lock);
    return NULL;
}

int bj_copy_new(struct bj_copy **out, const struct bj_copy_opts *opts)
{
    if (!out || !opts || opts->threads == 0 || opts->threads > 256 || opts->request_size < 512 ||
        opts->request_size > (1ull << 30) || opts->dst_fd < 0)
        return -EINVAL;
    struct bj_copy *c = calloc(1, sizeof(*c));
    if (!c)
        return -ENOMEM;
    c->o = *opts;
    uint64_t inflight = opts->max_in_flight ? opts->max_in_flight : (256ull << 20);
    uint64_t n = inflight / opts->request_size;
    c->nworkers = n < 1 ? 1 : (n < opts->threads ? (uint32_t)n : opts->threads);
    c->workers = calloc(c->nworkers, sizeof(*c->workers));
    c->returned = calloc(c->nworkers, sizeof(*c->returned));
    if (!c->workers || !c->returned)
        goto nomem;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_mutex_init(&c->lock, NULL);
    pthread_mutex_init(&c->wlock, NULL);
    pthread_cond_init(&c->work_cv, NULL);
    pthread_cond_init(&c->done_cv, &ca);
    pthread_condattr_destroy(&ca);
    atomic_init(&c->cancel, 0);
    atomic_init(&c->no_copy_range, 0);
    atomic_init(&c->no_mmap, install_sigbus() < 0);
    long ps = sysconf(_SC_PAGESIZE);
    c->page = ps > 0 ? (uint64_t)ps : 4096;
    c->direct = (fcntl(opts->dst_fd, F_GETFL) & O_DIRECT) != 0 ||
                (opts->src_fd >= 0 && (fcntl(opts->src_fd, F_GETFL) & O_DIRECT) != 0);
    c->dst_align = bj_dio_align(opts->dst_fd);
    /* only a regular file written through the page cache and known to read
     * as zero (its unallocated ranges are the holes the copy leaves) */
    struct stat dst_st;
    atomic_init(&c->no_prealloc, 0);
    atomic_init(&c->no_unalloc, 0);
    atomic_init(&c->late_alloc, 0);
    atomic_init(&c->ahead_bytes, 0);
    atomic_init(&c->punched_bytes, 0);
    atomic_init(&c->punches, 0);
    if (c->o.prealloc && (!c->o.target_is_zero || c->dst_align > 1 ||
                          fstat(opts->dst_fd, &dst_st) < 0 || !S_ISREG(dst_st.st_mode)))
        c->o.prealloc = 0;
    if (c->o.prealloc && lseek(opts->dst_fd, 0, SEEK_DATA) == 0) {
        off_t h = lseek(opts->dst_fd, 0, SEEK_HOLE);
        c->keep_end = h > 0 ? (uint64_t)h : 0;
    }
    if (c->dst_align > 1)
        c->o.write_behind = 0; /* no page cache to write behind */
    bj_zeroer_init(&c->zeroer);
    for (uint32_t i = 0; i < c->nworkers; i++) {
        c->workers[i].c = c;
        int rc = pthread_create(&c->workers[i].thread, NULL, worker_main, &c->workers[i]);
        if (rc) {
            bj_copy_free(c);
            return -rc;
        }
        c->workers[i].started = 1;
    }
    *out = c;
    return 0;
nomem:
    free(c->workers);
    free(c->returned);
    free(c);
    return -ENOMEM;
}

void bj_copy_free(struct bj_copy *c)
{
    if (!c)
        return;
    pthread_mutex_lock(&c->lock);
    c->shutdown = 1;
    pthread_cond_broadcast(&c->work_cv);
    pthread_mutex_unlock(&c->lock);
    for (uint32_t i = 0; i < c->nworkers; i++) {
        if (c->workers[i].started)
            pthread_join(c->workers[i].thread, NULL);
        free(c->workers[i].buf);
        free(c->workers[i].runs);
    }
    pthread_cond_destroy(&c->work_cv);
    pthread_cond_destroy(&c->done_cv);
    pthread_mutex_destroy(&c->lock);
    pthread_mutex_destroy(&c->wlock);
    free(c->workers);
    free(c->returned);
    free(c->items);
    free(c->mapped);
    free(c);
}

/* Merge item it into the queue's last item when it continues it in both
 * files (QEMU's block-copy merges adjacent dirty clusters into one request
 * the same way): the clusters an incremental backup copies are scattered in
 * the guest's view but mostly consecutive in both host files (a qcow2 image
 * allocates in write order), so thousands of 64 KiB items become requests
 * of request_size. Only a last item not yet wholly claimed (at or after the
 * head; a sparse item being mapped grows past its mapped bytes, which
 * are claimed from the mapped queue). Called with the lock held. Returns 1
 * when merged. */
static int extend_last(struct bj_copy *c, const struct bj_range *it)
{
    if (c->n_items == 0 || c->n_items - 1 < c->head)
        return 0;
    struct bj_range *last = &c->items[c->n_items - 1];
    if (last->kind != it->kind || last->dst_off + last->len != it->dst_off)
        return 0;
    if (it->kind != BJ_RANGE_ZERO &&
        (last->src_fd != it->src_fd || last->src_off + last->len != it->src_off))
        return 0;
    last->len += it->len;
    return 1;
}

/* prealloc: allocate the target ranges of the copy items r[0..n), runs of
 * adjacent ones in one fallocate, before they are queued (so before any
 * worker writes them). Called without the lock, on the caller's thread. */
static void prealloc_items(struct bj_copy *c, const struct bj_range *r, size_t n)
{
    uint64_t off = 0, len = 0;
    for (size_t i = 0; i <= n; i++) {
        /* not COPY_SPARSE: its holes are found by the mapper, which
         * allocates its data extents (prealloc_extents) */
        int copy = i < n && r[i].len && r[i].kind == BJ_RANGE_COPY;
        if (copy && len && off + len == r[i].dst_off) {
            len += r[i].len;
            continue;
        }
        if (len >= PREALLOC_MIN && !atomic_load_explicit(&c->no_prealloc, memory_order_relaxed) &&
            !atomic_load(&c->cancel)) {
            /* refused (EOPNOTSUPP: NFS, FUSE; ENOSPC: what a range needs
             * before its zero runs are punched may not fit, the writes
             * say whether the data does): from here on the copy
             * allocates as it writes, as before */
            if (fallocate(c->o.dst_fd, FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) == 0)
                atomic_fetch_add_explicit(&c->ahead_bytes, len, memory_order_relaxed);
            else if (errno != EINTR)
                atomic_store_explicit(&c->no_prealloc, 1, memory_order_relaxed);
        }
        len = 0;
        if (copy) {
            off = r[i].dst_off;
            len = r[i].len;
        }
    }
}

int bj_copy_add(struct bj_copy *c, const struct bj_range *r, size_t n)
{
    if (!c || (n && !r))
        return -EINVAL;
    for (size_t i = 0; i < n; i++) {
        if (r[i].kind != BJ_RANGE_ZERO && r[i].src_fd < 0 && c->o.src_fd < 0)
            return -EBADF;
        if (r[i].kind > BJ_RANGE_COPY_SPARSE || r[i].src_off > UINT64_MAX - r[i].len ||
            r[i].dst_off > UINT64_MAX - r[i].len || r[i].dst_off + r[i].len > (uint64_t)INT64_MAX ||
            r[i].src_off + r[i].len > (uint64_t)INT64_MAX)
            return -EINVAL;
    }
    /* late allocation on: the copy items are queued unallocated */
    uint32_t late = c->o.prealloc && atomic_load(&c->late_alloc) ? KIND_LATE : 0;
    if (c->o.prealloc && !late)
        prealloc_items(c, r, n);
    pthread_mutex_lock(&c->lock);
    /* drop fully consumed items first so the queue does not grow forever */
    if (c->head > 0 && c->head >= c->n_items / 2) {
        memmove(c->items, c->items + c->head, (c->n_items - c->head) * sizeof(*c->items));
        c->n_items -= c->head;
        c->head = 0;
    }
    if (c->n_items + n > c->cap_items) {
        size_t cap = c->cap_items ? c->cap_items : 64;
        while (cap < c->n_items + n)
            cap *= 2;
        struct bj_range *p = realloc(c->items, cap * sizeof(*p));
        if (!p) {
            pthread_mutex_unlock(&c->lock);
            return -ENOMEM;
        }
        c->items = p;
        c->cap_items = cap;
    }
    for (size_t i = 0; i < n; i++) {
        if (r[i].len == 0)
            continue;
        struct bj_range it = r[i];
        if (it.src_fd < 0)
            it.src_fd = c->o.src_fd;
        if (it.kind == BJ_RANGE_COPY)
            it.kind |= late;
        if (!extend_last(c, &it)) {
            c->items[c->n_items] = it;
            c->n_items++;
        }
        c->unclaimed += it.len;
        c->queued += it.len;
    }
    /* one worker; each claim wakes the next while work is left */
    wake_worker(c);
    pthread_mutex_unlock(&c->lock);
    return 0;
}

static void deadline_after(struct timespec *ts, uint32_t ms)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

static void drain_locked(struct bj_copy *c)
{
    c->active = 0;
    c->done_waiters++;
    while (c->in_flight > 0)
        pthread_cond_wait(&c->done_cv, &c->lock);
    c->done_waiters--;
}

int bj_copy_run(struct bj_copy *c, uint32_t timeout_ms, uint64_t low_water)
{
    if (!c)
        return -EINVAL;
    struct timespec dl;
    deadline_after(&dl, timeout_ms);
    int ret;
    pthread_mutex_lock(&c->lock);
    if (!c->active) { /* (re)start: wake every idle worker once */
        c->active = 1;
        pthread_cond_broadcast(&c->work_cv);
    }
    c->low_water = low_water;
    c->done_waiters++;
    for (;;) {
        if (atomic_load(&c->cancel)) {
            drain_locked(c);
            ret = -ECANCELED;
            break;
        }
        if (c->error) {
            drain_locked(c);
            ret = c->error;
            break;
        }
        if (c->done == c->queued && c->in_flight == 0 && c->n_returned == 0) {
            ret = 0;
            break;
        }
        if (low_water && c->unclaimed < low_water) {
            ret = 1;
            break;
        }
        if (pthread_cond_timedwait(&c->done_cv, &c->lock, &dl) == ETIMEDOUT) {
            ret = 2;
            break;
        }
    }
    c->done_waiters--;
    c->low_water = 0;
    pthread_mutex_unlock(&c->lock);
    return ret;
}

void bj_copy_drain(struct bj_copy *c)
{
    if (!c)
        return;
    pthread_mutex_lock(&c->lock);
    drain_locked(c);
    pthread_mutex_unlock(&c->lock);
}

void bj_copy_cancel(struct bj_copy *c)
{
    if (!c)
        return;
    atomic_store(&c->cancel, 1);
    pthread_mutex_lock(&c->lock);
    pthread_cond_broadcast(&c->done_cv);
    pthread_mutex_unlock(&c->lock);
}

void bj_copy_test_fallocate(struct bj_copy *c, int (*fn)(int fd, int mode, off_t offset, off_t len))
{
    c->zeroer.fallocate = fn;
}

void bj_copy_test_after_map(struct bj_copy *c, void (*fn)(int fd, uint64_t off, uint64_t len))
{
    c->after_map = fn;
}

void bj_copy_get_status(struct bj_copy *c, struct bj_copy_status *st)
{
    if (!c || !st)
        return;
    pthread_mutex_lock(&c->lock);
    st->done = c->done;
    st->queued = c->queued;
    st->data_bytes = c->data_bytes;
    st->zero_bytes = c->zero_bytes;
    st->error = c->error ? c->error : (atomic_load(&c->cancel) ? -ECANCELED : 0);
    st->error_side = c->error_side;
    st->error_offset = c->error_offset;
    st->in_flight = c->in_flight;
    st->throttled = c->throttled;
    st->requests = c->requests;
    pthread_mutex_unlock(&c->lock);
}
