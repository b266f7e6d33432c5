/* zero.c: finding zeroes in buffers and making zeroes in files.
 *
 * Zero test: compare the first 16 bytes by hand, then memcmp the buffer
 * against itself shifted by 16 bytes: if buf[0..16) is zero and
 * buf[i] == buf[i-16] for all i, everything is zero. glibc's memcmp is
 * vectorised, so this runs at memory bandwidth with no table and no branch
 * per word. Cost: one pass over the buffer, stopping at the first non-zero.
 *
 * Zeroing ladder (as nbdcopy's file-ops.c does it): punch a hole (frees
 * blocks, reads as zero), else FALLOC_FL_ZERO_RANGE (keeps blocks allocated),
 * else pwrite zeroes from a heap buffer of at most 1 MiB, piece by piece, each
 * piece first cleared by the caller's pace callback (the copy engine's rate
 * limit and cancel: bj_zero_range_paced). Whatever the file
 * system refused (EOPNOTSUPP/ENOTSUP/ENOSYS/EINVAL) is remembered in struct
 * bj_zeroer, so it is asked once per open target, never once per request.
 * The copy engine's workers share one zeroer: its flags are C11 atomics.
 */
#include "zero.h"
#include "dio.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int bj_is_zero(const void *buf, size_t len)
{
    const unsigned char *p = buf;
    size_t head = len < 16 ? len : 16;
    for (size_t i = 0; i < head; i++)
        if (p[i])
            return 0;
    if (len <= 16)
        return 1;
    return memcmp(p, p + 16, len - 16) == 0;
}

size_t bj_zero_run(const void *buf, size_t len, size_t block, int want_zero)
{
    const unsigned char *p = buf;
    size_t pos = 0;
    if (block == 0)
        block = len ? len : 1;
    while (pos < len) {
        size_t n = len - pos < block ? len - pos : block;
        if (bj_is_zero(p + pos, n) != (want_zero ? 1 : 0))
            break;
        pos += n;
    }
    return pos;
}

static int refused(int err)
{
    return err == EOPNOTSUPP || err == ENOTSUP || err == ENOSYS || err == EINVAL;
}

static int write_zeroes(int fd, uint64_t offset, uint64_t length, uint64_t piece,
                        int (*pace)(void *ctx, uint64_t n), void *ctx)
{
    if (piece == 0 || piece > (1u << 20))
        piece = 1u << 20;
    size_t bufsz = length < piece ? (size_t)length : (size_t)piece;
    void *zeroes; /* page aligned: written as is on an O_DIRECT fd (dio.c) */
    if (posix_memalign(&zeroes, 4096, bufsz))
        return -ENOMEM;
    memset(zeroes, 0, bufsz);
    int rc = 0;
    size_t cleared = 0; /* bytes of the current piece pace has let through */
    while (length > 0) {
        size_t n = length < bufsz ? (size_t)length : bufsz;
        if (pace) {
            if (cleared == 0) {
                if (pace(ctx, n)) {
                    rc = -ECANCELED;
                    break;
                }
                cleared = n;
            }
            if (n > cleared)
                n = cleared; /* the rest of a piece after a short write */
        }
        int64_t w = bj_dio_pwrite(fd, zeroes, n, offset, NULL);
        if (w < 0) {
            rc = (int)w;
            break;
        }
        offset += (uint64_t)w;
        length -= (uint64_t)w;
        if (pace)
            cleared -= (size_t)w;
    }
    free(zeroes);
    return rc;
}

void bj_zeroer_init(struct bj_zeroer *z)
{
    atomic_init(&z->no_punch, 0);
    atomic_init(&z->no_zero_range, 0);
    z->fallocate = NULL;
}

/* One rung: 0 done, 1 refused (now remembered in *flag), or -errno. */
static int rung(const struct bj_zeroer *z, atomic_int *flag, int fd, int mode, uint64_t offset,
                uint64_t length)
{
    if (atomic_load_explicit(flag, memory_order_relaxed))
        return 1;
    int r = z->fallocate ? z->fallocate(fd, mode, (off_t)offset, (off_t)length)
                         : fallocate(fd, mode, (off_t)offset, (off_t)length);
    if (r == 0)
        return 0;
    if (!refused(errno))
        return -errno;
    atomic_store_explicit(flag, 1, memory_order_relaxed);
    return 1;
}

int bj_zero_range(struct bj_zeroer *z, int fd, uint64_t offset, uint64_t length, int may_unmap)
{
    return bj_zero_range_paced(z, fd, offset, length, may_unmap, 0, NULL, NULL);
}

int bj_zero_range_paced(struct bj_zeroer *z, int fd, uint64_t offset, uint64_t length,
                        int may_unmap, uint64_t piece, int (*pace)(void *ctx, uint64_t n),
                        void *ctx)
{
    if (!z)
        return -EINVAL;
    if (length == 0)
        return 0;
    if (offset > (uint64_t)INT64_MAX || length > (uint64_t)INT64_MAX - offset)
        return -EINVAL;
    int rc;
    if (may_unmap) {
        rc = rung(z, &z->no_punch, fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
        if (rc <= 0)
            return rc;
    }
    rc = rung(z, &z->no_zero_range, fd, FALLOC_FL_ZERO_RANGE, offset, length);
    if (rc <= 0)
        return rc;
    return write_zeroes(fd, offset, length, piece, pace, ctx);
}
