/* dio.c: reads and writes that work on an fd opened with O_DIRECT.
 *
 * O_DIRECT wants the buffer address, the file offset and the length aligned
 * to the device's logical block size (the "request alignment"). Callers
 * (the copy engine, the format drivers through native/dio.py) issue
 * requests of any shape: an aligned request with an aligned buffer goes
 * straight to pread/pwrite; anything else goes through a bounce buffer
 * aligned to a page, in pieces of at most BOUNCE bytes, and a write whose
 * first or last block is partial reads that block first (read-modify-write,
 * as QEMU's block layer pads requests). The caller serialises writes that
 * may share a block (the copy engine writes one at a time, the drivers
 * under the graph's I/O lock).
 *
 * The alignment is probed once per file (st_dev, st_ino) and kept in a
 * small table, as QEMU's raw_probe_alignment guesses it: BLKSSZGET for a
 * block device, else the first of 1, 512, 1024, 2048, 4096 bytes a read at
 * offset 0 does not refuse with EINVAL -- 1 meaning "cannot tell" (a hole
 * at offset 0 reads without alignment on ext4), taken as 4096.
 */
#include "dio.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#define BOUNCE (1u << 20)
#define MEM_ALIGN 4096u
#define NCACHE 32

static pthread_mutex_t cache_lock = PTHREAD_MUTEX_INITIALIZER;
static struct {
    dev_t dev;
    ino_t ino;
    uint32_t align;
} cache[NCACHE];
static unsigned ncache;

static uint32_t probe(int fd, const struct stat *st)
{
    if (S_ISBLK(st->st_mode)) {
        int ssz = 0;
        if (ioctl(fd, BLKSSZGET, &ssz) == 0 && ssz >= 512 && ssz <= 65536)
            return (uint32_t)ssz;
    }
    void *buf;
    if (posix_memalign(&buf, MEM_ALIGN, 4096))
        return 4096;
    /* QEMU's guess: the first length a read at offset 0 accepts; 1 byte
     * accepted (a hole there, an empty file) tells nothing: 4096 */
    uint32_t align = 4096;
    static const uint32_t tries[] = { 1, 512, 1024, 2048, 4096 };
    for (size_t i = 0; i < sizeof(tries) / sizeof(tries[0]); i++) {
        ssize_t r;
        do
            r = pread(fd, buf, tries[i], 0);
        while (r < 0 && errno == EINTR);
        if (r >= 0 || errno != EINVAL) {
            align = tries[i] == 1 ? 4096 : tries[i];
            break;
        }
    }
    free(buf);
    return align;
}

uint32_t bj_dio_align(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || !(fl & O_DIRECT))
        return 1;
    struct stat st;
    if (fstat(fd, &st) < 0)
        return 4096;
    pthread_mutex_lock(&cache_lock);
    for (unsigned i = 0; i < ncache; i++) {
        if (cache[i].dev == st.st_dev && cache[i].ino == st.st_ino) {
            uint32_t a = cache[i].align;
            pthread_mutex_unlock(&cache_lock);
            return a;
        }
    }
    pthread_mutex_unlock(&cache_lock);
    uint32_t a = probe(fd, &st);
    pthread_mutex_lock(&cache_lock);
    unsigned slot = ncache < NCACHE ? ncache++ : (unsigned)(st.st_ino % NCACHE);
    cache[slot].dev = st.st_dev;
    cache[slot].ino = st.st_ino;
    cache[slot].align = a;
    pthread_mutex_unlock(&cache_lock);
    return a;
}

/* Read up to len bytes; fewer only at the end of the file. */
static int64_t read_full(int fd, char *buf, uint64_t len, uint64_t off)
{
    uint64_t got = 0;
    while (got < len) {
        ssize_t r = pread(fd, buf + got, len - got, (off_t)(off + got));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            break;
        got += (uint64_t)r;
    }
    return (int64_t)got;
}

static int64_t write_full(int fd, const char *buf, uint64_t len, uint64_t off,
                          uint64_t *fail_off)
{
    uint64_t put = 0;
    while (put < len) {
        ssize_t w = pwrite(fd, buf + put, len - put, (off_t)(off + put));
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            *fail_off = off + put;
            return w < 0 ? -errno : -EIO;
        }
        put += (uint64_t)w;
    }
    return (int64_t)len;
}

static int aligned(const void *buf, uint64_t len, uint64_t off, uint32_t a)
{
    return off % a == 0 && len % a == 0 && (uintptr_t)buf % a == 0;
}

static int64_t dio_pread(int fd, void *buf, uint64_t len, uint64_t off, uint32_t a)
{
    if (a <= 1 || aligned(buf, len, off, a))
        return read_full(fd, buf, len, off);
    char *b;
    if (posix_memalign((void **)&b, MEM_ALIGN > a ? MEM_ALIGN : a, BOUNCE))
        return -ENOMEM;
    uint64_t pos = off, end = off + len;
    int64_t rc = 0;
    while (pos < end) {
        uint64_t s = pos - pos % a;
        uint64_t e = end - s > BOUNCE ? s + BOUNCE : end;
        uint64_t ea = (e + a - 1) / a * a;    /* <= s + BOUNCE: both aligned */
        int64_t got = read_full(fd, b, ea - s, s);
        if (got < 0) {
            rc = got;
            break;
        }
        if ((uint64_t)got <= pos - s)
            break;                      /* end of file */
        uint64_t n = (uint64_t)got - (pos - s);
        if (n > e - pos)
            n = e - pos;
        memcpy((char *)buf + (pos - off), b + (pos - s), n);
        pos += n;
        if ((uint64_t)got < ea - s)
            break;
    }
    free(b);
    return rc < 0 ? rc : (int64_t)(pos - off);
}

/* Read the block [blk, blk + a) into dst, zeroes past the end of the file. */
static int64_t read_block(int fd, char *dst, uint64_t blk, uint32_t a)
{
    int64_t got = read_full(fd, dst, a, blk);
    if (got < 0)
        return got;
    memset(dst + got, 0, a - (uint64_t)got);
    return 0;
}

static int64_t dio_pwrite(int fd, const void *buf, uint64_t len, uint64_t off,
                          uint64_t *fail_off, uint32_t a)
{
    if (a <= 1 || aligned(buf, len, off, a))
        return write_full(fd, buf, len, off, fail_off);
    uint64_t end = off + len;
    struct stat st;
    int grows = 0;
    if (end % a) {
        if (fstat(fd, &st) < 0)
            return -errno;
        grows = (uint64_t)st.st_size < (end + a - 1) / a * a;
    }
    char *b;
    if (posix_memalign((void **)&b, MEM_ALIGN > a ? MEM_ALIGN : a, BOUNCE + a))
        return -ENOMEM;
    uint64_t pos = off;
    int64_t rc = 0;
    while (pos < end && rc >= 0) {
        uint64_t s = pos - pos % a;
        uint64_t e = end - s > BOUNCE ? s + BOUNCE : end;
        uint64_t ea = (e + a - 1) / a * a;
        if (pos != s)
            rc = read_block(fd, b, s, a);
        if (rc >= 0 && e != ea && !(pos != s && ea - a == s))
            rc = read_block(fd, b + (ea - a - s), ea - a, a);
        if (rc < 0) {
            *fail_off = s;
            break;
        }
        memcpy(b + (pos - s), (const char *)buf + (pos - off), e - pos);
        rc = write_full(fd, b, ea - s, s, fail_off);
        pos = e;
    }
    free(b);
    if (rc >= 0 && grows) {
        /* the padded tail block went past the end of the file: cut it back */
        uint64_t keep = (uint64_t)st.st_size > end ? (uint64_t)st.st_size : end;
        if (ftruncate(fd, (off_t)keep) < 0) {
            *fail_off = keep;
            rc = -errno;
        }
    }
    return rc < 0 ? rc : (int64_t)len;
}

/* O_DIRECT may be switched on or off while a request is between its
 * alignment check and its system calls: a daemon's blockdev-reopen of
 * cache.direct (fcntl F_SETFL) while a job's requests run in the copy
 * engine, which no drain holds. An unaligned request done buffered then
 * meets EINVAL from the kernel. Such a request is done again, whole (the
 * same bytes: doing them twice is harmless), through the bounce buffer at
 * an alignment both modes accept: the file's probed one if known, at least
 * 4096. Retrying in "the mode the fd is in now" is not enough: the mode may
 * flip again between the check and the call, any number of times. An
 * EINVAL from a request that was already done aligned is the kernel's
 * answer and is returned. */
static uint32_t safe_align(int fd)
{
    uint32_t a = 4096;
    struct stat st;
    if (fstat(fd, &st) < 0)
        return a;
    pthread_mutex_lock(&cache_lock);
    for (unsigned i = 0; i < ncache; i++)
        if (cache[i].dev == st.st_dev && cache[i].ino == st.st_ino && cache[i].align > a)
            a = cache[i].align;
    pthread_mutex_unlock(&cache_lock);
    return a;
}

int64_t bj_dio_pread(int fd, void *buf, uint64_t len, uint64_t off)
{
    return bj_dio_pread_a(fd, bj_dio_align(fd), buf, len, off);
}

int64_t bj_dio_pwrite(int fd, const void *buf, uint64_t len, uint64_t off, uint64_t *fail_off)
{
    return bj_dio_pwrite_a(fd, bj_dio_align(fd), buf, len, off, fail_off);
}

/* The same with the fd's alignment as the caller knows it (the copy engine
 * reads it once per fd, not once per request): an EINVAL, which a switch
 * of the fd's mode since then may cause, is retried as above. */
int64_t bj_dio_pread_a(int fd, uint32_t a, void *buf, uint64_t len, uint64_t off)
{
    int64_t rc = dio_pread(fd, buf, len, off, a);
    if (rc == -EINVAL) {
        uint32_t s = safe_align(fd);
        if (a < s)
            rc = dio_pread(fd, buf, len, off, s);
    }
    return rc;
}

int64_t bj_dio_pwrite_a(int fd, uint32_t a, const void *buf, uint64_t len, uint64_t off,
                        uint64_t *fail_off)
{
    uint64_t dummy;
    if (!fail_off)
        fail_off = &dummy;
    int64_t rc = dio_pwrite(fd, buf, len, off, fail_off, a);
    if (rc == -EINVAL) {
        uint32_t s = safe_align(fd);
        if (a < s)
            rc = dio_pwrite(fd, buf, len, off, fail_off, s);
    }
    return rc;
}
