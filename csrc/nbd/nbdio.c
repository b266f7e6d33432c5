/* See nbdio.h. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <poll.h>
#include <stdbool.h>
#include <string.h>

#include "nbdio.h"

/* Let the handle make progress: wait (at most timeout_ms) until its socket
 * is ready in the direction it wants, then notify it. */
static int step(struct nbd_handle *h, int timeout_ms)
{
    if (nbd_aio_is_dead(h) || nbd_aio_is_closed(h))
        return -ECONNRESET;
    int fd = nbd_aio_get_fd(h);
    if (fd < 0)
        return -ENOTCONN;
    unsigned dir = nbd_aio_get_direction(h);
    struct pollfd p = { .fd = fd, .events = 0, .revents = 0 };
    if (dir & LIBNBD_AIO_DIRECTION_READ)
        p.events |= POLLIN;
    if (dir & LIBNBD_AIO_DIRECTION_WRITE)
        p.events |= POLLOUT;
    int n;
    do
        n = poll(&p, 1, timeout_ms);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;
    if (n == 0)
        return -ETIMEDOUT;
    int r = 0;
    if (p.revents & (POLLIN | POLLHUP | POLLERR))
        r = nbd_aio_notify_read(h);
    else if (p.revents & POLLOUT)
        r = nbd_aio_notify_write(h);
    if (r == -1)
        return -(nbd_get_errno() ? nbd_get_errno() : ECONNRESET);
    return 0;
}

int bj_nbd_connect(struct nbd_handle *h, const char *uri, int timeout_ms)
{
    if (nbd_aio_connect_uri(h, uri) == -1)
        return -(nbd_get_errno() ? nbd_get_errno() : EINVAL);
    while (!nbd_aio_is_ready(h)) {
        int r = step(h, timeout_ms);
        if (r < 0)
            return r;
    }
    return 0;
}

struct pending {
    int in_flight;
    int err;
};

static int done_cb(void *user_data, int *error)
{
    struct pending *p = user_data;
    p->in_flight--;
    if (*error && !p->err)
        p->err = *error;
    return 1;       /* retire the command */
}

/* Wait until nothing of ours is in flight. */
static int drain(struct nbd_handle *h, struct pending *p, int timeout_ms)
{
    while (p->in_flight > 0) {
        int r = step(h, timeout_ms);
        if (r < 0)
            return r;
    }
    return p->err ? -p->err : 0;
}

int bj_nbd_rw(struct nbd_handle *h, int write, void *buf, uint64_t len, uint64_t off,
              uint64_t chunk, int depth, uint32_t flags, int timeout_ms)
{
    struct pending p = { 0, 0 };
    uint64_t pos = 0;
    if (chunk == 0 || depth < 1)
        return -EINVAL;
    while (pos < len && !p.err) {
        while (pos < len && p.in_flight < depth) {
            uint64_t n = len - pos < chunk ? len - pos : chunk;
            nbd_completion_callback cb = { .callback = done_cb, .user_data = &p, .free = NULL };
            int64_t c = write
                ? nbd_aio_pwrite(h, (char *)buf + pos, n, off + pos, cb, flags)
                : nbd_aio_pread(h, (char *)buf + pos, n, off + pos, cb, 0);
            if (c == -1) {
                int e = nbd_get_errno() ? nbd_get_errno() : EIO;
                int r = drain(h, &p, timeout_ms);
                return r < 0 && r != -e ? r : -e;
            }
            p.in_flight++;
            pos += n;
        }
        int r = step(h, timeout_ms);
        if (r < 0)
            return r;
    }
    return drain(h, &p, timeout_ms);
}

int bj_nbd_cmd(struct nbd_handle *h, int op, uint64_t off, uint64_t len, uint32_t flags,
               int timeout_ms)
{
    struct pending p = { 0, 0 };
    nbd_completion_callback cb = { .callback = done_cb, .user_data = &p, .free = NULL };
    int64_t c;
    switch (op) {
    case BJ_NBD_FLUSH: c = nbd_aio_flush(h, cb, 0); break;
    case BJ_NBD_TRIM: c = nbd_aio_trim(h, len, off, cb, flags); break;
    case BJ_NBD_ZERO: c = nbd_aio_zero(h, len, off, cb, flags); break;
    default: return -EINVAL;
    }
    if (c == -1)
        return -(nbd_get_errno() ? nbd_get_errno() : EIO);
    p.in_flight = 1;
    return drain(h, &p, timeout_ms);
}

struct extents {
    uint32_t *out;
    size_t max_pairs, n;
    uint64_t end;       /* of what the server described */
};

static int extent_cb(void *user_data, const char *metacontext, uint64_t offset,
                     uint32_t *entries, size_t nr_entries, int *error)
{
    struct extents *x = user_data;
    /* a connection asks for one context: base:allocation, or the one
     * QEMU's x-dirty-bitmap names (its bits are then read as if they were
     * base:allocation's) */
    (void)metacontext;
    if (x->n == 0)
        x->end = offset;
    for (size_t i = 0; i + 1 < nr_entries && x->n < x->max_pairs; i += 2) {
        x->out[2 * x->n] = entries[i];
        x->out[2 * x->n + 1] = entries[i + 1];
        x->end += entries[i];
        x->n++;
    }
    return 0;
}

/* The block status of [off, off+len) in the connection's meta context
 * (base:allocation unless asked otherwise): (length, flags) pairs into out;
 * the count of pairs (the server may describe less than asked). */
int64_t bj_nbd_extents(struct nbd_handle *h, uint64_t off, uint64_t len, uint32_t *out,
                       size_t max_pairs, int timeout_ms)
{
    struct pending p = { 0, 0 };
    struct extents x = { out, max_pairs, 0, off };
    nbd_extent_callback ecb = { .callback = extent_cb, .user_data = &x, .free = NULL };
    nbd_completion_callback cb = { .callback = done_cb, .user_data = &p, .free = NULL };
    if (nbd_aio_block_status(h, len, off, ecb, cb, 0) == -1)
        return -(nbd_get_errno() ? nbd_get_errno() : EIO);
    p.in_flight = 1;
    int r = drain(h, &p, timeout_ms);
    return r < 0 ? r : (int64_t)x.n;
}

/* -- copies between a local file and an export, offsets equal on both sides -- */

#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

static int all_zero(const char *p, size_t n)
{
    if (n == 0)
        return 1;
    if (p[0] != 0)
        return 0;
    /* compare with itself shifted: the buffer is zero iff every byte is p[0] */
    return memcmp(p, p + 1, n - 1) == 0;
}

/* -- reading a mapped file safely --
 * File -> export maps the file and hands libnbd pointers into the mapping:
 * the data goes from the page cache to the socket in one copy (pread into a
 * buffer, then send, is two). A file truncated meanwhile by someone else
 * makes our own reads of the mapping (the zero check) fault with SIGBUS: a
 * handler, installed once, jumps back to the check while a thread is inside
 * one (a thread-local jump buffer) and hands every other SIGBUS to the
 * disposition it found. libnbd's send from such pages fails with EFAULT
 * (the kernel does not signal): the copy then fails and is reported as a
 * source shorter than the export. */
static __thread sigjmp_buf *volatile bus_jmp;
static struct sigaction bus_old;
static pthread_once_t bus_once = PTHREAD_ONCE_INIT;
static int bus_installed;

static void on_bus(int sig, siginfo_t *si, void *uc)
{
    sigjmp_buf *j = bus_jmp;
    if (j != NULL)
        siglongjmp(*j, 1);
    /* not a fault of ours */
    if (bus_old.sa_flags & SA_SIGINFO) {
        bus_old.sa_sigaction(sig, si, uc);
    } else if (bus_old.sa_handler != SIG_IGN && bus_old.sa_handler != SIG_DFL) {
        bus_old.sa_handler(sig);
    } else {
        /* the default action: restore it; a fault happens again on return,
         * a signal sent by someone is sent again */
        sigaction(SIGBUS, &bus_old, NULL);
        if (si == NULL || si->si_code <= 0)
            raise(sig);
    }
}

static void bus_install(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_bus;
    /* NODEFER: jumping out leaves SIGBUS unblocked without sigsetjmp saving
     * the mask (a system call per check) */
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    bus_installed = sigaction(SIGBUS, &sa, &bus_old) == 0;
}

/* all_zero on mapped file pages: 1 zero, 0 not, -EIO the pages are gone
 * (the file was truncated). */
static int mapped_zero(const char *p, size_t n)
{
    sigjmp_buf j;
    volatile int r = -EIO;
    if (sigsetjmp(j, 0) == 0) {
        bus_jmp = &j;
        /* the compiler knows memcmp reads no variable of ours: keep the
         * stores around it where they are */
        atomic_signal_fence(memory_order_seq_cst);
        r = all_zero(p, n);
        atomic_signal_fence(memory_order_seq_cst);
    }
    bus_jmp = NULL;
    return r;
}

struct slot {
    char *buf;
    uint64_t off, len;
    int busy, zero;
    struct copy *c;
};

struct copy {
    int fd, to_nbd, skip_zero, err;
    struct bj_nbd_copy_stats *st;
    int in_flight;
};

static void fail(struct copy *c, int err, int side, uint64_t off)
{
    if (!c->err) {
        c->err = err;
        c->st->error_side = side;
        c->st->error_offset = off;
    }
}

static int write_all(int fd, const char *buf, uint64_t len, uint64_t off)
{
    while (len > 0) {
        ssize_t n = pwrite(fd, buf, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        buf += n; len -= (uint64_t)n; off += (uint64_t)n;
    }
    return 0;
}

static int read_all(int fd, char *buf, uint64_t len, uint64_t off)
{
    while (len > 0) {
        ssize_t n = pread(fd, buf, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO;        /* the file is shorter than the export */
        buf += n; len -= (uint64_t)n; off += (uint64_t)n;
    }
    return 0;
}

/* A request of ours completed: a read is written to the file here (in the
 * thread that drives the handle). */
static int slot_done(void *user_data, int *error)
{
    struct slot *s = user_data;
    struct copy *c = s->c;
    c->in_flight--;
    s->busy = 0;
    if (*error) {
        fail(c, *error, c->to_nbd ? 2 : 1, s->off);
        return 1;
    }
    if (!c->to_nbd && !c->err) {
        if (c->skip_zero && all_zero(s->buf, s->len)) {
            c->st->zero_bytes += s->len;
        } else {
            int r = write_all(c->fd, s->buf, s->len, s->off);
            if (r < 0)
                fail(c, -r, 2, s->off);
            else
                c->st->data_bytes += s->len;
        }
    } else if (c->to_nbd) {
        if (s->zero)
            c->st->zero_bytes += s->len;
        else
            c->st->data_bytes += s->len;
    }
    return 1;
}

/* Map [off, off+len) of the file for reading (file -> export): the mapping
 * and its start in *base / *mlen, NULL where the file cannot be mapped (the
 * copy then reads it into buffers, as it does with BLKJOBS_NBD_NO_MMAP set:
 * the benchmark's and the tests' other path) or is shorter than the range. */
static char *map_source(int fd, uint64_t off, uint64_t len, char **base, size_t *mlen)
{
    struct stat st;
    if (getenv("BLKJOBS_NBD_NO_MMAP"))
        return NULL;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || (uint64_t)st.st_size < off + len)
        return NULL;
    pthread_once(&bus_once, bus_install);
    if (!bus_installed)
        return NULL;
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    uint64_t start = off - off % page;
    size_t n = (size_t)(off + len - start);
    void *m = mmap(NULL, n, PROT_READ, MAP_SHARED, fd, (off_t)start);
    if (m == MAP_FAILED)
        return NULL;
    madvise(m, n, MADV_SEQUENTIAL);
    *base = m;
    *mlen = n;
    return (char *)m + (off - start);
}

/* File -> export over a unix socket: a send buffer of SNDBUF bytes (as far
 * as net.core.wmem_max allows; the default is ~208 KiB, less than one
 * 256 KiB write request) takes each request in one sendto and several
 * requests before the thread has to wait for the server (median of 9
 * alternated rounds against nbdcopy 0.88 with it, 0.95 without:
 * benchmarks/README.md, "NBD client"). TCP keeps the kernel's autotuning
 * (setting SO_SNDBUF would switch it off). */
#define SNDBUF (2 << 20)
static void widen_unix_sndbuf(int sock)
{
    struct sockaddr_storage sa;
    socklen_t n = sizeof sa;
    int cur = 0, want = SNDBUF;
    socklen_t cn = sizeof cur;
    if (sock < 0 || getsockname(sock, (struct sockaddr *)&sa, &n) < 0 || sa.ss_family != AF_UNIX)
        return;
    if (getsockopt(sock, SOL_SOCKET, SO_SNDBUF, &cur, &cn) == 0 && cur >= 2 * want)
        return;     /* done before (the kernel reports twice the value set) */
    (void)setsockopt(sock, SOL_SOCKET, SO_SNDBUF, &want, sizeof want);
}

/* Copy [off, off+len) between the file ``fd`` and the export (to_nbd: file
 * -> export), ``depth`` requests of ``chunk`` bytes in flight. skip_zero:
 * chunks that read as zero are not written (to a fresh file; to an export
 * that reads as zero), else written to an export as WRITE_ZEROES with
 * ``zero_flags``. Returns 0 or -errno (st says which side, where). */
int bj_nbd_copy_fd(struct nbd_handle *h, int fd, int to_nbd, uint64_t off, uint64_t len,
                   uint64_t chunk, int depth, int skip_zero, int zero_flags, int timeout_ms,
                   struct bj_nbd_copy_stats *st)
{
    if (chunk == 0 || depth < 1 || depth > 1024)
        return -EINVAL;
    struct copy c = { fd, to_nbd, skip_zero, 0, st, 0 };
    char *mbase = NULL;
    size_t mlen = 0;
    char *map = to_nbd && len > 0 ? map_source(fd, off, len, &mbase, &mlen) : NULL;
    if (to_nbd)
        widen_unix_sndbuf(nbd_aio_get_fd(h));
    struct slot *slots = calloc((size_t)depth, sizeof *slots);
    if (!slots) {
        if (mbase)
            munmap(mbase, mlen);
        return -ENOMEM;
    }
    int rc = 0;
    for (int i = 0; i < depth; i++) {
        slots[i].c = &c;
        if (!map && !(slots[i].buf = malloc(chunk))) {
            rc = -ENOMEM;
            goto out;
        }
    }
    uint64_t pos = 0;
    while ((pos < len && !c.err) || c.in_flight > 0) {
        for (int i = 0; i < depth && pos < len && !c.err; i++) {
            struct slot *s = &slots[i];
            if (s->busy)
                continue;
            uint64_t n = len - pos < chunk ? len - pos : chunk;
            s->off = off + pos;
            s->len = n;
            nbd_completion_callback cb = { .callback = slot_done, .user_data = s, .free = NULL };
            int64_t cookie;
            if (to_nbd) {
                if (map) {
                    s->buf = map + pos;
                    int z = mapped_zero(s->buf, n);
                    if (z < 0) {
                        fail(&c, -z, 1, s->off);
                        break;
                    }
                    s->zero = z;
                } else {
                    int r = read_all(fd, s->buf, n, s->off);
                    if (r < 0) {
                        fail(&c, -r, 1, s->off);
                        break;
                    }
                    s->zero = all_zero(s->buf, n);
                }
                if (s->zero && skip_zero) {
                    st->zero_bytes += n;
                    pos += n;
                    continue;
                }
                cookie = s->zero ? nbd_aio_zero(h, n, s->off, cb, (uint32_t)zero_flags)
                                 : nbd_aio_pwrite(h, s->buf, n, s->off, cb, 0);
            } else {
                cookie = nbd_aio_pread(h, s->buf, n, s->off, cb, 0);
            }
            if (cookie == -1) {
                fail(&c, nbd_get_errno() ? nbd_get_errno() : EIO, to_nbd ? 2 : 1, s->off);
                break;
            }
            s->busy = 1;
            c.in_flight++;
            pos += n;
        }
        if (c.in_flight == 0)
            continue;       /* everything left was zero and skipped, or an error */
        int r = step(h, timeout_ms);
        if (r < 0) {
            /* requests may still be in flight: the caller closes the handle
             * before anything drives it again (libnbd then calls no
             * completion callback and fills no buffer) */
            fail(&c, -r, to_nbd ? 2 : 1, off + pos);
            rc = -c.err;        /* the first error (a later one may follow from it) */
            goto out;
        }
    }
    rc = c.err ? -c.err : 0;
out:
    if (map && rc < 0 && st->error_side == 2) {
        /* a send from pages the file no longer has fails with EFAULT: say
         * what happened (the source is shorter than the export) */
        struct stat sb;
        if (fstat(fd, &sb) == 0 && (uint64_t)sb.st_size < off + len) {
            rc = -EIO;
            st->error_side = 1;
            st->error_offset = (uint64_t)sb.st_size > off ? (uint64_t)sb.st_size : off;
        }
    }
    if (!map)
        for (int i = 0; i < depth; i++)
            free(slots[i].buf);
    free(slots);
    if (mbase)
        munmap(mbase, mlen);
    return rc;
}
