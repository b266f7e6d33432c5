/* extents.c: which parts of a file hold data, asked of the file system.
 *
 * Design: lseek(SEEK_DATA) finds the next data byte at or after a position,
 * lseek(SEEK_HOLE) the end of that data run. Walking a range costs two
 * syscalls per data extent and nothing per hole byte, so the caller asks per
 * work range (nbdcopy uses 128 MiB) and never maps a whole multi-TiB file up
 * front. File systems without SEEK_DATA (EINVAL/ENOTSUP... or older kernels)
 * are answered with "all data": correct, only slower.
 *
 * Cost: O(number of extents in the range) syscalls; no allocation.
 */
#include "extents.h"
#include "dio.h"
#include "zero.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int push(struct bj_extent *out, size_t max, size_t *n, uint64_t off, uint64_t len,
                uint32_t flags)
{
    if (len == 0)
        return 0;
    if (*n > 0 && out[*n - 1].flags == flags && out[*n - 1].offset + out[*n - 1].length == off) {
        out[*n - 1].length += len;
        return 0;
    }
    if (*n == max)
        return 1; /* full */
    out[*n].offset = off;
    out[*n].length = len;
    out[*n].flags = flags;
    (*n)++;
    return 0;
}

int bj_extents(int fd, uint64_t offset, uint64_t length,
               struct bj_extent *out, size_t max, size_t *n_out, uint64_t *next_out)
{
    struct stat st;
    size_t n = 0;
    uint64_t end, pos;

    if (!out || !n_out || !next_out || max == 0)
        return -EINVAL;
    *n_out = 0;
    *next_out = offset;
    if (fstat(fd, &st) < 0)
        return -errno;
    if (S_ISDIR(st.st_mode))
        return -EISDIR;
    if (offset > UINT64_MAX - length)
        return -EINVAL;
    end = offset + length;
    if (S_ISREG(st.st_mode) && end > (uint64_t)st.st_size)
        end = (uint64_t)st.st_size;
    if (offset >= end) { /* all past EOF: one hole (max >= 1: room for it) */
        (void)push(out, max, &n, offset, length, 0);
        *n_out = n;
        *next_out = offset + length;
        return 0;
    }
    pos = offset;
    while (pos < end) {
        off_t d = lseek(fd, (off_t)pos, SEEK_DATA);
        if (d < 0) {
            if (errno == ENXIO) {         /* no data after pos: hole to the end */
                if (push(out, max, &n, pos, end - pos, 0))
                    break;
                pos = end;
                continue;
            }
            if (errno == EINVAL || errno == ENOTSUP || errno == EOPNOTSUPP) {
                if (push(out, max, &n, pos, end - pos, BJ_EXTENT_DATA))
                    break;
                pos = end;
                continue;
            }
            return -errno;
        }
        uint64_t data = (uint64_t)d;
        if (data > end)
            data = end;
        if (data > pos) {
            if (push(out, max, &n, pos, data - pos, 0))
                break;
            pos = data;
            if (pos >= end)
                break;
        }
        off_t h = lseek(fd, (off_t)pos, SEEK_HOLE);
        if (h < 0)
            return -errno;
        uint64_t hole = (uint64_t)h;
        if (hole > end || hole <= pos)
            hole = end;
        if (push(out, max, &n, pos, hole - pos, BJ_EXTENT_DATA))
            break;
        pos = hole;
    }
    *n_out = n;
    /* Beyond the file's end the range reads as a hole: report it as covered. */
    *next_out = (pos >= end) ? offset + length : pos;
    if (pos >= end && end < offset + length) {
        /* Past EOF: describe it as a hole if there is room, else resume there. */
        if (push(out, max, &n, end, offset + length - end, 0))
            *next_out = end;
        *n_out = n;
    }
    return 0;
}

#define ZB_HEAD 512u            /* first read of a block */
#define ZB_CHUNK (1u << 20)     /* later reads of a block that began with zeroes */

/* Read len bytes at off (past the end of the file: zeroes); 1 when they
 * are all zero, 0 when not, or -errno. */
static int zero_at(int fd, uint32_t align, char *buf, uint64_t len, uint64_t off)
{
    int64_t got = bj_dio_pread_a(fd, align, buf, len, off);
    if (got < 0)
        return (int)got;
    return bj_is_zero(buf, (size_t)got);
}

int bj_zero_blocks(int fd, uint64_t offset, uint64_t length, uint64_t block,
                   uint8_t *out, size_t nout)
{
    if (fd < 0 || block == 0 || (!out && length) || offset > UINT64_MAX - length)
        return -EINVAL;
    if ((length + block - 1) / block > nout)
        return -EINVAL;
    if (length == 0)
        return 0;
    uint32_t align = bj_dio_align(fd);
    size_t bufsz = block < ZB_CHUNK ? (size_t)block : ZB_CHUNK;
    if (bufsz < ZB_HEAD)
        bufsz = ZB_HEAD;
    void *buf = NULL;
    if (posix_memalign(&buf, 4096, bufsz))
        return -ENOMEM;
    int rc = 0;
    size_t i = 0;
    for (uint64_t pos = offset; pos < offset + length; pos += block, i++) {
        uint64_t n = offset + length - pos < block ? offset + length - pos : block;
        uint64_t k = n < ZB_HEAD ? n : ZB_HEAD;
        rc = zero_at(fd, align, buf, k, pos);
        for (uint64_t done = k; rc == 1 && done < n; done += k) {
            k = n - done < bufsz ? n - done : bufsz;
            rc = zero_at(fd, align, buf, k, pos + done);
        }
        if (rc < 0)
            break;
        out[i] = (uint8_t)rc;
        rc = 0;
    }
    free(buf);
    return rc;
}
