/* The NBD export's data path: request headers and READ replies in C, the
 * GIL released (see nbdsrv.h and docs/nbd.md, "The data path in C"). */
#include "nbdsrv.h"
#include "dio.h"
#include "qcow2.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <unistd.h>

#define REQUEST_MAGIC 0x25609513u
#define SIMPLE_MAGIC 0x67446698u
#define STRUCT_MAGIC 0x668e33efu
#define CMD_READ 0
#define CMD_WRITE 1
#define CMD_DISC 2
#define CMD_BLOCK_STATUS 7
#define FLAG_DF (1u << 2)
#define FLAG_REQ_ONE (1u << 3)
#define REPLY_DONE 1
#define TYPE_DATA 1
#define TYPE_HOLE 2
#define TYPE_BLOCK_STATUS 5
#define STATE_HOLE 1u
#define STATE_ZERO 2u
/* extents of one BLOCK_STATUS reply at most (blkjobs.nbd.proto.MAX_EXTENTS) */
#define MAX_EXTENTS (1u << 16)
#define TYPE_ERROR ((1u << 15) | 1)
#define HDR 28
#define RBUF (64 * 1024)
/* a worker keeps its buffer up to this size; larger reads get their own */
#define KEEP_BUF (4u << 20)
#define MAX_WORKERS 64
#define DONE_BATCH 16
/* a socket taking nothing for this long: its sender flushes the tokens */
#define STUCK_MS 10

/* qcow2.c writes these segments for the qcow2 reads (bj_qcow2_read_segs) */
_Static_assert(BJ_QSEG_DATA_PAD == BJ_NBDS_DATA_PAD && BJ_QSEG_ZERO == BJ_NBDS_ZERO,
               "qcow2.c's segment kinds are nbdsrv.h's");

struct seg {
    uint64_t kind, fd, host, len;
};

/* cachestat(2) (Linux 6.5; one number on every architecture since) */
#ifndef __NR_cachestat
#define __NR_cachestat 451
#endif
struct zc_range {
    uint64_t off, len;
};
struct zc_stat {
    uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
};

struct job {
    struct job *next;
    uint64_t handle, offset, length, flags, token;
    int cmd;                        /* CMD_READ or CMD_BLOCK_STATUS */
    int stable;                     /* READ: BJ_NBDS_STABLE (zero-copy allowed) */
    int inl;                        /* served by the caller (bj_nbds_serve_one) */
    uint32_t ctx;                   /* BLOCK_STATUS: the meta context's id */
    int nsegs;
    struct seg segs[];
};

struct bj_nbds {
    int sock, structured;
    /* headers read ahead (only the reading thread touches these; rbuf
     * last: bj_nbds_new does not zero it) */
    size_t rpos, rlen;

    pthread_mutex_t lock;           /* queue, done, inflight, stop */
    pthread_cond_t more, idle, donecv;
    struct job *head, *tail;
    uint64_t *done;
    size_t ndone, capdone;
    int inflight, unread, stop, broken, stop_done, flush;
    int unix_sock;                  /* AF_UNIX: sendfile may serve stable reads */
    int zc_off;                     /* bj_nbds_zc_revoke: never again */
    int zc_pending;                 /* stable READs queued and not yet sent */
    uint64_t zc_bytes, zc_reads;    /* sent zero-copy (bj_nbds_zc_stats) */
    int stuck;                      /* a sender waits for the socket */
    int waiting;                    /* workers waiting for a job (more) */
    int idle_waiters;               /* threads waiting on idle */
    int idle_need;                  /* the least number of free workers they wait for */

    pthread_mutex_t send_lock;
    int nthreads;                   /* workers at most (the free ones counted of these) */
    int started;                    /* workers taken from the pool: on demand */
    int attached;                   /* of those, still serving this session */
    pthread_cond_t gone;            /* attached dropped to 0 (bj_nbds_free waits) */
    /* the process's reaper (bj_nbds_reap) takes the tokens, not
     * bj_nbds_wait_done; these under reap_lock */
    int global, queued, in_batch;
    struct bj_nbds *reap_next, *batch_next;
    /* bj_nbds_serve_one: its job's token once read (inl_tok, inl_set),
     * the caller's to end unless a wait for the socket handed it to the
     * reaper first (flush_done); its buffer, kept for the session */
    uint64_t inl_tok;
    int inl_set;
    struct wbuf *iw;
    unsigned char rbuf[RBUF];       /* only [rpos, rlen) is ever read */
};

static void put_be16(unsigned char *p, uint16_t v)
{
    p[0] = (unsigned char)(v >> 8);
    p[1] = (unsigned char)v;
}
static void put_be32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}
static void put_be64(unsigned char *p, uint64_t v)
{
    put_be32(p, (uint32_t)(v >> 32));
    put_be32(p + 4, (uint32_t)v);
}
static uint16_t get_be16(const unsigned char *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t get_be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static uint64_t get_be64(const unsigned char *p)
{
    return (uint64_t)get_be32(p) << 32 | get_be32(p + 4);
}

/* -- the process's reaper (bj_nbds_reap): sessions with tokens for it ------ */
static pthread_mutex_t reap_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t reap_cv = PTHREAD_COND_INITIALIZER;       /* a session queued, or stop */
static pthread_cond_t reaped_cv = PTHREAD_COND_INITIALIZER;     /* a batch ended */
static struct bj_nbds *reap_head, *reap_tail;   /* queued: tokens to take */
static struct bj_nbds *reap_batch;              /* taken, their reads not ended yet */
static int reap_stop;
static void reap_forget(struct bj_nbds *s);

/* The tokens of s are to be taken (s->lock not held): its own reaper
 * (bj_nbds_wait_done) is woken, or s is queued for the process's. */
static void wake_reaper(struct bj_nbds *s)
{
    if (!s->global) {
        pthread_cond_signal(&s->donecv);
        return;
    }
    pthread_mutex_lock(&reap_lock);
    int wake = 0;
    if (!s->queued) {
        s->queued = 1;
        s->reap_next = NULL;
        if (reap_tail)
            reap_tail->reap_next = s;
        else
            reap_head = s;
        reap_tail = s;
        wake = 1;
    }
    pthread_mutex_unlock(&reap_lock);
    if (wake)
        pthread_cond_signal(&reap_cv);
}

/* Hand the reaper the tokens there are now (a worker is about to wait:
 * for the send lock or the socket). */
static void flush_done(struct bj_nbds *s)
{
    pthread_mutex_lock(&s->lock);
    if (s->inl_set) {       /* (capdone counts the job in flight: room for it) */
        s->done[s->ndone++] = s->inl_tok;
        s->inl_set = 0;
    }
    int wake = s->ndone != 0;
    if (wake)
        s->flush = 1;
    pthread_mutex_unlock(&s->lock);
    if (wake)
        wake_reaper(s);
}

/* All of iov out, the send lock held by the caller; before the first
 * wait for the socket the tokens are flushed. */
static int send_all_more(struct bj_nbds *s, struct iovec *iov, int n, int more)
{
    int flags = MSG_NOSIGNAL | MSG_DONTWAIT | more;
    while (n > 0) {
        struct msghdr m = {.msg_iov = iov, .msg_iovlen = (size_t)(n > IOV_MAX ? IOV_MAX : n)};
        ssize_t k = sendmsg(s->sock, &m, flags);
        if (k < 0) {
            if (errno == EAGAIN && (flags & MSG_DONTWAIT)) {
                /* a client reading along frees room within a few ms (a
                 * reply larger than the socket buffer always waits) */
                struct pollfd pf = {.fd = s->sock, .events = POLLOUT};
                if (poll(&pf, 1, STUCK_MS) > 0)
                    continue;
                /* about to wait for the socket: so will the workers that
                 * queue on the send lock meanwhile (they flush too) */
                __atomic_store_n(&s->stuck, 1, __ATOMIC_RELEASE);
                flush_done(s);
                flags = MSG_NOSIGNAL | more;
                continue;
            }
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (!(flags & MSG_DONTWAIT)) {      /* the socket took some: try again without waiting */
            __atomic_store_n(&s->stuck, 0, __ATOMIC_RELEASE);
            flags = MSG_NOSIGNAL | MSG_DONTWAIT | more;
        }
        while (n > 0 && (size_t)k >= iov->iov_len) {
            k -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (char *)iov->iov_base + k;
            iov->iov_len -= (size_t)k;
        }
    }
    return 0;
}

static int send_all(struct bj_nbds *s, struct iovec *iov, int n)
{
    return send_all_more(s, iov, n, 0);
}

static int send_locked(struct bj_nbds *s, struct iovec *iov, int n)
{
    int r;
    if (pthread_mutex_trylock(&s->send_lock) != 0) {
        if (__atomic_load_n(&s->stuck, __ATOMIC_ACQUIRE))
            flush_done(s);
        pthread_mutex_lock(&s->send_lock);
    }
    r = __atomic_load_n(&s->broken, __ATOMIC_ACQUIRE) ? -EPIPE : send_all(s, iov, n);
    if (r < 0 && !__atomic_load_n(&s->broken, __ATOMIC_ACQUIRE)) {
        /* the client is gone: so is the reader */
        __atomic_store_n(&s->broken, 1, __ATOMIC_RELEASE);
        shutdown(s->sock, SHUT_RDWR);
    }
    pthread_mutex_unlock(&s->send_lock);
    return r;
}

int bj_nbds_send(struct bj_nbds *s, const void *const *bufs, const size_t *lens, int n)
{
    struct iovec iov[8];
    if (n < 0 || n > 8)
        return -EINVAL;
    for (int i = 0; i < n; i++) {
        iov[i].iov_base = (void *)bufs[i];
        iov[i].iov_len = lens[i];
    }
    return send_locked(s, iov, n);
}

/* -- a worker's request ----------------------------------------------------- */

struct wbuf {
    unsigned char *data;
    size_t cap;
    struct iovec *iov;
    unsigned char *hdrs;            /* chunk headers, 32 bytes per run */
    size_t capseg;
    struct seg *xs;                 /* the request's segments as they go out */
    size_t nxs, capxs;
    size_t runs;                    /* runs of xs by NBD state (block status) */
    /* the last fd read and its alignment (bj_dio_align: an fcntl per read
     * otherwise; a mode switched since, or the number reused by another
     * file, is still read right: bj_dio_pread_a retries an EINVAL with the
     * fd's own alignment, and a larger one than needed only bounces) */
    int afd;
    uint32_t align;
};

static int wbuf_reserve(struct wbuf *w, size_t len, size_t nsegs)
{
    if (!w->data || len > w->cap) {
        unsigned char *p = malloc(len ? len : 1);
        if (!p)
            return -ENOMEM;
        free(w->data);
        w->data = p;
        w->cap = len;
    }
    if (!w->iov || !w->hdrs || nsegs + 1 > w->capseg) {
        size_t n = nsegs + 1;
        struct iovec *iov = malloc(sizeof(*iov) * (2 * n + 1));
        unsigned char *h = malloc(32 * n);
        if (!iov || !h) {
            free(iov);
            free(h);
            return -ENOMEM;
        }
        free(w->iov);
        free(w->hdrs);
        w->iov = iov;
        w->hdrs = h;
        w->capseg = n;
    }
    return 0;
}

static void wbuf_trim(struct wbuf *w)
{
    if (w->cap > KEEP_BUF) {
        free(w->data);
        w->data = NULL;
        w->cap = 0;
    }
    if (w->capseg > 4096) {
        free(w->iov);
        free(w->hdrs);
        w->iov = NULL;
        w->hdrs = NULL;
        w->capseg = 0;
    }
    if (w->capxs > 4096) {
        free(w->xs);
        w->xs = NULL;
        w->capxs = 0;
    }
}

static void wbuf_free(struct wbuf *w)
{
    free(w->data);
    free(w->iov);
    free(w->hdrs);
    free(w->xs);
}

static int is_zero(uint64_t kind) { return kind == BJ_NBDS_ZERO; }

/* Append a segment to xs, joined to the last one where it continues it. */
static int push(struct wbuf *w, uint64_t kind, uint64_t fd, uint64_t host, uint64_t len)
{
    if (!len)
        return 0;
    if (w->nxs) {
        struct seg *l = &w->xs[w->nxs - 1];
        if (l->kind == kind && (is_zero(kind) || (l->fd == fd && l->host + l->len == host))) {
            l->len += len;
            return 0;
        }
        if (is_zero(l->kind) != is_zero(kind))
            w->runs++;
    } else {
        w->runs = 1;
    }
    if (w->nxs == w->capxs) {
        size_t cap = w->capxs ? 2 * w->capxs : 16;
        struct seg *x = realloc(w->xs, sizeof(*x) * cap);
        if (!x)
            return -ENOMEM;
        w->xs = x;
        w->capxs = cap;
    }
    w->xs[w->nxs++] = (struct seg){kind, fd, host, len};
    return 0;
}

/* A raw file's [host, host+len) cut at its holes (SEEK_HOLE/SEEK_DATA, as
 * blkjobs.formats.raw maps it): data as DATA, holes as ZERO; a file system
 * that cannot tell: all DATA. SEEK_HOLE first: a range of data (the common
 * case of a read) costs one lseek; where a run of data ends in the range,
 * the next lseek is SEEK_DATA (the hole is known): two per run of data,
 * not three (one nbdcopy of the 256 MiB sparse benchmark image, block
 * status and reads: 1459 lseeks became 1091). A position at or past the end of the
 * file (ENXIO): a hole for block status; DATA for a read (its pread fails:
 * EIO, as without the cut). Stops once xs has more than maxruns runs (0:
 * no limit). 0 or -errno. */
static int split_holes(struct wbuf *w, int fd, uint64_t host, uint64_t len, int read,
                       size_t maxruns)
{
    uint64_t pos = host, end = host + len;
    int r = 0, hole = 0;            /* hole: pos is at the start of a hole */
    while (pos < end && r == 0 && !(maxruns && w->runs > maxruns)) {
        off_t h = hole ? (off_t)pos : lseek(fd, (off_t)pos, SEEK_HOLE);
        hole = 0;
        if (h < 0) {
            if (errno == ENXIO)             /* at or past the end of the file */
                return push(w, read ? BJ_NBDS_DATA : BJ_NBDS_ZERO, read ? (uint64_t)fd : 0,
                            read ? pos : 0, end - pos);
            if (errno == EINVAL || errno == EOPNOTSUPP)
                return push(w, BJ_NBDS_DATA, (uint64_t)fd, pos, end - pos);
            return -errno;
        }
        if ((uint64_t)h > pos) {            /* data up to the hole */
            uint64_t e = (uint64_t)h < end ? (uint64_t)h : end;
            r = push(w, BJ_NBDS_DATA, (uint64_t)fd, pos, e - pos);
            pos = e;
            hole = 1;
            continue;
        }
        off_t d = lseek(fd, (off_t)pos, SEEK_DATA);
        if (d < 0) {
            if (errno != ENXIO)
                return -errno;
            /* a hole up to the end of the file; a read past it (the file
             * shrank under the export) stays DATA there: EIO */
            uint64_t eof = end;
            if (read) {
                struct stat st;
                if (fstat(fd, &st) < 0)
                    return -errno;
                eof = (uint64_t)st.st_size;
            }
            if (eof >= end)
                return push(w, BJ_NBDS_ZERO, 0, 0, end - pos);
            uint64_t e = eof > pos ? eof : pos;
            r = push(w, BJ_NBDS_ZERO, 0, 0, e - pos);
            return r ? r : push(w, BJ_NBDS_DATA, (uint64_t)fd, e, end - e);
        }
        uint64_t e = (uint64_t)d > pos && (uint64_t)d < end ? (uint64_t)d : end;
        r = push(w, BJ_NBDS_ZERO, 0, 0, e - pos);
        pos = e;
    }
    return r;
}

/* The job's segments as they go out, into w->xs: with split, the DATA
 * ones (raw files) cut at the file's holes. 0 or -errno. */
static int expand(const struct job *j, struct wbuf *w, int split, size_t maxruns)
{
    int r = 0;
    w->nxs = 0;
    w->runs = 0;
    for (int i = 0; i < j->nsegs && r == 0 && !(maxruns && w->runs > maxruns); i++) {
        const struct seg *g = &j->segs[i];
        if (split && g->kind == BJ_NBDS_DATA)
            r = split_holes(w, (int)g->fd, g->host, g->len, j->cmd == CMD_READ, maxruns);
        else
            r = push(w, g->kind, g->fd, g->host, g->len);
    }
    return r;
}

/* One segment's bytes into dst; 0 or -errno. */
static int fill_seg(struct wbuf *w, const struct seg *g, unsigned char *dst)
{
    uint64_t got = 0;
    if (g->kind == BJ_NBDS_ZERO) {
        memset(dst, 0, g->len);
        return 0;
    }
    if (w->afd != (int)g->fd) {
        w->align = bj_dio_align((int)g->fd);
        w->afd = (int)g->fd;
    }
    while (got < g->len) {
        int64_t k = bj_dio_pread_a((int)g->fd, w->align, dst + got, g->len - got,
                                   g->host + got);
        if (k < 0)
            return (int)k;
        if (k == 0)
            break;
        got += (uint64_t)k;
    }
    if (got < g->len) {
        if (g->kind == BJ_NBDS_DATA)
            return -EIO;            /* the file shrank under the export */
        memset(dst + got, 0, g->len - got);
    }
    return 0;
}

/* The request's bytes into buf (zero segments left alone with skip_zero:
 * they go out as holes); 0 or -errno. */
static int fill(struct wbuf *w, unsigned char *buf, int skip_zero)
{
    uint64_t pos = 0;
    for (size_t i = 0; i < w->nxs; i++) {
        const struct seg *g = &w->xs[i];
        if (!(skip_zero && is_zero(g->kind))) {
            int r = fill_seg(w, g, buf + pos);
            if (r < 0)
                return r;
        }
        pos += g->len;
    }
    return 0;
}

static void chunk_header(unsigned char *h, uint16_t flags, uint16_t type, uint64_t handle,
                         uint32_t len)
{
    put_be32(h, STRUCT_MAGIC);
    put_be16(h + 4, flags);
    put_be16(h + 6, type);
    put_be64(h + 8, handle);
    put_be32(h + 16, len);
}

static int send_error(struct bj_nbds *s, const struct job *j, int err)
{
    unsigned char h[32 + 128];
    struct iovec iov[1];
    /* NBD's errno numbers are Linux's; the protocol knows only a few */
    uint32_t e = err == ENOMEM || err == EINVAL || err == ENOSPC || err == EOVERFLOW
                 || err == EPERM ? (uint32_t)err : EIO;
    if (s->structured) {
        const char *msg = strerror(err);
        size_t n = strlen(msg);
        if (n > 128)
            n = 128;
        chunk_header(h, REPLY_DONE, TYPE_ERROR, j->handle, (uint32_t)(6 + n));
        put_be32(h + 20, e);
        put_be16(h + 24, (uint16_t)n);
        memcpy(h + 26, msg, n);
        iov[0] = (struct iovec){h, 26 + n};
    } else {
        put_be32(h, SIMPLE_MAGIC);
        put_be32(h + 4, e);
        put_be64(h + 8, j->handle);
        iov[0] = (struct iovec){h, 16};
    }
    return send_locked(s, iov, 1);
}

/* Structured reply of runs: consecutive data segments one OFFSET_DATA
 * chunk, consecutive zero segments one OFFSET_HOLE chunk. */
static int build_sparse(const struct job *j, struct wbuf *w)
{
    int n = 0, k = 0;
    uint64_t pos = 0;
    for (size_t i = 0; i < w->nxs;) {
        int zero = is_zero(w->xs[i].kind);
        uint64_t len = 0;
        while (i < w->nxs && is_zero(w->xs[i].kind) == zero)
            len += w->xs[i++].len;
        unsigned char *h = w->hdrs + 32 * k++;
        uint16_t flags = i == w->nxs ? REPLY_DONE : 0;
        if (zero) {
            chunk_header(h, flags, TYPE_HOLE, j->handle, 12);
            put_be64(h + 20, j->offset + pos);
            put_be32(h + 28, (uint32_t)len);
            w->iov[n++] = (struct iovec){h, 32};
        } else {
            chunk_header(h, flags, TYPE_DATA, j->handle, (uint32_t)(8 + len));
            put_be64(h + 20, j->offset + pos);
            w->iov[n++] = (struct iovec){h, 28};
            w->iov[n++] = (struct iovec){w->data + pos, len};
        }
        pos += len;
    }
    return n;
}

/* The read's bytes are in the worker's buffer (or it failed): its token
 * goes to the reaper, before the reply is sent -- a client that does not
 * read its replies must not keep writes of others waiting on its reads.
 * The reaper (Python: the GIL) is woken per DONE_BATCH reads, when no read
 * is left in flight, or before a worker waits (for the socket or the send
 * lock: flush_done): a waiter for one of them waits at most for the reads
 * in flight with it, which wait for nothing but their pread. */
static void read_done(struct bj_nbds *s, const struct job *j)
{
    pthread_mutex_lock(&s->lock);
    s->unread--;
    if (j->inl) {           /* the caller's (bj_nbds_serve_one), unless flushed */
        s->inl_tok = j->token;
        s->inl_set = 1;
        pthread_mutex_unlock(&s->lock);
        return;
    }
    /* capdone >= every job queued (grown in submit): no failure here */
    s->done[s->ndone++] = j->token;
    int wake = s->ndone >= DONE_BATCH;
    pthread_mutex_unlock(&s->lock);
    if (wake)
        wake_reaper(s);
}

/* BLOCK_STATUS of base:allocation: the segments' runs as extents (file
 * data and qcow2 data clusters: 0; holes, zero clusters, unallocated:
 * HOLE|ZERO), neighbours with equal flags merged, at most one with
 * REQ_ONE, else MAX_EXTENTS -- blkjobs.nbd.transmission._trim's shape. */
static void serve_status(struct bj_nbds *s, const struct job *j, struct wbuf *w)
{
    size_t max = j->flags & FLAG_REQ_ONE ? 1 : MAX_EXTENTS;
    int r = expand(j, w, 1, max);
    read_done(s, j);
    if (r == 0)
        r = wbuf_reserve(w, 8 * (w->runs < max ? w->runs : max), 0);
    if (r < 0) {
        send_error(s, j, -r);
        wbuf_trim(w);
        return;
    }
    unsigned char *p = w->data;
    size_t n = 0;
    uint32_t flags = 0, len = 0;
    for (size_t i = 0; i <= w->nxs; i++) {
        uint32_t f = i < w->nxs && is_zero(w->xs[i].kind) ? STATE_HOLE | STATE_ZERO : 0;
        if (i < w->nxs && i && f == flags) {
            len += (uint32_t)w->xs[i].len;
            continue;
        }
        if (i) {                    /* the extent before this one is complete */
            put_be32(p + 8 * n, len);
            put_be32(p + 8 * n + 4, flags);
            if (++n == max)
                break;
        }
        if (i < w->nxs) {
            flags = f;
            len = (uint32_t)w->xs[i].len;
        }
    }
    chunk_header(w->hdrs, REPLY_DONE, TYPE_BLOCK_STATUS, j->handle, (uint32_t)(4 + 8 * n));
    put_be32(w->hdrs + 20, j->ctx);
    struct iovec iov[2] = {{w->hdrs, 24}, {p, 8 * n}};
    send_locked(s, iov, 2);
    wbuf_trim(w);
}

/* -- zero-copy replies (docs/nbd.md, "Zero-copy reads") ---------------------
 *
 * A READ Python planned as stable (BJ_NBDS_STABLE: no writer of its files
 * in the process, none outside it) over an AF_UNIX socket goes out with
 * sendfile: the socket takes references to the page-cache pages, no copy.
 * Only when every data segment is inside its file (so sendfile cannot come
 * short once the header is out), its fd is not O_DIRECT and its pages are
 * all in the page cache (cachestat: sendfile of uncached data would read
 * the disk under the send lock, one read at a time); else the pread path.
 * The read's token ends once its bytes are in the socket (the fd is not
 * used after); the session counts the stable reads not sent yet
 * (zc_pending) for bj_nbds_zc_busy. */

static long page_size(void)
{
    static long ps;
    long p = __atomic_load_n(&ps, __ATOMIC_RELAXED);
    if (!p) {
        p = sysconf(_SC_PAGESIZE);
        if (p <= 0)
            p = 4096;
        __atomic_store_n(&ps, p, __ATOMIC_RELAXED);
    }
    return p;
}

/* The reply's file segments may be sent from the page cache: 1, else 0;
 * holes allowed only with sparse (they go out as OFFSET_HOLE chunks). */
static int zc_usable(const struct wbuf *w, int sparse)
{
    int lastfd = -1;
    uint64_t fsize = 0, ps = (uint64_t)page_size();
    for (size_t i = 0; i < w->nxs; i++) {
        const struct seg *g = &w->xs[i];
        if (is_zero(g->kind)) {
            if (!sparse)
                return 0;
            continue;
        }
        int fd = (int)g->fd;
        if (fd != lastfd) {
            struct stat st;
            int fl = fcntl(fd, F_GETFL);
            if (fl < 0 || (fl & O_DIRECT) || fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))
                return 0;
            fsize = (uint64_t)st.st_size;
            lastfd = fd;
        }
        if (g->host > fsize || g->len > fsize - g->host)
            return 0;
        struct zc_range cr = {g->host, g->len};
        struct zc_stat cs;
        if (syscall(__NR_cachestat, fd, &cr, &cs, 0) < 0)
            return 0;           /* (ENOSYS: before Linux 6.5) */
        uint64_t pages = (g->host + g->len + ps - 1) / ps - g->host / ps;
        if (cs.nr_cache < pages)
            return 0;
    }
    return 1;
}

/* All of [off, off+len) of fd into the socket (send lock held). A socket
 * that takes nothing for STUCK_MS: the tokens are flushed first, as
 * send_all does. 0 or -errno; -EIO when the file came short. */
static int sendfile_all(struct bj_nbds *s, int fd, uint64_t off, uint64_t len)
{
    off_t o = (off_t)off;
    while (len > 0) {
        struct pollfd pf = {.fd = s->sock, .events = POLLOUT};
        if (poll(&pf, 1, 0) == 0 && poll(&pf, 1, STUCK_MS) == 0) {
            __atomic_store_n(&s->stuck, 1, __ATOMIC_RELEASE);
            flush_done(s);
        }
        size_t want = len > (1u << 30) ? (1u << 30) : (size_t)len;
        ssize_t k = sendfile(s->sock, fd, &o, want);
        if (k < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            return -errno;
        }
        if (k == 0)
            return -EIO;
        __atomic_store_n(&s->stuck, 0, __ATOMIC_RELEASE);
        len -= (uint64_t)k;
    }
    return 0;
}

/* The reply of j from w->xs (zc_usable): headers from w->hdrs, data with
 * sendfile, under the send lock. 0 or -errno (the session is then broken:
 * part of a reply may be out). */
static int zc_send(struct bj_nbds *s, const struct job *j, struct wbuf *w, int sparse)
{
    int r = 0;
    if (pthread_mutex_trylock(&s->send_lock) != 0) {
        if (__atomic_load_n(&s->stuck, __ATOMIC_ACQUIRE))
            flush_done(s);
        pthread_mutex_lock(&s->send_lock);
    }
    if (__atomic_load_n(&s->broken, __ATOMIC_ACQUIRE))
        r = -EPIPE;
    uint64_t pos = 0;
    size_t i = 0;
    if (!sparse && r == 0) {
        struct iovec iov;
        if (s->structured) {
            chunk_header(w->hdrs, REPLY_DONE, TYPE_DATA, j->handle, (uint32_t)(8 + j->length));
            put_be64(w->hdrs + 20, j->offset);
            iov = (struct iovec){w->hdrs, 28};
        } else {
            put_be32(w->hdrs, SIMPLE_MAGIC);
            put_be32(w->hdrs + 4, 0);
            put_be64(w->hdrs + 8, j->handle);
            iov = (struct iovec){w->hdrs, 16};
        }
        r = send_all_more(s, &iov, 1, MSG_MORE);
    }
    while (r == 0 && i < w->nxs) {
        int zero = is_zero(w->xs[i].kind);
        if (!sparse) {              /* (no zero segment: zc_usable) */
            r = sendfile_all(s, (int)w->xs[i].fd, w->xs[i].host, w->xs[i].len);
            i++;
            continue;
        }
        size_t e = i;
        uint64_t len = 0;
        while (e < w->nxs && is_zero(w->xs[e].kind) == zero)
            len += w->xs[e++].len;
        uint16_t flags = e == w->nxs ? REPLY_DONE : 0;
        struct iovec iov;
        if (zero) {
            chunk_header(w->hdrs, flags, TYPE_HOLE, j->handle, 12);
            put_be64(w->hdrs + 20, j->offset + pos);
            put_be32(w->hdrs + 28, (uint32_t)len);
            iov = (struct iovec){w->hdrs, 32};
            r = send_all_more(s, &iov, 1, flags ? 0 : MSG_MORE);
        } else {
            chunk_header(w->hdrs, flags, TYPE_DATA, j->handle, (uint32_t)(8 + len));
            put_be64(w->hdrs + 20, j->offset + pos);
            iov = (struct iovec){w->hdrs, 28};
            r = send_all_more(s, &iov, 1, MSG_MORE);
            for (size_t k = i; r == 0 && k < e; k++)
                r = sendfile_all(s, (int)w->xs[k].fd, w->xs[k].host, w->xs[k].len);
        }
        pos += len;
        i = e;
    }
    if (r < 0 && !__atomic_load_n(&s->broken, __ATOMIC_ACQUIRE)) {
        __atomic_store_n(&s->broken, 1, __ATOMIC_RELEASE);
        shutdown(s->sock, SHUT_RDWR);
    }
    pthread_mutex_unlock(&s->send_lock);
    return r;
}

/* A stable read is no longer pending (sent, or served by the pread path);
 * sent: its data bytes went out zero-copy. */
static void zc_end(struct bj_nbds *s, uint64_t sent)
{
    pthread_mutex_lock(&s->lock);
    s->zc_pending--;
    if (sent) {
        s->zc_bytes += sent;
        s->zc_reads++;
    }
    pthread_mutex_unlock(&s->lock);
}

static void serve_read(struct bj_nbds *s, const struct job *j, struct wbuf *w)
{
    int r, n = 0, sparse = 0, data = !s->structured || (j->flags & FLAG_DF);
    r = expand(j, w, !data, 0);
    if (!data) {
        for (size_t i = 0; i < w->nxs; i++) {
            sparse |= is_zero(w->xs[i].kind);
            data |= !is_zero(w->xs[i].kind);
        }
    }
    if (j->stable) {
        int zc = r == 0 && s->unix_sock && data && !__atomic_load_n(&s->zc_off, __ATOMIC_ACQUIRE)
                 && zc_usable(w, sparse);
        if (zc) {
            uint64_t bytes = 0;
            for (size_t i = 0; i < w->nxs; i++)
                bytes += is_zero(w->xs[i].kind) ? 0 : w->xs[i].len;
            /* (wbuf_reserve with no data: the iovecs and headers only) */
            r = wbuf_reserve(w, 0, w->nxs);
            if (r == 0)
                r = zc_send(s, j, w, sparse);
            read_done(s, j);
            zc_end(s, r == 0 ? bytes : 0);
            wbuf_trim(w);
            return;
        }
        zc_end(s, 0);
    }
    /* (a read of holes only needs no buffer: it goes out as one hole) */
    if (r == 0)
        r = wbuf_reserve(w, data ? j->length : 0, w->nxs);
    if (r == 0)
        r = fill(w, w->data, sparse);
    read_done(s, j);
    if (r < 0) {
        send_error(s, j, -r);
        wbuf_trim(w);
        return;
    }
    if (sparse) {
        n = build_sparse(j, w);
    } else if (s->structured) {
        chunk_header(w->hdrs, REPLY_DONE, TYPE_DATA, j->handle, (uint32_t)(8 + j->length));
        put_be64(w->hdrs + 20, j->offset);
        w->iov[n++] = (struct iovec){w->hdrs, 28};
        w->iov[n++] = (struct iovec){w->data, j->length};
    } else {
        put_be32(w->hdrs, SIMPLE_MAGIC);
        put_be32(w->hdrs + 4, 0);
        put_be64(w->hdrs + 8, j->handle);
        w->iov[n++] = (struct iovec){w->hdrs, 16};
        w->iov[n++] = (struct iovec){w->data, j->length};
    }
    send_locked(s, w->iov, n);
    wbuf_trim(w);
}

static void serve(struct bj_nbds *s, const struct job *j, struct wbuf *w)
{
    if (__atomic_load_n(&s->broken, __ATOMIC_ACQUIRE)) {
        read_done(s, j);
        if (j->stable)
            zc_end(s, 0);
    }
    else if (j->cmd == CMD_BLOCK_STATUS)
        serve_status(s, j, w);
    else
        serve_read(s, j, w);
}
/* -- the worker threads: one pool for the process ---------------------------
 *
 * A session's workers are taken from the pool as its requests come and go
 * back when the session ends: parked, not joined, so a connection costs no
 * thread start and join (clone3, the stack mapped and unmapped, the first
 * read's fcntl for the fd's alignment) -- nbdcopy opens 4 connections per
 * copy. At most POOL_KEEP threads wait parked; one more ends (joined by the
 * next call into the pool). A parked thread keeps its buffer (up to
 * KEEP_BUF, as between two requests). */

#define POOL_KEEP MAX_WORKERS

struct pworker {
    struct pworker *next;
    struct bj_nbds *sess;           /* the session it serves; NULL: parked */
    int quit;                       /* bj_nbds_pool_trim: end */
    pthread_cond_t cv;              /* a session given, or quit */
    pthread_t tid;
    struct wbuf w;
};

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static struct pworker *pool_idle;   /* parked */
static int pool_nidle;
static struct pworker *pool_dead;   /* ended (or ending) over POOL_KEEP: to join */

static void pworker_free(struct pworker *pw)
{
    pthread_join(pw->tid, NULL);
    pthread_cond_destroy(&pw->cv);
    wbuf_free(&pw->w);
    free(pw);
}

/* Join the threads that ended over POOL_KEEP (pool_lock not held). */
static void pool_reap(void)
{
    pthread_mutex_lock(&pool_lock);
    struct pworker *d = pool_dead;
    pool_dead = NULL;
    pthread_mutex_unlock(&pool_lock);
    while (d) {
        struct pworker *n = d->next;
        pworker_free(d);
        d = n;
    }
}

/* Serve session s until it stops and no job is left; then the thread
 * parks (or, over POOL_KEEP, goes to pool_dead) before it leaves the
 * session: once bj_nbds_free returns, its threads are parked. Returns 0
 * parked, 1 to end. */
static int serve_session(struct pworker *pw, struct bj_nbds *s)
{
    pthread_mutex_lock(&s->lock);
    for (;;) {
        while (!s->head && !s->stop) {
            s->waiting++;
            pthread_cond_wait(&s->more, &s->lock);
            s->waiting--;
        }
        if (!s->head)
            break;
        struct job *j = s->head;
        s->head = j->next;
        if (!s->head)
            s->tail = NULL;
        pthread_mutex_unlock(&s->lock);
        serve(s, j, &pw->w);
        free(j);
        pthread_mutex_lock(&s->lock);
        s->inflight--;
        /* only where a waiter's condition turns true (wait_free: the
         * least need of the waiters met -- wait_idle: none in flight;
         * submit: half the workers free; wait_slots: one free), and not
         * under the lock: the woken thread's first act is to take
         * it (a futex wait and wake more per job, measured) */
        int idle = s->idle_waiters && s->nthreads - s->inflight >= s->idle_need;
        int reap = !s->inflight && s->ndone;
        if (idle || reap) {
            pthread_mutex_unlock(&s->lock);
            if (idle)
                pthread_cond_broadcast(&s->idle);
            if (reap)
                wake_reaper(s);
            pthread_mutex_lock(&s->lock);
        }
    }
    wbuf_trim(&pw->w);
    int end = 0;
    pthread_mutex_lock(&pool_lock);     /* (lock order: a session's, then the pool's) */
    pw->sess = NULL;
    if (pool_nidle >= POOL_KEEP) {
        pw->next = pool_dead;
        pool_dead = pw;
        end = 1;
    } else {
        pw->next = pool_idle;
        pool_idle = pw;
        pool_nidle++;
    }
    pthread_mutex_unlock(&pool_lock);
    if (--s->attached == 0)
        pthread_cond_broadcast(&s->gone);
    /* (bj_nbds_free may free s once this unlock is done: s is not touched
     * after it) */
    pthread_mutex_unlock(&s->lock);
    return end;
}

static void *pool_thread(void *arg)
{
    struct pworker *pw = arg;
    pthread_setname_np(pthread_self(), "bj-nbds");
    struct bj_nbds *s = pw->sess;       /* (set before the thread was created) */
    while (serve_session(pw, s) == 0) {
        /* parked: a session's pool_get hands it the next one */
        pthread_mutex_lock(&pool_lock);
        while (!pw->sess && !pw->quit)
            pthread_cond_wait(&pw->cv, &pool_lock);
        s = pw->sess;
        pthread_mutex_unlock(&pool_lock);
        if (!s)             /* quit (off the idle list: bj_nbds_pool_trim joins it) */
            break;
    }
    return NULL;
}

/* A thread for session s: a parked one, else a new one. 0 or -errno. */
static int pool_get(struct bj_nbds *s)
{
    pthread_mutex_lock(&pool_lock);
    struct pworker *pw = pool_idle;
    if (pw) {
        pool_idle = pw->next;
        pool_nidle--;
        pw->sess = s;
        pthread_cond_signal(&pw->cv);
    }
    int reap = pool_dead != NULL;
    pthread_mutex_unlock(&pool_lock);
    if (reap)
        pool_reap();
    if (pw)
        return 0;
    pw = calloc(1, sizeof(*pw));
    if (!pw)
        return -ENOMEM;
    pw->sess = s;
    pw->w.afd = -1;
    pthread_cond_init(&pw->cv, NULL);
    int r = pthread_create(&pw->tid, NULL, pool_thread, pw);
    if (r != 0) {
        pthread_cond_destroy(&pw->cv);
        free(pw);
        return -r;
    }
    return 0;
}

int bj_nbds_pool_trim(int keep)
{
    struct pworker *quit = NULL;
    pthread_mutex_lock(&pool_lock);
    while (pool_nidle > (keep < 0 ? 0 : keep)) {
        struct pworker *pw = pool_idle;
        pool_idle = pw->next;
        pool_nidle--;
        pw->quit = 1;
        pthread_cond_signal(&pw->cv);
        pw->next = quit;
        quit = pw;
    }
    int n = pool_nidle;
    pthread_mutex_unlock(&pool_lock);
    while (quit) {
        struct pworker *nx = quit->next;
        pworker_free(quit);
        quit = nx;
    }
    pool_reap();
    return n;
}

int bj_nbds_pool_idle(void)
{
    pthread_mutex_lock(&pool_lock);
    int n = pool_nidle;
    pthread_mutex_unlock(&pool_lock);
    return n;
}

/* -- the session ------------------------------------------------------------- */

struct bj_nbds *bj_nbds_new(int sock, int structured, int workers)
{
    if (workers < 1 || workers > MAX_WORKERS) {
        errno = EINVAL;
        return NULL;
    }
    /* every field zeroed but the 64 KiB read-ahead buffer (a memset of
     * it per connection, for bytes only ever read after recv wrote them) */
    struct bj_nbds *s = malloc(sizeof(*s));
    if (!s)
        return NULL;
    memset(s, 0, offsetof(struct bj_nbds, rbuf));
    s->sock = sock;
    s->structured = structured;
    int dom = 0;
    socklen_t dl = sizeof(dom);
    s->unix_sock = getsockopt(sock, SOL_SOCKET, SO_DOMAIN, &dom, &dl) == 0 && dom == AF_UNIX;
    /* the session lock's holds are a few instructions (a job taken, a
     * token, a count) contended by up to 64 workers, the reader and the
     * reaper: spin a little before sleeping on it (a futex wait and wake
     * each time otherwise) */
    pthread_mutexattr_t ma;
    pthread_mutexattr_init(&ma);
    pthread_mutexattr_settype(&ma, PTHREAD_MUTEX_ADAPTIVE_NP);
    pthread_mutex_init(&s->lock, &ma);
    pthread_mutexattr_destroy(&ma);
    pthread_mutex_init(&s->send_lock, NULL);
    pthread_cond_init(&s->more, NULL);
    pthread_cond_init(&s->idle, NULL);
    pthread_cond_init(&s->donecv, NULL);
    pthread_cond_init(&s->gone, NULL);
    /* no worker yet: they start once there is work for them
     * (bj_nbds_submit), so a connection that reads little starts and
     * joins fewer threads, and one that reads nothing -- nbdinfo --size,
     * nbdcopy's idle connections on a sparse image -- none */
    s->nthreads = workers;
    return s;
}

/* A worker for each request in flight, up to nthreads, from the pool
 * (s->lock held); a thread that cannot be had lowers nthreads to those
 * serving (if any). */
static void start_workers(struct bj_nbds *s)
{
    int want = s->inflight < s->nthreads ? s->inflight : s->nthreads;
    while (s->started < want) {
        if (pool_get(s) < 0) {
            if (s->started)     /* (none: bj_nbds_submit fails) */
                s->nthreads = s->started;
            break;
        }
        s->started++;
        s->attached++;
    }
}

/* Stop a session's workers: they finish what is queued and go back to the
 * pool; on return none of them touches s. */
static void stop_workers(struct bj_nbds *s)
{
    pthread_mutex_lock(&s->lock);
    s->stop = 1;
    pthread_cond_broadcast(&s->more);
    while (s->attached)
        pthread_cond_wait(&s->gone, &s->lock);
    pthread_mutex_unlock(&s->lock);
}

void bj_nbds_free(struct bj_nbds *s)
{
    if (!s)
        return;
    stop_workers(s);
    if (s->global)      /* (not drained: its tokens are dropped) */
        reap_forget(s);
    while (s->head) {               /* only when no thread ever started */
        struct job *j = s->head;
        s->head = j->next;
        free(j);
    }
    pthread_mutex_destroy(&s->lock);
    pthread_mutex_destroy(&s->send_lock);
    pthread_cond_destroy(&s->more);
    pthread_cond_destroy(&s->idle);
    pthread_cond_destroy(&s->donecv);
    pthread_cond_destroy(&s->gone);
    if (s->iw) {
        wbuf_free(s->iw);
        free(s->iw);
    }
    free(s->done);
    free(s);
}

static int take_done_locked(struct bj_nbds *s, uint64_t *done, int maxdone)
{
    int n = 0;
    if (maxdone <= 0)
        return 0;
    n = s->ndone < (size_t)maxdone ? (int)s->ndone : maxdone;
    if (n == 0)
        return 0;       /* (s->done may be NULL yet: nothing queued ever) */
    memcpy(done, s->done, sizeof(*done) * (size_t)n);
    memmove(s->done, s->done + n, sizeof(*done) * (s->ndone - (size_t)n));
    s->ndone -= (size_t)n;
    return n;
}

int bj_nbds_wait_done(struct bj_nbds *s, uint64_t *done, int maxdone)
{
    pthread_mutex_lock(&s->lock);
    while (!s->stop_done && (!s->ndone || (s->inflight && s->ndone < DONE_BATCH && !s->flush)))
        pthread_cond_wait(&s->donecv, &s->lock);
    s->flush = 0;
    int n = take_done_locked(s, done, maxdone);
    pthread_mutex_unlock(&s->lock);
    return n;
}

void bj_nbds_stop_done(struct bj_nbds *s)
{
    pthread_mutex_lock(&s->lock);
    s->stop_done = 1;
    pthread_cond_broadcast(&s->donecv);
    pthread_mutex_unlock(&s->lock);
}

/* -- the process's reaper ---------------------------------------------------- */

void bj_nbds_global(struct bj_nbds *s)
{
    s->global = 1;
}

int bj_nbds_reap(uint64_t *keys, uint32_t *counts, uint64_t *done, int maxdone)
{
    int n = 0, runs = 0;
    pthread_mutex_lock(&reap_lock);
    while (!reap_head && !reap_stop)
        pthread_cond_wait(&reap_cv, &reap_lock);
    while (reap_head && n < maxdone) {
        struct bj_nbds *s = reap_head;
        reap_head = s->reap_next;
        if (!reap_head)
            reap_tail = NULL;
        s->queued = 0;
        if (!s->in_batch) {
            s->in_batch = 1;
            s->batch_next = reap_batch;
            reap_batch = s;
        }
        /* (s stays alive: bj_nbds_drain waits until its batch ended) */
        pthread_mutex_unlock(&reap_lock);
        pthread_mutex_lock(&s->lock);
        s->flush = 0;
        int k = take_done_locked(s, done + n, maxdone - n);
        int more = s->ndone != 0;
        pthread_mutex_unlock(&s->lock);
        if (k) {
            keys[runs] = (uint64_t)(uintptr_t)s;
            counts[runs++] = (uint32_t)k;
            n += k;
        }
        if (more)           /* (the next call takes the rest) */
            wake_reaper(s);
        pthread_mutex_lock(&reap_lock);
    }
    pthread_mutex_unlock(&reap_lock);
    return runs;
}

void bj_nbds_reaped(void)
{
    pthread_mutex_lock(&reap_lock);
    while (reap_batch) {
        struct bj_nbds *s = reap_batch;
        reap_batch = s->batch_next;
        s->in_batch = 0;
    }
    pthread_mutex_unlock(&reap_lock);
    pthread_cond_broadcast(&reaped_cv);
}

void bj_nbds_reap_stop(int stop)
{
    pthread_mutex_lock(&reap_lock);
    reap_stop = stop;
    pthread_mutex_unlock(&reap_lock);
    pthread_cond_broadcast(&reap_cv);
}

/* Take s off the process's reaper (its workers stopped: nothing queues it
 * again): wait until a batch with tokens of s is reaped, unqueue s. */
static void reap_forget(struct bj_nbds *s)
{
    pthread_mutex_lock(&reap_lock);
    while (s->in_batch)
        pthread_cond_wait(&reaped_cv, &reap_lock);
    if (s->queued) {
        struct bj_nbds **p = &reap_head, *prev = NULL;
        while (*p != s) {
            prev = *p;
            p = &(*p)->reap_next;
        }
        *p = s->reap_next;
        if (reap_tail == s)
            reap_tail = prev;
        s->queued = 0;
    }
    pthread_mutex_unlock(&reap_lock);
}

int bj_nbds_drain(struct bj_nbds *s, uint64_t *done, int maxdone)
{
    stop_workers(s);
    /* no worker touches s now: nothing queues it again */
    reap_forget(s);
    pthread_mutex_lock(&s->lock);
    int n = take_done_locked(s, done, maxdone);
    pthread_mutex_unlock(&s->lock);
    return n;
}

/* Wait (s->lock held) until need workers are free (need > nthreads: never
 * more than nthreads; nthreads: none in flight); the workers wake the
 * waiters only when the least need of theirs is met. Returns those free. */
static int wait_free(struct bj_nbds *s, int need)
{
    if (need > s->nthreads)
        need = s->nthreads;
    while (s->nthreads - s->inflight < need) {
        if (!s->idle_waiters || need < s->idle_need)
            s->idle_need = need;
        s->idle_waiters++;
        pthread_cond_wait(&s->idle, &s->lock);
        s->idle_waiters--;
    }
    return s->nthreads - s->inflight;
}

int bj_nbds_wait_slots(struct bj_nbds *s)
{
    return bj_nbds_wait_free(s, 1);
}

int bj_nbds_wait_free(struct bj_nbds *s, int want)
{
    pthread_mutex_lock(&s->lock);
    int half = s->nthreads - s->nthreads / 2;
    int n = wait_free(s, want < 1 ? 1 : want < half ? want : half);
    pthread_mutex_unlock(&s->lock);
    return n;
}

int bj_nbds_zc_busy(struct bj_nbds *s)
{
    pthread_mutex_lock(&s->lock);
    int pending = s->zc_pending;
    pthread_mutex_unlock(&s->lock);
    if (pending)
        return 1;
    int64_t q = bj_nbds_outq(s->sock);
    return q < 0 ? (int)q : q > 0;
}

void bj_nbds_zc_revoke(struct bj_nbds *s)
{
    __atomic_store_n(&s->zc_off, 1, __ATOMIC_RELEASE);
}

void bj_nbds_zc_stats(struct bj_nbds *s, uint64_t *out)
{
    pthread_mutex_lock(&s->lock);
    out[0] = s->zc_bytes;
    out[1] = s->zc_reads;
    pthread_mutex_unlock(&s->lock);
}

int64_t bj_nbds_outq(int sock)
{
    int q = 0;
    if (ioctl(sock, SIOCOUTQ, &q) < 0)
        return -errno;
    return q;
}

int bj_nbds_inflight(struct bj_nbds *s)
{
    pthread_mutex_lock(&s->lock);
    int n = s->inflight;
    pthread_mutex_unlock(&s->lock);
    return n;
}

void bj_nbds_wait_idle(struct bj_nbds *s)
{
    pthread_mutex_lock(&s->lock);
    wait_free(s, s->nthreads);
    pthread_mutex_unlock(&s->lock);
}

/* Headers complete in rbuf, up to max (stopping after WRITE/DISC/bad magic). */
static int parse(struct bj_nbds *s, struct bj_nbds_req *reqs, int max)
{
    int n = 0;
    while (n < max && s->rlen - s->rpos >= HDR) {
        const unsigned char *p = s->rbuf + s->rpos;
        struct bj_nbds_req *r = &reqs[n++];
        r->magic = get_be32(p);
        r->flags = get_be16(p + 4);
        r->type = get_be16(p + 6);
        r->handle = get_be64(p + 8);
        r->offset = get_be64(p + 16);
        r->length = get_be32(p + 24);
        s->rpos += HDR;
        if (r->magic != REQUEST_MAGIC || r->type == CMD_WRITE || r->type == CMD_DISC)
            break;
    }
    return n;
}

/* Some bytes of the stream into buf (up to len): their number, or
 * -ECONNRESET at EOF, -errno. */
static ssize_t recv_some(struct bj_nbds *s, void *buf, size_t len)
{
    for (;;) {
        ssize_t k = recv(s->sock, buf, len, 0);
        if (k > 0)
            return k;
        if (k == 0)
            return -ECONNRESET;
        if (errno != EINTR)
            return -errno;
    }
}

int bj_nbds_next(struct bj_nbds *s, struct bj_nbds_req *reqs, int max)
{
    for (;;) {
        int n = parse(s, reqs, max);
        if (n)
            return n;
        /* keep the partial header, read more behind it */
        if (s->rpos) {
            memmove(s->rbuf, s->rbuf + s->rpos, s->rlen - s->rpos);
            s->rlen -= s->rpos;
            s->rpos = 0;
        }
        ssize_t k = recv_some(s, s->rbuf + s->rlen, RBUF - s->rlen);
        if (k < 0)
            return (int)k;
        s->rlen += (size_t)k;
    }
}

int bj_nbds_recv(struct bj_nbds *s, void *buf, uint64_t len)
{
    unsigned char *p = buf;
    size_t have = s->rlen - s->rpos;
    if (have > len)
        have = len;
    memcpy(p, s->rbuf + s->rpos, have);
    s->rpos += have;
    len -= have;
    p += have;
    while (len > 0) {
        ssize_t k = recv_some(s, p, len);
        if (k < 0)
            return (int)k;
        p += k;
        len -= (uint64_t)k;
    }
    return 0;
}

static void free_jobs(struct job *first)
{
    while (first) {
        struct job *j = first;
        first = j->next;
        free(j);
    }
}

/* The jobs of reqs/segs (bj_nbds_submit's words), linked from *first;
 * *stable: how many are stable READs. 0 or -errno (nothing made). */
static int make_jobs(struct bj_nbds *s, const uint64_t *reqs, int nreq, const uint64_t *segs,
                     int nsegs, struct job **firstp, int *stablep)
{
    struct job *first = NULL, **link = &first;
    int used = 0, r = 0, stable = 0;
    if (nreq < 0 || nsegs < 0)
        return -EINVAL;
    for (int i = 0; i < nreq; i++) {
        const uint64_t *q = reqs + 6 * i;
        uint64_t k = q[5], sum = 0;
        if (k == 0 || k > (uint64_t)(nsegs - used)) {
            r = -EINVAL;
            break;
        }
        struct job *j = malloc(sizeof(*j) + sizeof(struct seg) * k);
        if (!j) {
            r = -ENOMEM;
            break;
        }
        *j = (struct job){.handle = q[0], .offset = q[1], .length = q[2],
                          .flags = q[3] & 0xffff, .token = q[4],
                          .cmd = (int)(q[3] >> 16 & 0xffff), .ctx = (uint32_t)(q[3] >> 32),
                          .nsegs = (int)k};
        j->stable = j->cmd == CMD_READ && (q[3] & BJ_NBDS_STABLE) != 0;
        stable += j->stable;
        for (uint64_t g = 0; g < k; g++) {
            const uint64_t *w = segs + 4 * (used + (int)g);
            j->segs[g] = (struct seg){w[0], w[1], w[2], w[3]};
            sum += w[3];
            if (w[0] > BJ_NBDS_ZERO || w[3] > 0xffffffffu)
                sum = UINT64_MAX;
        }
        *link = j;
        link = &j->next;
        used += (int)k;
        if (sum != j->length || j->length > 0xffffffffu
            || (j->cmd != CMD_READ && (j->cmd != CMD_BLOCK_STATUS || !s->structured))) {
            r = -EINVAL;
            break;
        }
    }
    if (r == 0 && used != nsegs)
        r = -EINVAL;
    if (r < 0) {
        free_jobs(first);
        return r;
    }
    *firstp = first;
    *stablep = stable;
    return 0;
}

/* Room in s->done for every token in flight and n more (s->lock held). */
static int done_room(struct bj_nbds *s, int n)
{
    size_t need = s->ndone + (size_t)s->inflight + (size_t)n;
    if (need > s->capdone) {
        size_t cap = need * 2;
        uint64_t *d = realloc(s->done, sizeof(*d) * cap);
        if (!d)
            return -ENOMEM;
        s->done = d;
        s->capdone = cap;
    }
    return 0;
}

static int submit(struct bj_nbds *s, const uint64_t *reqs, int nreq, const uint64_t *segs,
                  int nsegs, int wait)
{
    struct job *first = NULL;
    int stable = 0;
    int r = make_jobs(s, reqs, nreq, segs, nsegs, &first, &stable);
    if (r < 0)
        return r;
    pthread_mutex_lock(&s->lock);
    if (done_room(s, nreq) < 0) {
        pthread_mutex_unlock(&s->lock);
        free_jobs(first);
        return -ENOMEM;
    }
    if (first) {
        if (s->tail)
            s->tail->next = first;
        else
            s->head = first;
        struct job *t = first;
        while (t->next)
            t = t->next;
        s->tail = t;
    }
    s->inflight += nreq;
    s->unread += nreq;
    s->zc_pending += stable;
    start_workers(s);
    if (!s->started) {
        /* not even one thread: nothing was started before either, so the
         * queue holds only these jobs; hand them back */
        s->inflight -= nreq;
        s->unread -= nreq;
        s->zc_pending -= stable;
        while (s->head) {
            struct job *j = s->head;
            s->head = j->next;
            free(j);
        }
        s->tail = NULL;
        pthread_mutex_unlock(&s->lock);
        return -EAGAIN;
    }
    /* one worker per job, no herd; as many as wait, and after the
     * unlock (a worker woken under the lock would wait for it at once) */
    int wake = nreq < s->waiting ? nreq : s->waiting;
    pthread_mutex_unlock(&s->lock);
    for (int i = 0; i < wake; i++)
        pthread_cond_signal(&s->more);
    pthread_mutex_lock(&s->lock);
    /* (bj_nbds_wait_slots, in one call; for half the workers: fewer,
     * larger batches for the caller) */
    int n = wait ? wait_free(s, s->nthreads - s->nthreads / 2) : s->nthreads - s->inflight;
    pthread_mutex_unlock(&s->lock);
    return n;
}

int bj_nbds_submit(struct bj_nbds *s, const uint64_t *reqs, int nreq, const uint64_t *segs,
                   int nsegs)
{
    return submit(s, reqs, nreq, segs, nsegs, 1);
}

int bj_nbds_queue(struct bj_nbds *s, const uint64_t *reqs, int nreq, const uint64_t *segs,
                  int nsegs)
{
    return submit(s, reqs, nreq, segs, nsegs, 0);
}

int bj_nbds_serve_one(struct bj_nbds *s, const uint64_t *req, const uint64_t *segs, int nsegs,
                      uint64_t *token)
{
    struct job *j = NULL;
    int stable = 0;
    int r = make_jobs(s, req, 1, segs, nsegs, &j, &stable);
    if (r < 0)
        return r;
    if (!s->iw && !(s->iw = calloc(1, sizeof(*s->iw)))) {
        free(j);
        return -ENOMEM;
    }
    j->inl = 1;
    pthread_mutex_lock(&s->lock);
    if (done_room(s, 1) < 0) {
        pthread_mutex_unlock(&s->lock);
        free(j);
        return -ENOMEM;
    }
    /* in flight as a worker's job (wait_idle, zero-copy's count, room
     * for its token in done should a wait for the socket flush it) */
    s->inflight++;
    s->unread++;
    s->zc_pending += stable;
    pthread_mutex_unlock(&s->lock);
    serve(s, j, s->iw);
    free(j);
    pthread_mutex_lock(&s->lock);
    s->inflight--;
    r = s->inl_set;
    if (r)
        *token = s->inl_tok;
    s->inl_set = 0;
    /* the workers' rules (serve_session): their tokens wait for no read
     * in flight -- this one was -- and a waiter for free workers */
    int idle = s->idle_waiters && s->nthreads - s->inflight >= s->idle_need;
    int reap = !s->inflight && s->ndone;
    pthread_mutex_unlock(&s->lock);
    if (idle)
        pthread_cond_broadcast(&s->idle);
    if (reap)
        wake_reaper(s);
    return r;
}

/* -- the handshake's common options (bj_nbdh_step, nbdsrv.h) ---------------- */

#define NBDMAGIC 0x4e42444d41474943ull
#define IHAVEOPT 0x49484156454f5054ull
#define OPT_REPLY_MAGIC 0x0003e889045565a9ull
#define OPT_INFO 6
#define OPT_GO 7
#define OPT_STRUCTURED_REPLY 8
#define OPT_LIST_META_CONTEXT 9
#define OPT_SET_META_CONTEXT 10
#define REP_ACK 1
#define REP_META_CONTEXT 4
#define HS_FIXED_NEWSTYLE 1u
#define HS_NO_ZEROES 2u
#define OPT_HDR 16
#define BASE_ALLOC "base:allocation"
/* the longest an export name may be (blkjobs.nbd.proto.MAX_STRING) */
#define MAX_NAME 4096

struct hs_out {
    unsigned char b[256];
    size_t n;
};

static int hs_flush(int sock, struct hs_out *o)
{
    size_t done = 0;
    while (done < o->n) {
        ssize_t k = send(sock, o->b + done, o->n - done, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        done += (size_t)k;
    }
    o->n = 0;
    return 0;
}

/* An option reply of len data bytes (copied), flushed first when full. */
static int hs_reply(int sock, struct hs_out *o, uint32_t option, uint32_t type,
                    const void *data, uint32_t len)
{
    if (o->n + 20 + len > sizeof(o->b)) {
        int r = hs_flush(sock, o);
        if (r < 0)
            return r;
    }
    unsigned char *p = o->b + o->n;
    put_be64(p, OPT_REPLY_MAGIC);
    put_be32(p + 8, option);
    put_be32(p + 12, type);
    put_be32(p + 16, len);
    if (len)
        memcpy(p + 20, data, len);
    o->n += 20 + len;
    return 0;
}

/* Until buf holds want bytes from rpos (want <= cap): the replies are
 * sent first (the client may wait for them before it says more). */
static int hs_fill(int sock, struct bj_nbdh *h, unsigned char *buf, uint32_t cap,
                   uint32_t want, struct hs_out *o)
{
    while (h->rlen - h->rpos < want) {
        int r = hs_flush(sock, o);
        if (r < 0)
            return r;
        if (h->rpos) {
            memmove(buf, buf + h->rpos, h->rlen - h->rpos);
            h->rlen -= h->rpos;
            h->rpos = 0;
        }
        ssize_t k = recv(sock, buf + h->rlen, cap - h->rlen, 0);
        if (k == 0)
            return -ECONNRESET;
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        h->rlen += (uint32_t)k;
    }
    return 0;
}

/* The index in names of the export named by (p, n), its flags byte in
 * *flags; -1: none. */
static int32_t hs_export(const unsigned char *names, uint32_t names_len,
                         const unsigned char *p, uint32_t n, unsigned *flags)
{
    int32_t i = 0;
    for (uint32_t pos = 0; pos + 4 <= names_len; i++) {
        uint32_t k = get_be32(names + pos);
        pos += 4;
        if (k >= names_len - pos)       /* (the name, then its flags byte) */
            return -1;
        if (k == n && memcmp(names + pos, p, n) == 0) {
            *flags = names[pos + k];
            return i;
        }
        pos += k + 1;
    }
    return -1;
}

/* A string of the option's data at *pos (4-byte length, bytes): 0 and
 * *pos past it, or -1 (too short, too long). */
static int hs_string(const unsigned char *d, uint32_t len, uint32_t *pos, uint32_t *sp,
                     uint32_t *sn)
{
    if (len - *pos < 4)
        return -1;
    uint32_t n = get_be32(d + *pos);
    if (n > MAX_NAME || n > len - *pos - 4)
        return -1;
    *sp = *pos + 4;
    *sn = n;
    *pos += 4 + n;
    return 0;
}

/* One option whose header and data are in d (len bytes): 1 answered (into
 * o), 2 a GO or 3 an INFO returned (h->go_*), 0 the caller's (nothing
 * consumed). */
static int hs_option(struct bj_nbdh *h, uint32_t option, const unsigned char *d,
                     uint32_t len, const unsigned char *names, uint32_t names_len,
                     int sock, struct hs_out *o, int *err)
{
    uint32_t pos = 0, sp, sn;
    if (option == OPT_STRUCTURED_REPLY) {
        if (len || (h->state & BJ_NBDH_STRUCTURED))
            return 0;       /* (the caller's error texts) */
        h->state |= BJ_NBDH_STRUCTURED;
        *err = hs_reply(sock, o, option, REP_ACK, NULL, 0);
        return 1;
    }
    if (option == OPT_SET_META_CONTEXT) {
        uint32_t qp, qn;
        if (!(h->state & BJ_NBDH_STRUCTURED) || hs_string(d, len, &pos, &sp, &sn) < 0
            || len - pos < 4 || get_be32(d + pos) != 1)
            return 0;
        pos += 4;
        if (hs_string(d, len, &pos, &qp, &qn) < 0 || pos != len
            || qn != sizeof(BASE_ALLOC) - 1 || memcmp(d + qp, BASE_ALLOC, qn) != 0)
            return 0;
        unsigned ef;
        int32_t e = hs_export(names, names_len, d + sp, sn, &ef);
        if (e < 0)
            return 0;
        unsigned char ctx[4 + sizeof(BASE_ALLOC) - 1];
        put_be32(ctx, 1);
        memcpy(ctx + 4, BASE_ALLOC, sizeof(BASE_ALLOC) - 1);
        h->state |= BJ_NBDH_BASE_ALLOC;
        h->ctx_export = e;
        *err = hs_reply(sock, o, option, REP_META_CONTEXT, ctx, sizeof(ctx));
        if (*err == 0)
            *err = hs_reply(sock, o, option, REP_ACK, NULL, 0);
        return 1;
    }
    if (option == OPT_LIST_META_CONTEXT) {
        /* base:allocation, the one context of an export without bitmaps:
         * asked for by no query (all), "base:" or its name */
        uint32_t qp, qn, nq;
        unsigned ef;
        if (!(h->state & BJ_NBDH_STRUCTURED) || hs_string(d, len, &pos, &sp, &sn) < 0
            || len - pos < 4 || (nq = get_be32(d + pos)) > 1)
            return 0;
        pos += 4;
        if (nq == 1) {
            if (hs_string(d, len, &pos, &qp, &qn) < 0
                || !((qn == 5 && memcmp(d + qp, "base:", 5) == 0)
                     || (qn == sizeof(BASE_ALLOC) - 1
                         && memcmp(d + qp, BASE_ALLOC, qn) == 0)))
                return 0;
        }
        int32_t e = hs_export(names, names_len, d + sp, sn, &ef);
        if (pos != len || e < 0 || (ef & BJ_NBDH_EXPORT_BITMAPS))
            return 0;
        unsigned char ctx[4 + sizeof(BASE_ALLOC) - 1];
        put_be32(ctx, 0);
        memcpy(ctx + 4, BASE_ALLOC, sizeof(BASE_ALLOC) - 1);
        *err = hs_reply(sock, o, option, REP_META_CONTEXT, ctx, sizeof(ctx));
        if (*err == 0)
            *err = hs_reply(sock, o, option, REP_ACK, NULL, 0);
        return 1;
    }
    if (option == OPT_GO || option == OPT_INFO) {
        unsigned ef;
        if (hs_string(d, len, &pos, &sp, &sn) < 0 || len - pos < 2)
            return 0;
        uint32_t n = get_be16(d + pos);
        pos += 2;
        if (len - pos != 2 * n)
            return 0;
        int32_t e = hs_export(names, names_len, d + sp, sn, &ef);
        if (e < 0)
            return 0;
        uint32_t info = 0;
        for (uint32_t i = 0; i < n; i++) {
            uint32_t t = get_be16(d + pos + 2 * i);
            if (t < 32)
                info |= 1u << t;
        }
        h->go_export = e;
        h->go_info = info;
        return option == OPT_GO ? 2 : 3;
    }
    return 0;
}

int bj_nbdh_timeouts(int sock, uint64_t usec)
{
    struct timeval tv = {.tv_sec = (time_t)(usec / 1000000), .tv_usec = (suseconds_t)(usec % 1000000)};
    if (setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) < 0
        || setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) < 0)
        return -errno;
    return 0;
}

int bj_nbdh_step(int sock, struct bj_nbdh *h, unsigned char *buf, uint32_t cap,
                 const unsigned char *names, uint32_t names_len)
{
    struct hs_out o = {.n = 0};
    int r = 0;
    if (h->rpos > h->rlen || h->rlen > cap || cap < OPT_HDR)
        return -EINVAL;
    if (!(h->state & BJ_NBDH_GREETED)) {
        put_be64(o.b, NBDMAGIC);
        put_be64(o.b + 8, IHAVEOPT);
        put_be16(o.b + 16, HS_FIXED_NEWSTYLE | HS_NO_ZEROES);
        o.n = 18;
        if ((r = hs_fill(sock, h, buf, cap, 4, &o)) < 0)
            return r;
        uint32_t cflags = get_be32(buf + h->rpos);
        h->rpos += 4;
        h->state |= BJ_NBDH_GREETED;
        if (cflags & ~(HS_FIXED_NEWSTYLE | HS_NO_ZEROES))
            return BJ_NBDH_HANGUP;
        if (cflags & HS_NO_ZEROES)
            h->state |= BJ_NBDH_NO_ZEROES;
    }
    for (;;) {
        if ((r = hs_fill(sock, h, buf, cap, OPT_HDR, &o)) < 0)
            return r;
        const unsigned char *p = buf + h->rpos;
        uint32_t option = get_be32(p + 8), len = get_be32(p + 12);
        if (get_be64(p) != IHAVEOPT || len > cap - OPT_HDR
            || (option != OPT_STRUCTURED_REPLY && option != OPT_SET_META_CONTEXT
                && option != OPT_LIST_META_CONTEXT && option != OPT_GO
                && option != OPT_INFO))
            break;
        if ((r = hs_fill(sock, h, buf, cap, OPT_HDR + len, &o)) < 0)
            return r;
        p = buf + h->rpos;
        int err = 0;
        int k = hs_option(h, option, p + OPT_HDR, len, names, names_len, sock, &o, &err);
        if (err < 0)
            return err;
        if (k == 0)
            break;
        h->rpos += OPT_HDR + len;
        if (k >= 2)
            return (r = hs_flush(sock, &o)) < 0 ? r : k == 2 ? BJ_NBDH_GO : BJ_NBDH_INFO;
    }
    return (r = hs_flush(sock, &o)) < 0 ? r : BJ_NBDH_OPTION;
}
